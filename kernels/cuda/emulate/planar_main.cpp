// planar.cu on the CPU (see cuda_shim.h). Reads one matmul from stdin, writes y to stdout:
//   u32 bits, rows, cols, wpr, plane_stride, n_groups, group, has_d, n, n_words, row_begin, row_end
//   u32 words[n_words]; f32 scales[rows · n_groups]; f32 x[n · cols]
// and launches as kernels::cuda does: grid ceil((row_end − row_begin) / WARPS), WARPS·32 threads,
// one launch per MAX_ROWS activation rows; y's rows outside the range stay 0.
#include "cuda_shim.h"

#include "../planar.cu"

#include <cstdio>

static void read_exact(void *p, size_t bytes) {
    if (std::fread(p, 1, bytes, stdin) != bytes) {
        std::fprintf(stderr, "short input\n");
        std::exit(2);
    }
}

int main() {
    unsigned h[12];
    read_exact(h, sizeof h);
    const unsigned bits = h[0], rows = h[1], cols = h[2], wpr = h[3], plane_stride = h[4], n_groups = h[5],
                   group = h[6], n = h[8], n_words = h[9], row_begin = h[10], row_end = h[11];
    const int has_d = (int)h[7];
    std::vector<unsigned> words(n_words);
    std::vector<float> scales((size_t)rows * n_groups), x((size_t)n * cols), y((size_t)n * rows);
    read_exact(words.data(), words.size() * 4);
    read_exact(scales.data(), scales.size() * 4);
    read_exact(x.data(), x.size() * 4);
    using Entry = void (*)(const unsigned *, unsigned, unsigned, const float *, unsigned, unsigned, unsigned, unsigned,
                           unsigned, unsigned, int, const float *, unsigned, float *);
    const Entry entries[] = {planar_matmul_f32_b2, planar_matmul_f32_b3, planar_matmul_f32_b4, planar_matmul_f32_b5,
                             planar_matmul_f32_b6, planar_matmul_f32_b7, planar_matmul_f32_b8};
    const Entry entry = entries[bits - 2];
    for (unsigned start = 0; start < n; start += MAX_ROWS) {
        const unsigned len = std::min<unsigned>(MAX_ROWS, n - start);
        const float *xc = x.data() + (size_t)start * cols;
        float *yc = y.data() + (size_t)start * rows;
        emu::launch(dim3{(row_end - row_begin + WARPS - 1) / WARPS}, dim3{WARPS * 32}, [&] {
            entry(words.data(), plane_stride, wpr, scales.data(), n_groups, group, row_begin, row_end, rows, cols, has_d,
                  xc, len, yc);
        });
    }
    std::fwrite(y.data(), 4, y.size(), stdout);
    return 0;
}
