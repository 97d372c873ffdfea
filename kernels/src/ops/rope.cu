// rope.cu: rotary position embedding (rotate_half convention), the CUDA half of ops/rope.rs.
//
// One thread per value of x[rows, n_heads * head_dim] (grid-stride). Within a head, value d of the
// first half of the rotary part becomes x1 cos - x2 sin, value d of the second half x2 cos + x1 sin,
// values past the rotary part pass through. cos and sin come from the host ([seq_len, half] f32,
// computed in f64 and rounded, by the same code as the CPU path), and the products and the sum are
// rounded separately (__fmul_rn / __fadd_rn / __fsub_rn keep the compiler from fusing them into an
// FMA), exactly as the CPU does: the result equals the CPU's bit for bit.
#include "common.cuh"

template <typename T>
__device__ void rope(const T* __restrict__ x, const float* __restrict__ cos_table,
                     const float* __restrict__ sin_table, T* __restrict__ out, unsigned long long n,
                     unsigned int width, unsigned int head_dim, unsigned int half, unsigned int seq_len) {
    GRID_STRIDE(e, n) {
        const unsigned int d = (unsigned int)(e % width) % head_dim;
        const float v = to_f32(x[e]);
        if (d >= 2 * half) {
            out[e] = from_f32<T>(v);
            continue;
        }
        const unsigned long long pos = (e / width) % seq_len;
        const unsigned int i = d < half ? d : d - half;  // the frequency index
        const float c = cos_table[pos * half + i], s = sin_table[pos * half + i];
        float r;
        if (d < half) {
            const float x2 = to_f32(x[e + half]);
            r = __fsub_rn(__fmul_rn(v, c), __fmul_rn(x2, s));
        } else {
            const float x1 = to_f32(x[e - half]);
            r = __fadd_rn(__fmul_rn(v, c), __fmul_rn(x1, s));
        }
        out[e] = from_f32<T>(r);
    }
}

// rope_<t>(x, cos, sin, out, n, width, head_dim, half, seq_len): n = rows * width values; row r is at
// position r % seq_len; the first 2 * half values of each head are rotated. Output in x's dtype.
#define ROPE(T)                                                                                         \
    extern "C" __global__ void rope_##T(const T* __restrict__ x, const float* __restrict__ cos_table,   \
                                        const float* __restrict__ sin_table, T* __restrict__ out,       \
                                        unsigned long long n, unsigned int width,                       \
                                        unsigned int head_dim, unsigned int half, unsigned int seq_len) { \
        rope<T>(x, cos_table, sin_table, out, n, width, head_dim, half, seq_len);                       \
    }
FOR_EACH_DTYPE(ROPE)
