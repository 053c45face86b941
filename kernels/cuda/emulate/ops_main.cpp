// ops.cu and planar.cu's row gather on the CPU (see cuda_shim.h), one kernel per run, launched as
// kernels::cuda launches it. Input (stdin, little-endian): u32 op, u32 count and that many u32
// scalars, u32 count and that many arrays (u32 kind: 0 f32, 1 u32; u32 length; the values). Output
// (stdout): every array again, as the kernel left it.
#include "cuda_shim.h"

#include "../ops.cu"
#include "../planar.cu"

#include <cstdio>
#include <string>

static void read_exact(void *p, size_t bytes) {
    if (std::fread(p, 1, bytes, stdin) != bytes) {
        std::fprintf(stderr, "short input\n");
        std::exit(2);
    }
}

static unsigned read_u32() {
    unsigned v;
    read_exact(&v, 4);
    return v;
}

struct Array {
    unsigned kind;
    std::vector<unsigned> words;
    float *f() { return reinterpret_cast<float *>(words.data()); }
    unsigned *u() { return words.data(); }
};

static float as_f32(unsigned bits) { return __int_as_float(bits); }

int main() {
    const unsigned op = read_u32();
    std::vector<unsigned> s(read_u32());
    for (auto &v : s) v = read_u32();
    std::vector<Array> a(read_u32());
    for (auto &arr : a) {
        arr.kind = read_u32();
        arr.words.resize(read_u32());
        read_exact(arr.words.data(), arr.words.size() * 4);
    }
    const dim3 block{OPS_BLOCK};
    const auto blocks = [](unsigned n) { return dim3{(n + OPS_BLOCK - 1) / OPS_BLOCK}; };
    switch (op) {
    case 0:  // rms_norm: s = rows, h, eps bits; a = x, w, out
        emu::launch(dim3{s[0]}, block, [&] { rms_norm(a[0].f(), a[1].f(), as_f32(s[2]), s[1], a[2].f()); });
        break;
    case 1:  // add_assign: s = n; a = x, y
        emu::launch(blocks(s[0]), block, [&] { add_assign(a[0].f(), a[1].f(), s[0]); });
        break;
    case 2:  // add_bias: s = n, width; a = x, bias
        emu::launch(blocks(s[0]), block, [&] { add_bias(a[0].f(), a[1].f(), s[0], s[1]); });
        break;
    case 3:  // silu_mul: s = n; a = gate, up
        emu::launch(blocks(s[0]), block, [&] { silu_mul(a[0].f(), a[1].f(), s[0]); });
        break;
    case 4:  // rope: s = rows, heads, head_dim; a = x, pos, cos, sin
        emu::launch(dim3{s[0]}, block, [&] { rope(a[0].f(), s[1], s[2], a[1].u(), a[2].f(), a[3].f()); });
        break;
    case 5:  // store_kv then attend: s = rows, heads, kv_heads, head_dim, capacity, scale bits;
             // a = q, k, v, slot, pos, kcache, vcache, scores, out
        emu::launch(dim3{s[0]}, block, [&] {
            store_kv(a[1].f(), a[2].f(), s[2] * s[3], a[3].u(), a[4].u(), s[4], a[5].f(), a[6].f());
        });
        emu::launch(dim3{s[0], s[1]}, block, [&] {
            attend(a[0].f(), s[1], s[2], s[3], a[3].u(), a[4].u(), s[4], a[5].f(), a[6].f(), as_f32(s[5]), a[7].f(),
                   a[8].f());
        });
        break;
    case 6:  // dense_matmul: s = rows, cols, n; a = w, x, y
        emu::launch(dim3{(s[0] + 7) / 8}, dim3{256}, [&] { dense_matmul(a[0].f(), s[0], s[1], a[1].f(), s[2], a[2].f()); });
        break;
    case 7:  // gather_rows: s = n, cols; a = table, ids, out
        emu::launch(dim3{s[0]}, block, [&] { gather_rows(a[0].f(), s[1], a[1].u(), a[2].f()); });
        break;
    case 8:  // argmax_rows: s = rows, vocab; a = logits, out
        emu::launch(dim3{s[0]}, block, [&] { argmax_rows(a[0].f(), s[1], a[1].u()); });
        break;
    case 9: {  // planar_rows: s = bits, n, plane_stride, wpr, n_groups, group, cols, has_d, row_begin, row_end;
               // a = planes, scales, ids, out
        using Entry = void (*)(const unsigned *, unsigned, unsigned, const float *, unsigned, unsigned, unsigned,
                               unsigned, unsigned, int, const unsigned *, float *);
        const Entry entries[] = {planar_rows_f32_b2, planar_rows_f32_b3, planar_rows_f32_b4, planar_rows_f32_b5,
                                 planar_rows_f32_b6, planar_rows_f32_b7, planar_rows_f32_b8};
        emu::launch(dim3{s[1]}, dim3{64}, [&] {
            entries[s[0] - 2](a[0].u(), s[2], s[3], a[1].f(), s[4], s[5], s[8], s[9], s[6], (int)s[7], a[2].u(),
                              a[3].f());
        });
        break;
    }
    default:
        std::fprintf(stderr, "unknown op %u\n", op);
        return 2;
    }
    for (auto &arr : a) std::fwrite(arr.words.data(), 4, arr.words.size(), stdout);
    return 0;
}
