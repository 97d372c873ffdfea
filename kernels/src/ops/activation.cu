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
