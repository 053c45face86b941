// Bit-plane matmul kernels for NVIDIA GPUs: y = X · Ŵ_lᵀ at every precision l ∈ 2..8 from the one
// resident copy of the planes (the layout of kernels/src/planar/mod.rs, read as 32-bit words).
//
// Compiled to PTX by scripts/cuda-ptx.py with a pinned NVRTC (the PTX is committed beside this
// file and loaded through the driver, so running needs only the NVIDIA driver); CI checks that
// the committed PTX is what this source compiles to, and assembles it for sm_80 and sm_90.
//
// Layout, in 32-bit words (little-endian halves of the CPU's 64-bit words): plane p of row r is
// the `wpr` words at planes[p·plane_stride + r·wpr]; bit j of word w is column 32·w + j; planes
// 0..7 hold the bits of u = r + 128 (offset binary of the tie-adjusted code), plane 8 the HalfEven
// d bit. Precision l reads the top planes 7 … 8−l and the rounding plane 7−l (l < 8), or the d
// plane (l = 8, when stored):
//   carry  = round & ~(top_0 & … & top_{l−1})          (saturation, in the mask domain)
//   u_l[j] = Σ_k bit_j(top_k)·2^(l−1−k) + bit_j(carry)
//   q_l[j] = u_l[j] − 2^(l−1)
// and the weight is q_l · 2^(8−l) · s_g (s_g: the scale of the group holding column j).
//
// Work split: a block of WARPS warps serves WARPS consecutive weight rows, one warp per row; the
// columns are walked in tiles of 32 words (1024 columns), lane i taking word i of the tile, so the
// warp's plane loads are coalesced (32 consecutive words, 128 bytes per plane). The tile's
// activations (up to MAX_ROWS activation rows) are staged in shared memory, zero past the last
// column (padding codes decode to q = 0 anyway). Lane i reads its 32 columns starting at
// column (j + i) mod 32, so the 32 lanes of a warp hit 32 different shared-memory banks.

#define WARPS 8
#define TILE_WORDS 32
#define TILE_COLS (TILE_WORDS * 32)
#define MAX_ROWS 8

template <int BITS>
__device__ __forceinline__ void planar_matmul(const unsigned *__restrict__ planes, unsigned plane_stride,
                                              unsigned wpr, const float *__restrict__ scales, unsigned n_groups,
                                              unsigned group, unsigned rows, unsigned cols, int has_d,
                                              const float *__restrict__ x, unsigned n, float *__restrict__ y) {
    __shared__ float xs[MAX_ROWS][TILE_COLS];
    const unsigned lane = threadIdx.x & 31;
    const unsigned row = blockIdx.x * WARPS + (threadIdx.x >> 5);
    const bool active = row < rows;
    const int half = 1 << (BITS - 1);
    const float step = (float)(1 << (8 - BITS));
    const unsigned *base = planes + (size_t)row * wpr;
    const float *srow = scales + (size_t)row * n_groups;
    float acc[MAX_ROWS];
#pragma unroll
    for (int b = 0; b < MAX_ROWS; b++) acc[b] = 0.0f;

    for (unsigned tile = 0; tile < wpr; tile += TILE_WORDS) {
        const unsigned col0 = tile * 32;
        __syncthreads();
        for (unsigned i = threadIdx.x; i < n * TILE_COLS; i += blockDim.x) {
            const unsigned b = i / TILE_COLS, c = i % TILE_COLS;
            xs[b][c] = col0 + c < cols ? x[(size_t)b * cols + col0 + c] : 0.0f;
        }
        __syncthreads();
        const unsigned w = tile + lane;
        if (!active || w >= wpr) continue;

        unsigned top[BITS];
        unsigned all_ones = ~0u;
#pragma unroll
        for (int k = 0; k < BITS; k++) {
            top[k] = __ldg(base + (size_t)(7 - k) * plane_stride + w);
            all_ones &= top[k];
        }
        unsigned carry = 0;
        if (BITS < 8) {
            carry = __ldg(base + (size_t)(7 - BITS) * plane_stride + w) & ~all_ones;
        } else if (has_d) {
            carry = __ldg(base + (size_t)8 * plane_stride + w);
        }

        const unsigned c0 = w * 32;
        const unsigned last = min(c0 + 31, cols - 1);
        const float *xt = &xs[0][lane * 32];
        if (c0 / group == last / group) {
            // One scale group for the whole word: integer-valued partial sums, one scale.
            float part[MAX_ROWS];
#pragma unroll
            for (int b = 0; b < MAX_ROWS; b++) part[b] = 0.0f;
#pragma unroll 8
            for (unsigned jj = 0; jj < 32; jj++) {
                const unsigned j = (jj + lane) & 31;
                int u = 0;
#pragma unroll
                for (int k = 0; k < BITS; k++) u = (u << 1) | ((top[k] >> j) & 1);
                const float q = (float)(u + (int)((carry >> j) & 1) - half);
#pragma unroll
                for (int b = 0; b < MAX_ROWS; b++)
                    if (b < (int)n) part[b] = fmaf(q, xt[b * TILE_COLS + j], part[b]);
            }
            const float s = srow[c0 / group] * step;
#pragma unroll
            for (int b = 0; b < MAX_ROWS; b++) acc[b] = fmaf(part[b], s, acc[b]);
        } else {
            // Groups narrower than a word (or straddling one): a scale per column.
            for (unsigned jj = 0; jj < 32; jj++) {
                const unsigned j = (jj + lane) & 31;
                int u = 0;
#pragma unroll
                for (int k = 0; k < BITS; k++) u = (u << 1) | ((top[k] >> j) & 1);
                const float q = (float)(u + (int)((carry >> j) & 1) - half);
                const float wq = q * step * srow[min((c0 + j) / group, n_groups - 1)];
#pragma unroll
                for (int b = 0; b < MAX_ROWS; b++)
                    if (b < (int)n) acc[b] = fmaf(wq, xt[b * TILE_COLS + j], acc[b]);
            }
        }
    }

#pragma unroll
    for (int b = 0; b < MAX_ROWS; b++) {
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], offset);
    }
    if (active && lane == 0) {
#pragma unroll
        for (int b = 0; b < MAX_ROWS; b++)
            if (b < (int)n) y[(size_t)b * rows + row] = acc[b];
    }
}

// One entry point per precision, so the plane loops unroll. Launch: grid ceil(rows / WARPS),
// block 32·WARPS threads, 1 ≤ n ≤ MAX_ROWS activation rows (x: [n, cols], y: [n, rows]).
#define PLANAR_MATMUL_ENTRY(B)                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) planar_matmul_f32_b##B(                       \
        const unsigned *planes, unsigned plane_stride, unsigned wpr, const float *scales, unsigned n_groups, \
        unsigned group, unsigned rows, unsigned cols, int has_d, const float *x, unsigned n, float *y) {     \
        planar_matmul<B>(planes, plane_stride, wpr, scales, n_groups, group, rows, cols, has_d, x, n, y);    \
    }

PLANAR_MATMUL_ENTRY(2)
PLANAR_MATMUL_ENTRY(3)
PLANAR_MATMUL_ENTRY(4)
PLANAR_MATMUL_ENTRY(5)
PLANAR_MATMUL_ENTRY(6)
PLANAR_MATMUL_ENTRY(7)
PLANAR_MATMUL_ENTRY(8)
