// The rest of a decode step on an NVIDIA GPU, on f32 rows: RMSNorm, RoPE, the key/value cache,
// attention, SwiGLU, residual adds, biases, dense (float) linear layers, embedding rows of a float
// table, the greedy pick and a temperature draw. The same operations as kernels/src/ops.rs (and
// serve::sampling), equal up to f32 rounding (exp, the order of sums). Compiled to PTX like
// planar.cu (scripts/cuda-ptx.py).
//
// The key/value cache of one layer is an arena of `slots` sequences × `capacity` positions ×
// kv_dim values, position-major; row r of a step is position pos[r] of the sequence in slot[r].

#define OPS_BLOCK 256
// NVRTC has no math.h.
#define NEG_INFINITY __int_as_float(0xff800000u)

// Sum of `v` over the block (every thread gets it); `scratch` holds 32 floats. Every thread of
// the block must call it.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Maximum of `v` over the block, as block_sum.
__device__ __forceinline__ float block_max(float v, float *scratch) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : NEG_INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// out[r] = x[r] / sqrt(mean(x[r]²) + eps) · w. Grid: rows; block: OPS_BLOCK.
extern "C" __global__ void rms_norm(const float *x, const float *w, float eps, unsigned h, float *out) {
    __shared__ float scratch[32];
    const float *xr = x + (size_t)blockIdx.x * h;
    float *orow = out + (size_t)blockIdx.x * h;
    float ss = 0.0f;
    for (unsigned i = threadIdx.x; i < h; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)h + eps);
    for (unsigned i = threadIdx.x; i < h; i += blockDim.x) orow[i] = xr[i] * inv * w[i];
}

// x[i] += y[i]. Grid: ceil(n / OPS_BLOCK).
extern "C" __global__ void add_assign(float *x, const float *y, unsigned n) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// x[r][c] += bias[c] for rows of `width`. Grid: ceil(rows · width / OPS_BLOCK).
extern "C" __global__ void add_bias(float *x, const float *bias, unsigned n, unsigned width) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += bias[i % width];
}

// gate[i] = gate[i] / (1 + e^(−gate[i])) · up[i]. Grid: ceil(n / OPS_BLOCK).
extern "C" __global__ void silu_mul(float *gate, const float *up, unsigned n) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

// Rotate-half RoPE of every head of row r at position pos[r]: (a, b) ← (a·cos − b·sin, b·cos +
// a·sin) for the pairs (x[i], x[i + head_dim/2]), tables [positions, head_dim/2].
// Grid: rows; block: OPS_BLOCK. x: [rows, heads · head_dim].
extern "C" __global__ void rope(float *x, unsigned heads, unsigned head_dim, const unsigned *pos, const float *cos,
                                const float *sin) {
    const unsigned half = head_dim / 2;
    float *xr = x + (size_t)blockIdx.x * heads * head_dim;
    const float *c = cos + (size_t)pos[blockIdx.x] * half, *s = sin + (size_t)pos[blockIdx.x] * half;
    for (unsigned p = threadIdx.x; p < heads * half; p += blockDim.x) {
        const unsigned h = p / half, i = p % half;
        float *a = xr + h * head_dim + i, *b = a + half;
        const float x0 = *a, x1 = *b;
        *a = x0 * c[i] - x1 * s[i];
        *b = x1 * c[i] + x0 * s[i];
    }
}

// Keys and values of row r to position pos[r] of slot slot[r]. Grid: rows; block: OPS_BLOCK.
extern "C" __global__ void store_kv(const float *k, const float *v, unsigned kv_dim, const unsigned *slot,
                                    const unsigned *pos, unsigned capacity, float *kcache, float *vcache) {
    const size_t at = ((size_t)slot[blockIdx.x] * capacity + pos[blockIdx.x]) * kv_dim;
    for (unsigned i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kcache[at + i] = k[(size_t)blockIdx.x * kv_dim + i];
        vcache[at + i] = v[(size_t)blockIdx.x * kv_dim + i];
    }
}

