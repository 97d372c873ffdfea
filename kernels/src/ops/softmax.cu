// softmax.cu: row-wise softmax and argmax, the CUDA half of ops/softmax.rs. Softmax: with the same steps as the CPU:
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

// argmax_rows_<t>(x, out, cols): grid = rows; out[r] = the index of row r's largest value, the
// lowest index among equal ones, or 0xffffffff when the row holds a NaN or an infinity (as the
// CPU). Each thread keeps its best (value, index) over its stride (indices rising, so the first of
// equal values), then the block keeps the larger value, and of equal values the lower index.
template <typename T>
__device__ void argmax_rows(const T* __restrict__ x, unsigned* __restrict__ out, unsigned int cols) {
    const T* row = x + (unsigned long long)blockIdx.x * cols;
    float best = -__int_as_float(0x7f800000);
    unsigned int index = 0xffffffffu;
    int bad = 0;
    for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = to_f32(row[j]);
        if (!isfinite(v)) bad = 1;
        else if (v > best || index == 0xffffffffu) {
            best = v;
            index = j;
        }
    }
    __shared__ float s_best[32];
    __shared__ unsigned int s_index[32];
    __shared__ int s_bad;
    if (threadIdx.x == 0) s_bad = 0;
    __syncthreads();
    if (bad) s_bad = 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float b = __shfl_xor_sync(0xffffffffu, best, offset);
        const unsigned int i = __shfl_xor_sync(0xffffffffu, index, offset);
        if (i != 0xffffffffu && (index == 0xffffffffu || b > best || (b == best && i < index))) {
            best = b;
            index = i;
        }
    }
    if (lane == 0) {
        s_best[warp] = best;
        s_index[warp] = index;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
            const float b = s_best[w];
            const unsigned int i = s_index[w];
            if (i != 0xffffffffu && (index == 0xffffffffu || b > best || (b == best && i < index))) {
                best = b;
                index = i;
            }
        }
        out[blockIdx.x] = s_bad ? 0xffffffffu : index;
    }
}

#define ARGMAX_ROWS(T)                                                                                  \
    extern "C" __global__ void argmax_rows_##T(const T* __restrict__ x, unsigned* __restrict__ out,     \
                                               unsigned int cols) {                                     \
        argmax_rows<T>(x, out, cols);                                                                   \
    }
FOR_EACH_DTYPE(ARGMAX_ROWS)
