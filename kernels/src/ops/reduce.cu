// reduce.cu: per-column mean of |x| (AWQ's x_mean) and the largest |x|, the CUDA half of
// ops/reduce.rs.
//
// Mean: two launches with a fixed split, so the result does not depend on the device or the launch
// shape: mean_abs_columns_partial_<t> sums |x| in f64 over chunks of `rows_per_chunk` rows (grid.y
// is the chunk, one thread per column, so a warp reads consecutive columns of one row), then
// mean_abs_columns_finish adds the chunks' sums in order and divides by the row count.
#include "common.cuh"

#define MEAN_ABS_PARTIAL(T)                                                                             \
    extern "C" __global__ void mean_abs_columns_partial_##T(const T* __restrict__ x,                    \
                                                            double* __restrict__ partial,               \
                                                            unsigned int rows, unsigned int cols,       \
                                                            unsigned int rows_per_chunk) {              \
        const unsigned int col = blockIdx.x * blockDim.x + threadIdx.x;                                 \
        if (col >= cols) return;                                                                        \
        const unsigned int start = blockIdx.y * rows_per_chunk;                                         \
        const unsigned int end = min(rows, start + rows_per_chunk);                                     \
        double s = 0.0;                                                                                 \
        for (unsigned int r = start; r < end; ++r)                                                      \
            s += fabs((double)to_f32(x[(unsigned long long)r * cols + col]));                           \
        partial[(unsigned long long)blockIdx.y * cols + col] = s;                                       \
    }
FOR_EACH_DTYPE(MEAN_ABS_PARTIAL)

extern "C" __global__ void mean_abs_columns_finish(const double* __restrict__ partial,
                                                   float* __restrict__ out, unsigned int n_chunks,
                                                   unsigned int cols, unsigned int rows) {
    const unsigned int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    double s = 0.0;
    for (unsigned int c = 0; c < n_chunks; ++c) s += partial[(unsigned long long)c * cols + col];
    out[col] = (float)(s / (double)rows);
}

// max_abs_partial_<t>(x, partial, n): partial[block] = max |x| over the block's grid-stride share
// of the n values (0 when the share is empty or all NaN, as the CPU's fold from 0 with f32::max).
// The host folds the partials; a maximum is exact, so the result equals the CPU's bit for bit.
#define MAX_ABS_PARTIAL(T)                                                                              \
    extern "C" __global__ void max_abs_partial_##T(const T* __restrict__ x, float* __restrict__ partial, \
                                                   unsigned long long n) {                              \
        float m = 0.0f;                                                                                 \
        GRID_STRIDE(i, n) m = fmaxf(m, fabsf(to_f32(x[i])));                                            \
        m = block_max(m);                                                                               \
        if (threadIdx.x == 0) partial[blockIdx.x] = m;                                                  \
    }
FOR_EACH_DTYPE(MAX_ABS_PARTIAL)

// squared_distance_partial_<t>(a, b, partial, n): partial[block] = sum of (a - b)^2 in f64 over
// the block's grid-stride share. The host adds the partials in block order: deterministic.
#define SQUARED_DISTANCE_PARTIAL(T)                                                                     \
    extern "C" __global__ void squared_distance_partial_##T(const T* __restrict__ a, const T* __restrict__ b, \
                                                            double* __restrict__ partial, unsigned long long n) { \
        double s = 0.0;                                                                                 \
        GRID_STRIDE(i, n) {                                                                             \
            const double d = (double)(to_f32(a[i]) - to_f32(b[i]));                                     \
            s += d * d;                                                                                 \
        }                                                                                               \
        s = block_sum(s);                                                                               \
        if (threadIdx.x == 0) partial[blockIdx.x] = s;                                                  \
    }
FOR_EACH_DTYPE(SQUARED_DISTANCE_PARTIAL)
