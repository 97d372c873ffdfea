// activation.cu: gated activations act(gate) * up, the CUDA half of ops/activation.rs.
// The formulas are GatedActivation::apply's, in f32.
#include "common.cuh"

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

__device__ __forceinline__ float gelu_tanh(float g) {
    const float sqrt_2_over_pi = 0.7978846f;
    return 0.5f * g * (1.0f + tanhf(sqrt_2_over_pi * (g + 0.044715f * g * g * g)));
}

// gated_<act>_<g>_<u>(gate, up, out, n): out = act(gate) * up, in gate's dtype.
#define GATED(ACT, G, U)                                                                                \
    extern "C" __global__ void gated_##ACT##_##G##_##U(const G* __restrict__ gate,                      \
                                                       const U* __restrict__ up, G* __restrict__ out,   \
                                                       unsigned long long n) {                          \
        GRID_STRIDE(i, n) out[i] = from_f32<G>(ACT(to_f32(gate[i])) * to_f32(up[i]));                   \
    }
#define GATED_SILU(G, U) GATED(silu, G, U)
#define GATED_GELU_TANH(G, U) GATED(gelu_tanh, G, U)
FOR_EACH_DTYPE_PAIR(GATED_SILU)
FOR_EACH_DTYPE_PAIR(GATED_GELU_TANH)

// gated_fused_<act>_<t>(gate_up, out, n, width): out[r, c] = act(gate_up[r, c]) * gate_up[r, width + c]
// over n = rows * width values: the fused gate|up projection's halves, in its dtype.
#define GATED_FUSED(ACT, T)                                                                             \
    extern "C" __global__ void gated_fused_##ACT##_##T(const T* __restrict__ gate_up, T* __restrict__ out, \
                                                       unsigned long long n, unsigned int width) {      \
        GRID_STRIDE(i, n) {                                                                             \
            const unsigned long long r = i / width, c = i % width;                                      \
            const T* row = gate_up + r * 2 * width;                                                     \
            out[i] = from_f32<T>(ACT(to_f32(row[c])) * to_f32(row[width + c]));                          \
        }                                                                                               \
    }
#define GATED_FUSED_SILU(T) GATED_FUSED(silu, T)
#define GATED_FUSED_GELU_TANH(T) GATED_FUSED(gelu_tanh, T)
FOR_EACH_DTYPE(GATED_FUSED_SILU)
FOR_EACH_DTYPE(GATED_FUSED_GELU_TANH)
