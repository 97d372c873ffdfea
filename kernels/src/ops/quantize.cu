// quantize.cu: group-wise quantization, the CUDA half of ops/quantize.rs, with the same formulas
// (AutoAWQ 0.2.9's pseudo_quantize_tensor): quantize_groups_<t> writes codes, scales and zeros;
// pseudo_quantize_<t> quantizes and dequantizes in one pass.
//
// One warp per group of `g` consecutive values (any g; 32, 64 and 128 in practice): the lanes
// stride the group for its min/max (or max |w|), reduce across the warp, and every lane derives the
// same scale and zero (group_params), then the codes clamp(rint(w / scale) + zero). The divisions
// are IEEE (no fast math), rintf rounds half to even like f32::round_ties_even, and clamps and the
// cast to i8 follow Rust's f32::clamp and `as i8` (NaN kept, then 0; -0.0 kept), so for the same
// inputs codes, scales and zeros equal the CPU's bit for bit, ties included.
#include "common.cuh"

// Rust's f32::clamp: NaN stays NaN and a value equal to a bound keeps its own bits (-0.0 stays).
__device__ __forceinline__ float clamp_f32(float x, float lo, float hi) {
    if (x < lo) x = lo;
    if (x > hi) x = hi;
    return x;
}

// Rust's `q as i8` for a code: saturating, NaN to 0 (codes are whole numbers, so no truncation).
__device__ __forceinline__ signed char code_to_i8(float q) {
    if (q != q) return 0;
    return (signed char)fminf(fmaxf(q, -128.0f), 127.0f);
}

// Scale and zero of the group at `src` (QuantSpec::group_params), the same in every lane of the warp.
template <typename T>
__device__ void group_params(const T* __restrict__ src, unsigned int g, unsigned int lane, int zero_point,
                             float min_int, float max_int, float* scale, float* zero) {
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
        *scale = fmaxf(hi - lo, 1e-5f) / max_int;
        *zero = clamp_f32(-rintf(lo / *scale), min_int, max_int);
    } else {
        float m = 0.0f;
        for (unsigned int j = lane; j < g; j += 32) m = fmaxf(m, fabsf(to_f32(src[j])));
        m = warp_max(m);
        *scale = fmaxf(m, 1e-5f) / max_int;
        *zero = 0.0f;
    }
}

// The code of `w` (QuantSpec::code).
__device__ __forceinline__ float quant_code(float w, float scale, float zero, float min_int, float max_int) {
    return clamp_f32(rintf(w / scale) + zero, min_int, max_int);
}

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
        group_params(src, g, lane, zero_point, min_int, max_int, &scale, &zero);
        for (unsigned int j = lane; j < g; j += 32) {
            const float q = quant_code(to_f32(src[j]), scale, zero, min_int, max_int);
            dst[j] = from_f32<T>((q - zero) * scale);
        }
    }
}

// Groups are numbered row-major (group = row * (in / g) + index in the row), so they index
// scales[out, in / g] and zeros[out, in / g] directly, and group * g is their first code.
template <typename T>
__device__ void quantize_groups(const T* __restrict__ w, signed char* __restrict__ codes, float* __restrict__ scales,
                                float* __restrict__ zeros, unsigned long long n_groups, unsigned int g,
                                int zero_point, float min_int, float max_int) {
    const unsigned int lane = threadIdx.x & 31;
    const unsigned long long warps = ((unsigned long long)gridDim.x * blockDim.x) >> 5;
    for (unsigned long long group = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
         group < n_groups; group += warps) {
        const T* src = w + group * g;
        float scale, zero;
        group_params(src, g, lane, zero_point, min_int, max_int, &scale, &zero);
        for (unsigned int j = lane; j < g; j += 32) {
            codes[group * g + j] = code_to_i8(quant_code(to_f32(src[j]), scale, zero, min_int, max_int));
        }
        if (lane == 0) {
            scales[group] = scale;
            zeros[group] = zero;
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

// quantize_groups_<t>(w, codes, scales, zeros, n_groups, g, zero_point, min_int, max_int); blockDim.x a
// multiple of 32.
#define QUANTIZE_GROUPS(T)                                                                              \
    extern "C" __global__ void quantize_groups_##T(const T* __restrict__ w, signed char* __restrict__ codes, \
                                                   float* __restrict__ scales, float* __restrict__ zeros, \
                                                   unsigned long long n_groups, unsigned int g,         \
                                                   int zero_point, float min_int, float max_int) {      \
        quantize_groups<T>(w, codes, scales, zeros, n_groups, g, zero_point, min_int, max_int);         \
    }
FOR_EACH_DTYPE(QUANTIZE_GROUPS)
