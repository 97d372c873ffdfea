// linear.cu: the helper kernel of ops/linear.rs (the product itself is cuBLAS).
#include "common.cuh"

// broadcast_rows_<t>(bias, out, n, cols): out[r, c] = bias[c] over n = rows * cols values; fills the
// output with the bias before a GEMM with beta = 1.
#define BROADCAST_ROWS(T)                                                                               \
    extern "C" __global__ void broadcast_rows_##T(const T* __restrict__ bias, T* __restrict__ out,      \
                                                  unsigned long long n, unsigned int cols) {            \
        GRID_STRIDE(i, n) out[i] = bias[i % cols];                                                      \
    }
FOR_EACH_DTYPE(BROADCAST_ROWS)
