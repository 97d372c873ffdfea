// cast.cu: dtype conversion on the device, the CUDA half of ops/cast.rs.
//
// cast_<from>_<to>(src, dst, n): dst[i] = src[i] converted through f32. Widening is exact; narrowing
// rounds to nearest even, as the CPU path (the `half` crate) does.
#include "common.cuh"

#define CAST(A, B)                                                                                      \
    extern "C" __global__ void cast_##A##_##B(const A* __restrict__ src, B* __restrict__ dst,            \
                                              unsigned long long n) {                                   \
        GRID_STRIDE(i, n) dst[i] = from_f32<B>(to_f32(src[i]));                                         \
    }
FOR_EACH_DTYPE_PAIR(CAST)
