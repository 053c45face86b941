// Runs CUDA C kernels on the CPU, so that the kernels' own source is tested where there is no GPU
// (kernels/src/cuda/tests.rs compiles kernels/cuda/emulate/*.cpp with the host C++ compiler).
//
// One block at a time, each of its threads a std::thread: `__shared__` variables become function
// statics (shared by the block's threads, reused by the next block), `__syncthreads` a barrier of
// the block, the warp shuffles an exchange through memory between two barriers of the warp.
// What this checks: indexing, tiling, shared memory, reductions, the arithmetic (IEEE f32 with
// fused multiply-adds, as on the GPU). What it cannot: speed, coalescing, races the barriers hide.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
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

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

namespace emu {
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<uint64_t> exchange;

inline unsigned flat_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

// Runs `kernel()` (a lambda calling the __global__ function) over the grid, one block at a time.
template <class Kernel> void launch(dim3 grid, dim3 block, Kernel kernel) {
    const unsigned threads = block.x * block.y * block.z;
    gridDim = grid;
    blockDim = block;
    exchange.assign(threads, 0);
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = dim3{x, y, z};
                block_barrier = std::make_unique<std::barrier<>>(threads);
                warp_barriers.clear();
                for (unsigned w = 0; w < (threads + 31) / 32; w++)
                    warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads; t++)
                    pool.emplace_back([=] {
                        threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        kernel();
                    });
                for (auto &th : pool) th.join();
            }
}

template <class T> T shuffle(T v, unsigned source_lane) {
    static_assert(sizeof(T) <= sizeof(uint64_t));
    const unsigned t = flat_thread(), warp = t / 32;
    std::memcpy(&exchange[t], &v, sizeof(T));
    warp_barriers[warp]->arrive_and_wait();
    T out;
    std::memcpy(&out, &exchange[warp * 32 + source_lane], sizeof(T));
    warp_barriers[warp]->arrive_and_wait();
    return out;
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int mask) { return emu::shuffle(v, (emu::flat_thread() % 32) ^ mask); }
template <class T> T __shfl_sync(unsigned, T v, int lane) { return emu::shuffle(v, lane & 31); }
template <class T> T __ldg(const T *p) { return *p; }
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
