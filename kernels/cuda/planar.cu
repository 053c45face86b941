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
// column (padding codes decode to q = 0 anyway).
//
// Decoding, 4 weights at a time (no per-weight bit loop): nibble t of each plane word is spread
// to the low bit of 4 bytes by one multiply (spread4), the planes are accumulated most significant
// first (u = 2·u + spread4), so byte i of u is u_l of column 4t + i (< 256: every byte stays
// below 128 before its last doubling, and u_8 + d ≤ 255). Each byte becomes a float by placing it
// in the mantissa of 2^23 (one byte permute) and subtracting 2^23 + 2^(l−1): q_l exactly, without
// an integer-to-float conversion. Lane i visits its 8 nibbles starting at (t + i) mod 8, so the
// 128-bit shared-memory loads of its 4 activations hit distinct banks within each quarter-warp.

#define WARPS 8
#define TILE_WORDS 32
#define TILE_COLS (TILE_WORDS * 32)
#define MAX_ROWS 8

// Bits 0..3 of `nibble` to bit 0 of bytes 0..3.
__device__ __forceinline__ unsigned spread4(unsigned nibble) { return (nibble * 0x00204081u) & 0x01010101u; }

// u_l of columns 4t .. 4t+3 of a word, one per byte.
template <int BITS>
__device__ __forceinline__ unsigned decode4(const unsigned (&top)[BITS], unsigned carry, unsigned t) {
    const unsigned shift = 4 * t;
    unsigned u = 0;
#pragma unroll
    for (int k = 0; k < BITS; k++) u = 2 * u + spread4((top[k] >> shift) & 15u);
    return u + spread4((carry >> shift) & 15u);
}

// Word w of a row (`base`: the row's first word of plane 0) at BITS: its top planes, most
// significant first, into `top`; returns the carry word (the rounding bit where the top bits are
// not all ones, below 8 bits; the d plane at 8).
template <int BITS>
__device__ __forceinline__ unsigned load_word(const unsigned *__restrict__ base, unsigned plane_stride, unsigned w,
                                              int has_d, unsigned (&top)[BITS]) {
    unsigned all_ones = ~0u;
#pragma unroll
    for (int k = 0; k < BITS; k++) {
        top[k] = __ldg(base + (size_t)(7 - k) * plane_stride + w);
        all_ones &= top[k];
    }
    if (BITS < 8) return __ldg(base + (size_t)(7 - BITS) * plane_stride + w) & ~all_ones;
    return has_d ? __ldg(base + (size_t)8 * plane_stride + w) : 0u;
}

// Byte i of u as 2^23 + byte (the float whose mantissa holds it).
__device__ __forceinline__ float byte_as_float(unsigned u, unsigned i) {
    return __int_as_float(__byte_perm(u, 0x4B000000u, 0x7540u | i));
}

template <int BITS>
__device__ __forceinline__ void planar_matmul(const unsigned *__restrict__ planes, unsigned plane_stride,
                                              unsigned wpr, const float *__restrict__ scales, unsigned n_groups,
                                              unsigned group, unsigned row_begin, unsigned row_end, unsigned rows,
                                              unsigned cols, int has_d, const float *__restrict__ x, unsigned n,
                                              float *__restrict__ y) {
    __shared__ __align__(16) float xs[MAX_ROWS][TILE_COLS];
    const unsigned lane = threadIdx.x & 31;
    const unsigned row = row_begin + blockIdx.x * WARPS + (threadIdx.x >> 5);
    const bool active = row < row_end;
    // 2^23 + 2^(l−1): byte_as_float(u_l) minus this is q_l.
    const float offset = 8388608.0f + (float)(1 << (BITS - 1));
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
        const unsigned carry = load_word<BITS>(base, plane_stride, w, has_d, top);

        const unsigned c0 = w * 32;
        const unsigned last = min(c0 + 31, cols - 1);
        const bool one_group = c0 / group == last / group;
        float part[MAX_ROWS];
#pragma unroll
        for (int b = 0; b < MAX_ROWS; b++) part[b] = 0.0f;
#pragma unroll
        for (unsigned tt = 0; tt < 8; tt++) {
            const unsigned t = (tt + lane) & 7;
            const unsigned u = decode4<BITS>(top, carry, t);
            float q[4];
#pragma unroll
            for (unsigned i = 0; i < 4; i++) q[i] = byte_as_float(u, i) - offset;
            if (!one_group) {
                // Groups narrower than a word (or straddling one): each weight scaled on its own.
#pragma unroll
                for (unsigned i = 0; i < 4; i++) q[i] *= step * srow[min((c0 + 4 * t + i) / group, n_groups - 1)];
            }
#pragma unroll
            for (int b = 0; b < MAX_ROWS; b++) {
                if (b < (int)n) {
                    const float4 xv = *reinterpret_cast<const float4 *>(&xs[b][lane * 32 + 4 * t]);
                    part[b] = fmaf(q[0], xv.x, part[b]);
                    part[b] = fmaf(q[1], xv.y, part[b]);
                    part[b] = fmaf(q[2], xv.z, part[b]);
                    part[b] = fmaf(q[3], xv.w, part[b]);
                }
            }
        }
        // One scale group for the whole word: the integer-valued partial sums take it once.
        const float s = one_group ? srow[c0 / group] * step : 1.0f;
#pragma unroll
        for (int b = 0; b < MAX_ROWS; b++) acc[b] = fmaf(part[b], s, acc[b]);
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

// One entry point per precision, so the plane loops unroll. Computes the outputs of weight rows
// row_begin .. row_end of `rows` (a weight whose leading rows are served at another precision takes
// two launches). Launch: grid ceil((row_end − row_begin) / WARPS), block 32·WARPS threads,
// 1 ≤ n ≤ MAX_ROWS activation rows (x: [n, cols], y: [n, rows]).
#define PLANAR_MATMUL_ENTRY(B)                                                                                   \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) planar_matmul_f32_b##B(                             \
        const unsigned *planes, unsigned plane_stride, unsigned wpr, const float *scales, unsigned n_groups,       \
        unsigned group, unsigned row_begin, unsigned row_end, unsigned rows, unsigned cols, int has_d,            \
        const float *x, unsigned n, float *y) {                                                                   \
        planar_matmul<B>(planes, plane_stride, wpr, scales, n_groups, group, row_begin, row_end, rows, cols, has_d, \
                         x, n, y);                                                                                \
    }

