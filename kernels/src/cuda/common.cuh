// common.cuh: what every .cu file of awq-kernels includes (`#include "common.cuh"`). NVRTC gets
// this text as an in-memory header (cuda/nvrtc.rs), so it is never looked up on disk.
//
// Holds the storage dtypes under the names Rust prints for them (f32, f16, bf16), so that a macro
// can paste a dtype into a kernel name (`rms_norm_f16_f32`), the conversions to and from f32
// (round to nearest even, as the CPU path's `half` crate does) and warp/block reductions.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef float f32;
typedef __half f16;
typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f32(f32 x) { return x; }
__device__ __forceinline__ float to_f32(f16 x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ f32 from_f32<f32>(float x) { return x; }
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Instantiation helpers: M is called once per dtype, or once per ordered pair of dtypes.
#define FOR_EACH_DTYPE(M) M(f32) M(f16) M(bf16)
#define FOR_EACH_DTYPE_PAIR(M) \
    M(f32, f32) M(f32, f16) M(f32, bf16) \
    M(f16, f32) M(f16, f16) M(f16, bf16) \
    M(bf16, f32) M(bf16, f16) M(bf16, bf16)

// A grid-stride loop over `n` elements (n may exceed 2^31).
#define GRID_STRIDE(i, n) \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
// f64 sums, for the ops whose CPU reference accumulates in f64 (softmax, nll, squared_distance).
__device__ __forceinline__ double warp_sum(double v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ float warp_min(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// The warp reductions as types, so that block_reduce has one instantiation (and one pair of
// shared slots) per dtype and reduction.
struct WarpSum {
    template <typename T> __device__ __forceinline__ T operator()(T v) const { return warp_sum(v); }
};
struct WarpMax {
    __device__ __forceinline__ float operator()(float v) const { return warp_max(v); }
};

// `v` reduced over the block with the warp reduction Op (`identity` stands in for the warps a
// block of fewer than 32 warps lacks), returned to every thread. blockDim.x must be a multiple of
// 32 (at most 1024), and every thread of the block must call it. Safe to call more than once per
// kernel.
template <typename T, typename Op>
__device__ T block_reduce(T v, T identity) {
    __shared__ T partial[32];
    __shared__ T total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = Op()(v);
    __syncthreads();  // a previous call may still be reading `partial` / `total`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = Op()(lane < n_warps ? partial[lane] : identity);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// Sum of `v` over the block (see block_reduce).
__device__ float block_sum(float v) { return block_reduce<float, WarpSum>(v, 0.0f); }
__device__ double block_sum(double v) { return block_reduce<double, WarpSum>(v, 0.0); }
// Maximum of `v` over the block, NaN-ignoring as fmaxf and Rust's f32::max (see block_reduce).
__device__ float block_max(float v) { return block_reduce<float, WarpMax>(v, -__int_as_float(0x7f800000)); }
