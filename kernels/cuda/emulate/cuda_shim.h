// Runs CUDA C kernels on the CPU, so that the kernels' own source is tested where there is no GPU
// (kernels/src/cuda/tests.rs builds kernels/cuda/emulate/*_main.cpp with the host C++ compiler;
// kernels::cuda::emulation builds driver.cpp, a CUDA driver library over the same kernels).
//
// One block at a time on the calling thread, each of its threads a fiber (its own stack, switched
// cooperatively): `__shared__` variables become function statics (shared by the block's threads,
// reused by the next block), `__syncthreads` a barrier of the block, a warp shuffle an exchange
// through memory behind a barrier of the warp. A fiber runs until it waits at a barrier; the
// block's fibers take turns until all have returned (a thread that returns early no longer counts
// at the barriers, as on a GPU). Fibers, not OS threads: a block's 256 threads switch in
// nanoseconds, so whole decode steps run in tests.
// What this checks: indexing, tiling, shared memory, reductions, the arithmetic (IEEE f32 with
// fused multiply-adds, as on the GPU). What it cannot: speed, coalescing, races the barriers hide.
#pragma once

#if !defined(__x86_64__)
#error "the CUDA emulation switches fibers with x86-64 code"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// Saves the callee-saved registers on the current stack, stores its pointer in *from, and resumes
// the stack `to` (saved by an earlier switch, or prepared by emu::start).
extern "C" void emu_switch(void **from, void *to);
asm(R"(
    .text
    .p2align 4
    .local emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

namespace emu {
constexpr size_t STACK_BYTES = 64 * 1024;

// Barriers released and threads returned: a round of the scheduler that changes neither is a
// deadlock (every thread waits where the others never arrive).
inline uint64_t progress;

struct Barrier {
    unsigned expected = 0, arrived = 0;
    uint64_t generation = 0;
    void release_if_complete() {
        if (expected > 0 && arrived == expected) {
            arrived = 0;
            generation++;
            progress++;
        }
    }
};

struct Fiber {
    std::unique_ptr<char[]> stack = std::make_unique<char[]>(STACK_BYTES);
    void *sp = nullptr;
    bool done = false;
};

inline std::vector<Fiber> fibers;
inline void *scheduler_sp;
inline unsigned current;
inline const std::function<void()> *body;
inline Barrier block_barrier;
inline std::vector<Barrier> warp_barriers;
// Two exchange slots per thread, used in turn: a lane cannot overwrite a value before every lane
// of its warp has read it (that would take passing the next shuffle's barrier).
inline std::vector<uint64_t> exchange[2];
inline std::vector<unsigned> shuffles;

inline unsigned flat_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

inline void yield() { emu_switch(&fibers[current].sp, scheduler_sp); }

inline void arrive_and_wait(Barrier &b) {
    const uint64_t generation = b.generation;
    b.arrived++;
    b.release_if_complete();
    while (b.generation == generation) yield();
}

[[noreturn]] inline void fiber_main() {
    (*body)();
    const unsigned t = current;
    fibers[t].done = true;
    progress++;
    // A returned thread no longer counts at its block's and warp's barriers.
    block_barrier.expected--;
    block_barrier.release_if_complete();
    Barrier &warp = warp_barriers[t / 32];
    warp.expected--;
    warp.release_if_complete();
    void *unused;
    emu_switch(&unused, scheduler_sp);
    std::abort();  // never resumed
}

// Prepares fiber `t` to start in fiber_main: the registers emu_switch pops, then its address.
inline void start(unsigned t) {
    auto top = reinterpret_cast<uintptr_t>(fibers[t].stack.get() + STACK_BYTES) & ~uintptr_t{15};
    auto *sp = reinterpret_cast<uintptr_t *>(top);
    *--sp = 0;                                          // fiber_main's return address (never used)
    *--sp = reinterpret_cast<uintptr_t>(&fiber_main);  // emu_switch's `ret`
    for (int r = 0; r < 6; r++) *--sp = 0;              // rbp, rbx, r12..r15
    fibers[t].sp = sp;
    fibers[t].done = false;
}

// Runs `kernel()` (a lambda calling the __global__ function) over the grid, one block at a time.
template <class Kernel> void launch(dim3 grid, dim3 block, Kernel kernel) {
    const unsigned threads = block.x * block.y * block.z;
    const std::function<void()> run = kernel;
    body = &run;
    gridDim = grid;
    blockDim = block;
    if (fibers.size() < threads) fibers.resize(threads);
    for (auto &e : exchange) e.assign(threads, 0);
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = dim3{x, y, z};
                block_barrier = Barrier{threads};
                warp_barriers.assign((threads + 31) / 32, Barrier{});
                for (unsigned w = 0; w < warp_barriers.size(); w++) warp_barriers[w].expected = std::min(32u, threads - 32 * w);
                shuffles.assign(threads, 0);
                for (unsigned t = 0; t < threads; t++) start(t);
                // Threads take turns in one order, then the other (and odd blocks start reversed):
                // a read that lacks its barrier sees the write in one of the two orders and not in
                // the other, so it shows.
                const bool odd_block = (x + y + z) & 1;
                for (unsigned live = threads, round = 0; live > 0; round++) {
                    const uint64_t before = progress;
                    const bool reversed = odd_block != (round & 1);
                    live = 0;
                    for (unsigned i = 0; i < threads; i++) {
                        const unsigned t = reversed ? threads - 1 - i : i;
                        if (fibers[t].done) continue;
                        current = t;
                        threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        emu_switch(&scheduler_sp, fibers[t].sp);
                        live += !fibers[t].done;
                    }
                    if (live > 0 && progress == before) {
                        std::fprintf(stderr, "CUDA emulation: deadlock, %u threads of block (%u, %u, %u) wait at barriers\n", live, x, y, z);
                        std::abort();
                    }
                }
            }
}

template <class T> T shuffle(T v, unsigned source_lane) {
    static_assert(sizeof(T) <= sizeof(uint64_t));
    const unsigned t = flat_thread(), warp = t / 32;
    auto &slot = exchange[shuffles[t]++ & 1];
    std::memcpy(&slot[t], &v, sizeof(T));
    arrive_and_wait(warp_barriers[warp]);
    T out;
    std::memcpy(&out, &slot[warp * 32 + source_lane], sizeof(T));
    return out;
}
}  // namespace emu

inline void __syncthreads() { emu::arrive_and_wait(emu::block_barrier); }
template <class T> T __shfl_xor_sync(unsigned, T v, int mask) { return emu::shuffle(v, (emu::flat_thread() % 32) ^ mask); }
template <class T> T __shfl_sync(unsigned, T v, int lane) { return emu::shuffle(v, lane & 31); }
template <class T> T __ldg(const T *p) { return *p; }
// Fibers never preempt each other: an atomic is a plain read-modify-write.
inline unsigned atomicMin(unsigned *p, unsigned v) {
    const unsigned old = *p;
    *p = std::min(old, v);
    return old;
}
template <class T> T min(T a, T b) { return std::min(a, b); }
template <class T> T max(T a, T b) { return std::max(a, b); }
inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline float __int_as_float(unsigned v) { return __int_as_float((int)v); }
inline int __float_as_int(float f) {
    int v;
    std::memcpy(&v, &f, 4);
    return v;
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t bytes = (uint64_t)y << 32 | x;
    unsigned out = 0;
    for (int n = 0; n < 4; n++) out |= (unsigned)((bytes >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) << (8 * n);
    return out;
}
inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline float __expf(float v) { return std::exp(v); }
