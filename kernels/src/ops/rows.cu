// rows.cu: the weighted scatter-add of a mixture of experts' outputs into their tokens' rows, the
// CUDA half of ops/rows.rs (the gather is embedding.cu's kernel).
//
// One thread per value of src (grid-stride). The rows of one call are distinct (checked on the
// host), so each value of out has one writer. Product and sum rounded apart (__fmul_rn, __fadd_rn:
// never contracted into an fma), then once to out's dtype: the CPU's bits.
#include "common.cuh"

// scatter_add_rows_<out>_<src>(out, src, rows, w, n, c): out[rows[i], k] += w[i] * src[i, k] over
// n = len(rows) * c.
#define SCATTER_ADD_ROWS(O, S)                                                                          \
    extern "C" __global__ void scatter_add_rows_##O##_##S(O* __restrict__ out, const S* __restrict__ src, \
                                                          const unsigned int* __restrict__ rows,       \
                                                          const float* __restrict__ w,                 \
                                                          unsigned long long n, unsigned int c) {      \
        GRID_STRIDE(e, n) {                                                                             \
            const unsigned long long i = e / c;                                                         \
            const unsigned long long at = (unsigned long long)rows[i] * c + e % c;                      \
            out[at] = from_f32<O>(__fadd_rn(to_f32(out[at]), __fmul_rn(w[i], to_f32(src[e]))));         \
        }                                                                                               \
    }
FOR_EACH_DTYPE_PAIR(SCATTER_ADD_ROWS)
