// A CUDA driver library (libcuda.so.1) that runs the kernels of ops.cu and planar.cu on the CPU
// (cuda_shim.h), so that the host side of the GPU path (kernels::cuda, model::transformer::cuda,
// the binaries' --device cuda) runs end to end where there is no GPU. Built by
// kernels::cuda::emulation::build_driver; put its directory first on LD_LIBRARY_PATH.
//
// It implements the driver calls cudarc makes on that path, one context on one device, every
// operation run in stream order at the call (a single in-order stream is all the runtime uses),
// and holds the host code to what a real driver would refuse or corrupt:
// - a module is the PTX text: functions are looked up by its `.entry` names, and each one's
//   parameter sizes must match the C++ kernel's (a stale PTX fails here as on a GPU);
// - launches are checked against `.maxntid` and the 1,024-thread limit, and every pointer
//   argument must point into a live allocation;
// - allocations start filled with 0xFF bytes (NaN as f32), so reading what was never written
//   shows; each ends against an inaccessible page (a read or write past it crashes the process),
//   and the up to 255 bytes between its end and that page (allocations are 256-byte aligned, as
//   on a GPU) are checked after every launch (a write there is CUDA_ERROR_ILLEGAL_ADDRESS, sticky
//   as on a GPU; a read there gets NaN);
// - stream capture records launches and device copies into a graph that replays them; anything
//   that waits, allocates, frees or copies host memory while capturing invalidates the capture.
#include "cuda_shim.h"

#include "../ops.cu"
#include "../planar.cu"

#include <cstdio>
#include <cctype>
#include <sys/mman.h>
#include <unistd.h>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
};