// Causal attention of row r, head h (grid: rows × heads; block: OPS_BLOCK): the first pos[r] + 1
// positions of its slot, out_h = Σ_j softmax_j(q_h · k_j · scale) · v_j, key/value head
// h / (heads / kv_heads). `scores` is scratch of rows · heads · capacity values.
extern "C" __global__ void attend(const float *q, unsigned heads, unsigned kv_heads, unsigned head_dim,
                                  const unsigned *slot, const unsigned *pos, unsigned capacity, const float *kcache,
                                  const float *vcache, float scale, float *scores, float *out) {
    __shared__ float scratch[32];
    const unsigned r = blockIdx.x, h = blockIdx.y, g = h / (heads / kv_heads);
    const unsigned kv_dim = kv_heads * head_dim, len = pos[r] + 1;
    const size_t base = (size_t)slot[r] * capacity * kv_dim + (size_t)g * head_dim;
    const float *qh = q + ((size_t)r * heads + h) * head_dim;
    float *sc = scores + ((size_t)r * heads + h) * capacity;
    float mx = NEG_INFINITY;
    for (unsigned j = threadIdx.x; j < len; j += blockDim.x) {
        const float *kj = kcache + base + (size_t)j * kv_dim;
        float s = 0.0f;
        for (unsigned i = 0; i < head_dim; i++) s = fmaf(qh[i], kj[i], s);
        s *= scale;
        sc[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (unsigned j = threadIdx.x; j < len; j += blockDim.x) {
        const float e = expf(sc[j] - mx);
        sc[j] = e;
        sum += e;
    }
    const float inv = 1.0f / block_sum(sum, scratch);
    __syncthreads();  // every score written before any thread reads them all
    float *oh = out + ((size_t)r * heads + h) * head_dim;
    for (unsigned i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float a = 0.0f;
        for (unsigned j = 0; j < len; j++) a = fmaf(sc[j], vcache[base + (size_t)j * kv_dim + i], a);
        oh[i] = a * inv;
    }
}

// y[b][r] = Σ_c w[r][c] · x[b][c] for n ≤ 8 activation rows (a float linear layer): one warp per
// weight row, 8 rows per block. Grid: ceil(rows / 8); block: 256.
extern "C" __global__ void dense_matmul(const float *w, unsigned rows, unsigned cols, const float *x, unsigned n,
                                        float *y) {
    const unsigned lane = threadIdx.x & 31, row = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps: the shuffles below stay within one warp
    const float *wr = w + (size_t)row * cols;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (unsigned c = lane; c < cols; c += 32) {
        const float wv = wr[c];
        for (unsigned b = 0; b < n && b < 8; b++) acc[b] = fmaf(wv, x[(size_t)b * cols + c], acc[b]);
    }
    for (unsigned b = 0; b < 8; b++) {
        for (int o = 16; o > 0; o >>= 1) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], o);
        if (lane == 0 && b < n) y[(size_t)b * rows + row] = acc[b];
    }
}

// out[i] = table[ids[i]] (rows of `cols`): the embedding of a float table. Grid: n; block: OPS_BLOCK.
extern "C" __global__ void gather_rows(const float *table, unsigned cols, const unsigned *ids, float *out) {
    const float *src = table + (size_t)ids[blockIdx.x] * cols;
    for (unsigned c = threadIdx.x; c < cols; c += blockDim.x) out[(size_t)blockIdx.x * cols + c] = src[c];
}

// The index of each row's largest logit (the first on ties, NaN never chosen). Grid: rows; block:
// OPS_BLOCK.
extern "C" __global__ void argmax_rows(const float *logits, unsigned vocab, unsigned *out) {
    __shared__ float best_v[OPS_BLOCK];
    __shared__ unsigned best_i[OPS_BLOCK];
    const float *row = logits + (size_t)blockIdx.x * vocab;
    float bv = NEG_INFINITY;
    unsigned bi = 0xFFFFFFFFu;
    for (unsigned i = threadIdx.x; i < vocab; i += blockDim.x) {
        if (row[i] > bv) {
            bv = row[i];
            bi = i;
        }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float ov = best_v[threadIdx.x + s];
            const unsigned oi = best_i[threadIdx.x + s];
            if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0] == 0xFFFFFFFFu ? 0 : best_i[0];
}

// Row r's next token drawn from softmax(logits[r] · inv_t[r]) with the uniform u[r] ∈ [0, 1), as
// serve::sampling's plain sampler draws it on the host: weights e^((l − max) · inv_t), then the
// first token whose running sum of weights (in f64) reaches u · total. A row with inv_t[r] = 0 is
// greedy: argmax_rows's pick in `out` stands, as it does when rounding leaves no token reaching the
// target (the host falls back to the argmax too). Grid: rows; block: OPS_BLOCK.
extern "C" __global__ void sample_rows(const float *logits, unsigned vocab, const float *inv_t, const double *u,
                                       unsigned *out) {
    __shared__ float scratch[32];
    __shared__ double prefix[OPS_BLOCK + 1];
    __shared__ unsigned pick;
    const float t = inv_t[blockIdx.x];
    if (t == 0.0f) return;
    const float *row = logits + (size_t)blockIdx.x * vocab;
    float m = NEG_INFINITY;
    for (unsigned i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, row[i]);
    m = block_max(m, scratch);
    // Each thread sums a contiguous chunk; chunk sums in order give every chunk's starting sum.
    const unsigned per = (vocab + blockDim.x - 1) / blockDim.x;
    const unsigned c0 = min(threadIdx.x * per, vocab), c1 = min(c0 + per, vocab);
    double sum = 0.0;
    for (unsigned i = c0; i < c1; i++) sum += (double)expf((row[i] - m) * t);
    prefix[threadIdx.x + 1] = sum;
    if (threadIdx.x == 0) pick = 0xFFFFFFFFu;
    __syncthreads();
    if (threadIdx.x == 0) {
        prefix[0] = 0.0;
        for (unsigned k = 1; k <= blockDim.x; k++) prefix[k] += prefix[k - 1];
    }
    __syncthreads();
    const double target = u[blockIdx.x] * prefix[blockDim.x];
    if (threadIdx.x == 0 || prefix[threadIdx.x] < target) {
        double running = prefix[threadIdx.x];
        for (unsigned i = c0; i < c1; i++) {
            running += (double)expf((row[i] - m) * t);
            if (running >= target) {
                atomicMin(&pick, i);
                break;
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0 && pick != 0xFFFFFFFFu) out[blockIdx.x] = pick;
}