PLANAR_MATMUL_ENTRY(2)
PLANAR_MATMUL_ENTRY(3)
PLANAR_MATMUL_ENTRY(4)
PLANAR_MATMUL_ENTRY(5)
PLANAR_MATMUL_ENTRY(6)
PLANAR_MATMUL_ENTRY(7)
PLANAR_MATMUL_ENTRY(8)

// Rows `ids[i]` of a weight served at BITS, dequantized exactly as the CPU's
// PlanarWeight::dequantize_rows does ((q_l · 2^Δ) · s, bit for bit): an embedding lookup. Only
// the ids within row_begin .. row_end are written (the others are left for the launch at their
// own precision). Launch: grid n (one block per id), any block size; out: [n, cols].
template <int BITS>
__device__ __forceinline__ void planar_rows(const unsigned *__restrict__ planes, unsigned plane_stride, unsigned wpr,
                                            const float *__restrict__ scales, unsigned n_groups, unsigned group,
                                            unsigned row_begin, unsigned row_end, unsigned cols, int has_d,
                                            const unsigned *__restrict__ ids, float *__restrict__ out) {
    const unsigned row = ids[blockIdx.x];
    if (row < row_begin || row >= row_end) return;
    const unsigned *base = planes + (size_t)row * wpr;
    const float *srow = scales + (size_t)row * n_groups;
    float *orow = out + (size_t)blockIdx.x * cols;
    const float offset = 8388608.0f + (float)(1 << (BITS - 1));
    const float step = (float)(1 << (8 - BITS));
    for (unsigned w = threadIdx.x; w < wpr; w += blockDim.x) {
        unsigned top[BITS];
        const unsigned carry = load_word<BITS>(base, plane_stride, w, has_d, top);
        for (unsigned t = 0; t < 8; t++) {
            const unsigned u = decode4<BITS>(top, carry, t);
#pragma unroll
            for (unsigned i = 0; i < 4; i++) {
                const unsigned c = w * 32 + 4 * t + i;
                if (c < cols) orow[c] = ((byte_as_float(u, i) - offset) * step) * srow[c / group];
            }
        }
    }
}

#define PLANAR_ROWS_ENTRY(B)                                                                                     \
    extern "C" __global__ void planar_rows_f32_b##B(                                                                \
        const unsigned *planes, unsigned plane_stride, unsigned wpr, const float *scales, unsigned n_groups,         \
        unsigned group, unsigned row_begin, unsigned row_end, unsigned cols, int has_d, const unsigned *ids,         \
        float *out) {                                                                                               \
        planar_rows<B>(planes, plane_stride, wpr, scales, n_groups, group, row_begin, row_end, cols, has_d, ids, out); \
    }

PLANAR_ROWS_ENTRY(2)
PLANAR_ROWS_ENTRY(3)
PLANAR_ROWS_ENTRY(4)
PLANAR_ROWS_ENTRY(5)
PLANAR_ROWS_ENTRY(6)
PLANAR_ROWS_ENTRY(7)
PLANAR_ROWS_ENTRY(8)