namespace {

// A kernel of the sources above, callable with the driver's `kernelParams` (a pointer to each
// argument's value).
struct Kernel {
    std::vector<size_t> param_sizes;
    std::vector<bool> param_is_pointer;
    std::function<void(void **)> invoke;
};

template <class... A, size_t... I> void call_with(void (*k)(A...), void **p, std::index_sequence<I...>) {
    k(*static_cast<A *>(p[I])...);
}

template <class... A> Kernel kernel_of(void (*k)(A...)) {
    return Kernel{{sizeof(A)...}, {std::is_pointer_v<A>...}, [k](void **p) { call_with(k, p, std::index_sequence_for<A...>{}); }};
}

const std::map<std::string, Kernel> &sources() {
#define K(f) {#f, kernel_of(f)}
    static const std::map<std::string, Kernel> all = {
        K(rms_norm), K(add_assign), K(add_bias), K(silu_mul), K(rope), K(store_kv), K(attend), K(dense_matmul),
        K(gather_rows), K(argmax_rows), K(sample_rows), K(planar_matmul_f32_b2), K(planar_matmul_f32_b3), K(planar_matmul_f32_b4),
        K(planar_matmul_f32_b5), K(planar_matmul_f32_b6), K(planar_matmul_f32_b7), K(planar_matmul_f32_b8),
        K(planar_rows_f32_b2), K(planar_rows_f32_b3), K(planar_rows_f32_b4), K(planar_rows_f32_b5),
        K(planar_rows_f32_b6), K(planar_rows_f32_b7), K(planar_rows_f32_b8),
    };
#undef K
    return all;
}

struct Function {
    std::string name;
    const Kernel *kernel;
    unsigned max_threads;  // .maxntid, else 1,024
};

struct Module {
    std::map<std::string, Function> functions;
};

struct Launch {
    const Function *function;
    dim3 grid, block;
    std::vector<std::vector<unsigned char>> args;
};

// A node of a captured graph: a launch or a device-to-device copy.
struct Node {
    Launch launch;
    CUdeviceptr dst = 0, src = 0;
    size_t bytes = 0;
};

struct Graph {
    std::vector<Node> nodes;
};

struct Stream {
    Graph *capture = nullptr;
    bool invalidated = false;
};

// What an allocation starts as, and what the bytes after its end must stay.
constexpr unsigned char FILL = 0xFF;

struct Allocation {
    size_t bytes;
    // The mapping holding it: its pages, then one inaccessible page right after its padding.
    void *mapping;
    size_t mapped;
};

size_t padded(size_t bytes) { return (bytes + 255) / 256 * 256; }

std::recursive_mutex lock;
std::map<CUdeviceptr, Allocation> allocations;
CUresult sticky = CUDA_SUCCESS;
int context_token;
thread_local void *current_context = nullptr;

void note(const char *what, const std::string &detail) { std::fprintf(stderr, "[emulated CUDA] %s: %s\n", what, detail.c_str()); }

// The allocation holding `[p, p + bytes)`, if any.
const std::pair<const CUdeviceptr, Allocation> *holding(CUdeviceptr p, size_t bytes) {
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return nullptr;
    --it;
    if (p < it->first || p + bytes > it->first + it->second.bytes) return nullptr;
    return &*it;
}

bool guards_intact(CUdeviceptr base, const Allocation &a) {
    const auto *g = reinterpret_cast<const unsigned char *>(base + a.bytes);
    for (size_t i = 0; i < padded(a.bytes) - a.bytes; i++)
        if (g[i] != FILL) return false;
    return true;
}

CUresult check_guards(const char *after) {
    for (const auto &[base, a] : allocations)
        if (!guards_intact(base, a)) {
            note("illegal address", std::string("a write past the end of a ") + std::to_string(a.bytes) +
                                        "-byte allocation, after " + after);
            sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
            return sticky;
        }
    return CUDA_SUCCESS;
}

CUresult run(const Launch &l) {
    const Kernel &k = *l.function->kernel;
    std::vector<void *> params;
    for (size_t i = 0; i < l.args.size(); i++) {
        params.push_back(const_cast<unsigned char *>(l.args[i].data()));
        if (k.param_is_pointer[i]) {
            CUdeviceptr p;
            std::memcpy(&p, l.args[i].data(), sizeof p);
            if (p != 0 && !holding(p, 1)) {
                note("illegal address", l.function->name + ": argument " + std::to_string(i) + " is not device memory");
                return sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
            }
        }
    }
    emu::launch(l.grid, l.block, [&] { k.invoke(params.data()); });
    return check_guards(l.function->name.c_str());
}

CUresult copy(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    if (!holding(dst, bytes) || !holding(src, bytes)) return CUDA_ERROR_INVALID_VALUE;
    std::memmove(reinterpret_cast<void *>(dst), reinterpret_cast<const void *>(src), bytes);
    return CUDA_SUCCESS;
}

// What every call checks first: a sticky error ends the context, as on a GPU.
#define ENTER                                                                                                     \
    std::lock_guard<std::recursive_mutex> guard(lock);                                                            \
    if (sticky != CUDA_SUCCESS) return sticky

// Operations that may not happen while `s` captures: they end the capture as invalid.
CUresult not_while_capturing(Stream *s) {
    if (s && s->capture) {
        s->invalidated = true;
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    return CUDA_SUCCESS;
}

std::vector<Stream *> streams;

CUresult not_while_any_captures() {
    for (Stream *s : streams)
        if (CUresult r = not_while_capturing(s)) return r;
    return CUDA_SUCCESS;
}

// The `.entry` names of a PTX module with their parameter sizes and `.maxntid`.
bool parse_ptx(const std::string &ptx, Module &m) {
    size_t at = 0;
    while ((at = ptx.find(".entry ", at)) != std::string::npos) {
        at += 7;
        const size_t open = ptx.find('(', at), close = ptx.find(')', open);
        if (open == std::string::npos || close == std::string::npos) return false;
        std::string name = ptx.substr(at, open - at);
        while (!name.empty() && std::isspace((unsigned char)name.back())) name.pop_back();
        std::vector<size_t> sizes;
        for (size_t p = ptx.find(".param", open); p != std::string::npos && p < close; p = ptx.find(".param", p + 6)) {
            const size_t type = ptx.find('.', p + 6);
            const std::string t = ptx.substr(type + 1, 3);
            sizes.push_back(t.find("64") != std::string::npos ? 8 : t.find("16") != std::string::npos ? 2 : t.find('8') != std::string::npos ? 1 : 4);
        }
        unsigned max_threads = 1024;
        const size_t body = ptx.find('{', close), next = ptx.find(".entry ", close);
        const size_t ntid = ptx.find(".maxntid", close);
        if (ntid != std::string::npos && ntid < body && (next == std::string::npos || ntid < next)) {
            unsigned x = 1, y = 1, z = 1;
            std::sscanf(ptx.c_str() + ntid + 8, " %u , %u , %u", &x, &y, &z);
            max_threads = x * y * z;
        }
        const auto src = sources().find(name);
        if (src == sources().end()) {
            note("module", "the PTX has a kernel the emulator does not know: " + name);
            return false;
        }
        if (src->second.param_sizes != sizes) {
            note("module", name + ": the PTX's parameters do not match the CUDA source's (regenerate the PTX)");
            return false;
        }
        m.functions[name] = Function{name, &src->second, max_threads};
        at = close;
    }
    return !m.functions.empty();
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }

// CUDA 12.4, or what DRQ_EMULATED_CUDA_VERSION says (an old driver, in tests).
CUresult cuDriverGetVersion(int *v) {
    const char *version = std::getenv("DRQ_EMULATED_CUDA_VERSION");
    *v = version ? std::atoi(version) : 12040;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *n) {
    *n = 1;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice) {
    std::snprintf(name, len, "drq CUDA emulator (CPU)");
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int *v, int attribute, CUdevice) {
    switch (attribute) {
    case 1: *v = 1024; break;   // max threads per block
    case 16: *v = 132; break;   // multiprocessors
    case 75: *v = 9; break;     // compute capability
    case 76: *v = 0; break;
    case 115: *v = 1; break;    // memory pools (cudarc then allocates with cuMemAllocAsync)
    default: *v = 0;
    }
    return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice) {
    *bytes = size_t(16) << 30;
    return CUDA_SUCCESS;
}

CUresult cuMemGetInfo_v2(size_t *free, size_t *total) {
    *free = *total = size_t(16) << 30;
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(void **ctx, CUdevice) {
    *ctx = &context_token;
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }

CUresult cuCtxSetCurrent(void *ctx) {
    current_context = ctx;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(void **ctx) {
    *ctx = current_context;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice *d) {
    *d = 0;
    return CUDA_SUCCESS;
}

CUresult cuCtxSynchronize() {
    ENTER;
    return not_while_any_captures();
}

CUresult cuGetErrorString(CUresult e, const char **s) {
    switch (e) {
    case CUDA_SUCCESS: *s = "no error"; break;
    case CUDA_ERROR_INVALID_VALUE: *s = "invalid argument"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *s = "out of memory"; break;
    case CUDA_ERROR_INVALID_DEVICE: *s = "invalid device ordinal"; break;
    case CUDA_ERROR_INVALID_PTX: *s = "a PTX JIT compilation failed"; break;
    case CUDA_ERROR_INVALID_HANDLE: *s = "invalid resource handle"; break;
    case CUDA_ERROR_NOT_FOUND: *s = "named symbol not found"; break;
    case CUDA_ERROR_ILLEGAL_ADDRESS: *s = "an illegal memory access was encountered"; break;
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *s = "too many resources requested for launch"; break;
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: *s = "operation not permitted when stream is capturing"; break;
    case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: *s = "operation failed due to a previous error during capture"; break;
    default: *s = "unknown error";
    }
    return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult e, const char **s) { return cuGetErrorString(e, s); }

CUresult cuStreamCreate(Stream **s, unsigned) {
    ENTER;
    *s = new Stream;
    streams.push_back(*s);
    return CUDA_SUCCESS;
}

CUresult cuStreamDestroy_v2(Stream *s) {
    std::lock_guard<std::recursive_mutex> guard(lock);
    std::erase(streams, s);
    delete s;
    return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(Stream *s) {
    ENTER;
    return not_while_capturing(s);
}

CUresult cuStreamWaitEvent(Stream *, void *, unsigned) { return CUDA_SUCCESS; }

CUresult cuStreamBeginCapture_v2(Stream *s, int) {
    ENTER;
    if (!s || s->capture) return CUDA_ERROR_INVALID_VALUE;  // the legacy stream cannot capture
    s->capture = new Graph;
    s->invalidated = false;
    return CUDA_SUCCESS;
}

CUresult cuStreamEndCapture(Stream *s, Graph **g) {
    std::lock_guard<std::recursive_mutex> guard(lock);
    if (!s || !s->capture) return CUDA_ERROR_INVALID_VALUE;
    Graph *captured = std::exchange(s->capture, nullptr);
    if (s->invalidated) {
        delete captured;
        *g = nullptr;
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    *g = captured;
    return CUDA_SUCCESS;
}

CUresult cuStreamIsCapturing(Stream *s, int *status) {
    *status = s && s->capture ? (s->invalidated ? 2 : 1) : 0;
    return CUDA_SUCCESS;
}

CUresult cuGraphInstantiateWithFlags(Graph **exec, Graph *g, unsigned long long) {
    ENTER;
    *exec = new Graph(*g);
    return CUDA_SUCCESS;
}

CUresult cuGraphUpload(Graph *, Stream *) { return CUDA_SUCCESS; }

CUresult cuGraphLaunch(Graph *exec, Stream *s) {
    ENTER;
    if (s && s->capture) {
        s->capture->nodes.insert(s->capture->nodes.end(), exec->nodes.begin(), exec->nodes.end());
        return CUDA_SUCCESS;
    }
    for (const Node &n : exec->nodes) {
        const CUresult r = n.launch.function ? run(n.launch) : copy(n.dst, n.src, n.bytes);
        if (r != CUDA_SUCCESS) return r;
    }
    return CUDA_SUCCESS;
}

CUresult cuGraphExecDestroy(Graph *exec) {
    delete exec;
    return CUDA_SUCCESS;
}

CUresult cuGraphDestroy(Graph *g) {
    delete g;
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(void **e, unsigned) {
    *e = new int;
    return CUDA_SUCCESS;
}

CUresult cuEventDestroy_v2(void *e) {
    delete static_cast<int *>(e);
    return CUDA_SUCCESS;
}

CUresult cuEventRecord(void *, Stream *) { return CUDA_SUCCESS; }
CUresult cuEventSynchronize(void *) { return CUDA_SUCCESS; }
CUresult cuEventQuery(void *) { return CUDA_SUCCESS; }

CUresult cuMemAllocAsync(CUdeviceptr *p, size_t bytes, Stream *s) {
    ENTER;
    if (CUresult r = not_while_capturing(s)) return r;
    const size_t page = sysconf(_SC_PAGESIZE), data = (padded(std::max<size_t>(bytes, 1)) + page - 1) / page * page;
    void *mapping = mmap(nullptr, data + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    auto *end = static_cast<unsigned char *>(mapping) + data;
    if (mprotect(end, page, PROT_NONE) != 0) {
        munmap(mapping, data + page);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    unsigned char *mem = end - padded(std::max<size_t>(bytes, 1));
    std::memset(mem, FILL, end - mem);
    *p = reinterpret_cast<CUdeviceptr>(mem);
    allocations[*p] = Allocation{bytes, mapping, data + page};
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t bytes) { return cuMemAllocAsync(p, bytes, nullptr); }

CUresult cuMemFreeAsync(CUdeviceptr p, Stream *s) {
    std::lock_guard<std::recursive_mutex> guard(lock);
    if (CUresult r = not_while_capturing(s)) return r;
    const auto it = allocations.find(p);
    if (it == allocations.end()) return CUDA_ERROR_INVALID_VALUE;
    const bool intact = guards_intact(p, it->second);
    munmap(it->second.mapping, it->second.mapped);
    allocations.erase(it);
    if (!intact) {
        note("illegal address", "a write past the end of an allocation, found when it was freed");
        return sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
    }
    return CUDA_SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr p) { return cuMemFreeAsync(p, nullptr); }

CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char value, size_t bytes, Stream *s) {
    ENTER;
    if (CUresult r = not_while_capturing(s)) return r;
    if (!holding(p, bytes)) return CUDA_ERROR_INVALID_VALUE;
    std::memset(reinterpret_cast<void *>(p), value, bytes);
    return CUDA_SUCCESS;
}

CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char value, size_t bytes) { return cuMemsetD8Async(p, value, bytes, nullptr); }

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t bytes, Stream *s) {
    ENTER;
    if (CUresult r = not_while_capturing(s)) return r;
    if (!holding(dst, bytes)) return CUDA_ERROR_INVALID_VALUE;
    std::memcpy(reinterpret_cast<void *>(dst), src, bytes);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t bytes) { return cuMemcpyHtoDAsync_v2(dst, src, bytes, nullptr); }

CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t bytes, Stream *s) {
    ENTER;
    if (CUresult r = not_while_capturing(s)) return r;
    if (!holding(src, bytes)) return CUDA_ERROR_INVALID_VALUE;
    std::memcpy(dst, reinterpret_cast<const void *>(src), bytes);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoHAsync_v2(dst, src, bytes, nullptr); }

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, Stream *s) {
    ENTER;
    if (s && s->capture) {
        Node n;
        n.dst = dst, n.src = src, n.bytes = bytes;
        s->capture->nodes.push_back(n);
        return CUDA_SUCCESS;
    }
    return copy(dst, src, bytes);
}

CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoDAsync_v2(dst, src, bytes, nullptr); }

CUresult cuModuleLoadData(Module **m, const void *image) {
    ENTER;
    auto *module = new Module;
    if (!parse_ptx(static_cast<const char *>(image), *module)) {
        delete module;
        return CUDA_ERROR_INVALID_PTX;
    }
    *m = module;
    return CUDA_SUCCESS;
}

CUresult cuModuleUnload(Module *m) {
    delete m;
    return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(const Function **f, Module *m, const char *name) {
    ENTER;
    if (!m) return CUDA_ERROR_INVALID_HANDLE;
    const auto it = m->functions.find(name);
    if (it == m->functions.end()) return CUDA_ERROR_NOT_FOUND;
    *f = &it->second;
    return CUDA_SUCCESS;
}

CUresult cuFuncGetAttribute(int *v, int, const Function *) {
    *v = 0;
    return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(const Function *, int, int) { return CUDA_SUCCESS; }

CUresult cuLaunchKernel(const Function *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, Stream *s, void **params, void **extra) {
    ENTER;
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (extra || !params) return CUDA_ERROR_INVALID_VALUE;
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || threads == 0 || gy > 65535 || gz > 65535 || threads > 1024 ||
        shared_bytes > 48 * 1024)
        return CUDA_ERROR_INVALID_VALUE;
    if (threads > f->max_threads) {
        note("launch", f->name + ": " + std::to_string(threads) + " threads, .maxntid " + std::to_string(f->max_threads));
        return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    }
    Launch l{f, dim3{gx, gy, gz}, dim3{bx, by, bz}, {}};
    for (size_t i = 0; i < f->kernel->param_sizes.size(); i++) {
        const auto *v = static_cast<const unsigned char *>(params[i]);
        l.args.emplace_back(v, v + f->kernel->param_sizes[i]);
    }
    if (s && s->capture) {
        s->capture->nodes.push_back(Node{std::move(l)});
        return CUDA_SUCCESS;
    }
    return run(l);
}

}  // extern "C"
