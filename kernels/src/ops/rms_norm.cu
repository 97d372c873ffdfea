// rms_norm.cu: y = x / sqrt(mean(x^2) + eps) * w, row by row; the CUDA half of ops/rms_norm.rs.
//
// One block per row; blockDim.x (a multiple of 32, at most 1024) threads stride the row. The sum of
// squares is accumulated in f32 per thread and reduced across the block; the inverse root is taken
// in f64, as the CPU reference does.
#include "common.cuh"

template <typename X, typename W, typename O>
__device__ void rms_norm(const X* __restrict__ x, const W* __restrict__ w, O* __restrict__ out,
                         unsigned int d, float eps) {
    const X* row = x + (unsigned long long)blockIdx.x * d;
    O* dst = out + (unsigned long long)blockIdx.x * d;
    float sum = 0.0f;
    for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = to_f32(row[j]);
        sum += v * v;
    }
    sum = block_sum(sum);
    const float inv = (float)(1.0 / sqrt((double)sum / (double)d + (double)eps));
    for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) {
        dst[j] = from_f32<O>(to_f32(row[j]) * inv * to_f32(w[j]));
    }
}

// rms_norm_<x>_<w>(x, w, out, d, eps): grid = rows, output in x's dtype.
#define RMS_NORM(X, W)                                                                                  \
    extern "C" __global__ void rms_norm_##X##_##W(const X* __restrict__ x, const W* __restrict__ w,     \
                                                  X* __restrict__ out, unsigned int d, float eps) {     \
        rms_norm<X, W, X>(x, w, out, d, eps);                                                           \
    }
FOR_EACH_DTYPE_PAIR(RMS_NORM)

// rms_norm_<x>_<w>_to_<o>(x, w, out, d, eps): the output in another dtype than x's, rounded once
// from the f32 product (an f32 residual stream normalised into the dtype of the linears that read
// it, as the serving runner does; never through x's dtype first).
#define RMS_NORM_TO(X, W, O)                                                                            \
    extern "C" __global__ void rms_norm_##X##_##W##_to_##O(const X* __restrict__ x, const W* __restrict__ w, \
                                                           O* __restrict__ out, unsigned int d, float eps) { \
        rms_norm<X, W, O>(x, w, out, d, eps);                                                           \
    }
#define RMS_NORM_F32_TO(W, O) RMS_NORM_TO(f32, W, O)
#define RMS_NORM_F16_TO(W, O) RMS_NORM_TO(f16, W, O)
#define RMS_NORM_BF16_TO(W, O) RMS_NORM_TO(bf16, W, O)
FOR_EACH_DTYPE_PAIR(RMS_NORM_F32_TO)
FOR_EACH_DTYPE_PAIR(RMS_NORM_F16_TO)
FOR_EACH_DTYPE_PAIR(RMS_NORM_BF16_TO)
