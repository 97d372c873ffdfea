// elementwise.cu: residual adds, per-column scaling, per-row division and tanh soft-capping, the CUDA half of
// ops/elementwise.rs.
// Arithmetic in f32; outputs rounded once to the output dtype, as on the CPU.
#include "common.cuh"

// add_<a>_<b>(a, b, out, n): out = a + b, in a's dtype.
#define ADD(A, B)                                                                                       \
    extern "C" __global__ void add_##A##_##B(const A* __restrict__ a, const B* __restrict__ b,           \
                                             A* __restrict__ out, unsigned long long n) {                \
        GRID_STRIDE(i, n) out[i] = from_f32<A>(to_f32(a[i]) + to_f32(b[i]));                            \
    }
FOR_EACH_DTYPE_PAIR(ADD)

// add_assign_<a>_<b>(a, b, n): a += b in place (the residual stream: f32 in the AWQ engine, f16 in
// the serving runner), the sum in f32, rounded once to a's dtype.
#define ADD_ASSIGN(A, B)                                                                                \
    extern "C" __global__ void add_assign_##A##_##B(A* __restrict__ a, const B* __restrict__ b,         \
                                                    unsigned long long n) {                             \
        GRID_STRIDE(i, n) a[i] = from_f32<A>(to_f32(a[i]) + to_f32(b[i]));                              \
    }
FOR_EACH_DTYPE_PAIR(ADD_ASSIGN)

// scale_columns_<t>(x, s, out, n, cols): out[r, c] = x[r, c] * s[c] over n = rows * cols values.
#define SCALE_COLUMNS(T)                                                                                \
    extern "C" __global__ void scale_columns_##T(const T* __restrict__ x, const float* __restrict__ s,  \
                                                 T* __restrict__ out, unsigned long long n,              \
                                                 unsigned int cols) {                                   \
        GRID_STRIDE(i, n) out[i] = from_f32<T>(to_f32(x[i]) * s[i % cols]);                             \
    }
FOR_EACH_DTYPE(SCALE_COLUMNS)

// divide_rows_<t>(x, s, out, n, cols): out[r, c] = x[r, c] / s[r] (IEEE division, as on the CPU).
#define DIVIDE_ROWS(T)                                                                                  \
    extern "C" __global__ void divide_rows_##T(const T* __restrict__ x, const float* __restrict__ s,    \
                                               T* __restrict__ out, unsigned long long n,                \
                                               unsigned int cols) {                                     \
        GRID_STRIDE(i, n) out[i] = from_f32<T>(to_f32(x[i]) / s[i / cols]);                             \
    }
FOR_EACH_DTYPE(DIVIDE_ROWS)

// softcap_<t>(x, out, n, cap): out = tanh(x / cap) * cap (Gemma's logit soft-capping), in f32.
#define SOFTCAP(T)                                                                                      \
    extern "C" __global__ void softcap_##T(const T* __restrict__ x, T* __restrict__ out,                \
                                           unsigned long long n, float cap) {                           \
        GRID_STRIDE(i, n) out[i] = from_f32<T>(tanhf(to_f32(x[i]) / cap) * cap);                        \
    }
FOR_EACH_DTYPE(SOFTCAP)
