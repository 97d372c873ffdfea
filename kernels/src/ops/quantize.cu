// quantize.cu: group-wise pseudo-quantization (quantize, then dequantize) in one pass; the CUDA
// half of ops/quantize.rs, with the same formulas (AutoAWQ 0.2.9's pseudo_quantize_tensor).
//
// One warp per group of `g` consecutive values (any g; 32, 64 and 128 in practice): the lanes
// stride the group for its min/max (or max |w|), reduce across the warp, and every lane derives the
// same scale and zero, then writes (clamp(rint(w / scale) + zero) - zero) * scale. The divisions are
// IEEE (no fast math) and rintf rounds half to even like f32::round_ties_even, so for the same
// inputs the codes equal the CPU's bit for bit, ties included.
#include "common.cuh"

template <typename T>
__device__ void pseudo_quantize(const T* __restrict__ w, T* __restrict__ out, unsigned long long n_groups,
                                unsigned int g, int zero_point, float min_int, float max_int) {
    const unsigned int lane = threadIdx.x & 31;
    const unsigned long long warps = ((unsigned long long)gridDim.x * blockDim.x) >> 5;
    for (unsigned long long group = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
         group < n_groups; group += warps) {
        const T* src = w + group * g;
        T* dst = out + group * g;
        float scale, zero;
        if (zero_point) {
            const float inf = __int_as_float(0x7f800000);  // no <cmath> under NVRTC
            float lo = inf, hi = -inf;
            for (unsigned int j = lane; j < g; j += 32) {
                const float v = to_f32(src[j]);
                lo = fminf(lo, v);
                hi = fmaxf(hi, v);
            }
            lo = warp_min(lo);
            hi = warp_max(hi);
            scale = fmaxf(hi - lo, 1e-5f) / max_int;
            zero = fminf(fmaxf(-rintf(lo / scale), min_int), max_int);
        } else {
            float m = 0.0f;
            for (unsigned int j = lane; j < g; j += 32) m = fmaxf(m, fabsf(to_f32(src[j])));
            m = warp_max(m);
            scale = fmaxf(m, 1e-5f) / max_int;
            zero = 0.0f;
        }
        for (unsigned int j = lane; j < g; j += 32) {
            const float q = fminf(fmaxf(rintf(to_f32(src[j]) / scale) + zero, min_int), max_int);
            dst[j] = from_f32<T>((q - zero) * scale);
        }
    }
}

// pseudo_quantize_<t>(w, out, n_groups, g, zero_point, min_int, max_int); blockDim.x a multiple of 32.
#define PSEUDO_QUANTIZE(T)                                                                              \
    extern "C" __global__ void pseudo_quantize_##T(const T* __restrict__ w, T* __restrict__ out,        \
                                                   unsigned long long n_groups, unsigned int g,         \
                                                   int zero_point, float min_int, float max_int) {      \
        pseudo_quantize<T>(w, out, n_groups, g, zero_point, min_int, max_int);                          \
    }
FOR_EACH_DTYPE(PSEUDO_QUANTIZE)
