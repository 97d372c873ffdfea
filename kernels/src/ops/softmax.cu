// softmax.cu: row-wise softmax, the CUDA half of ops/softmax.rs, with the same steps as the CPU:
// the row maximum in f32, e = expf(x - max) in f32, their sum in f64, then e * (float)(1 / sum).
//
// One block per row; blockDim.x (a multiple of 32, at most 1024) threads stride the row three
// times (max, sum, write). The exponentials are recomputed in the last pass rather than stored: an
// output in f16/bf16 could not hold them without a second rounding.
#include "common.cuh"

template <typename T>
__device__ void softmax_rows(const T* __restrict__ x, T* __restrict__ out, unsigned int cols) {
    const T* row = x + (unsigned long long)blockIdx.x * cols;
    T* dst = out + (unsigned long long)blockIdx.x * cols;
    float max = -__int_as_float(0x7f800000);
    for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) max = fmaxf(max, to_f32(row[j]));
    max = block_max(max);
    double sum = 0.0;
    for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) sum += (double)expf(to_f32(row[j]) - max);
    sum = block_sum(sum);
    const float inv = (float)(1.0 / sum);
    for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) dst[j] = from_f32<T>(expf(to_f32(row[j]) - max) * inv);
}

// softmax_rows_<t>(x, out, cols): grid = rows, output in x's dtype.
#define SOFTMAX_ROWS(T)                                                                                 \
    extern "C" __global__ void softmax_rows_##T(const T* __restrict__ x, T* __restrict__ out,           \
                                                unsigned int cols) {                                    \
        softmax_rows<T>(x, out, cols);                                                                  \
    }
FOR_EACH_DTYPE(SOFTMAX_ROWS)
