// attention.cu: the masked softmax between the two batched GEMMs of ops/attention.rs's CUDA path.
//
// attention_softmax_<t>(scores, probs, seq_len, window, scale): one block per score row (matrix
// (sequence, head), query i = row % seq_len). Keys j <= i with i - j < window are visible; the
// row's visible scores are scaled, soft-maxed in f32 (maximum, then exponentials and their sum)
// and written in the output dtype, the masked ones as 0. The same steps as the CPU reference,
// which soft-maxes the visible logits in f32.
#include "common.cuh"

template <typename T>
__device__ void attention_softmax(const float* __restrict__ scores, T* __restrict__ probs, unsigned int seq_len,
                                  unsigned int window, float scale) {
    const unsigned long long row = blockIdx.x;
    const unsigned int i = (unsigned int)(row % seq_len);
    const float* s = scores + row * seq_len;
    T* p = probs + row * seq_len;
    // Visible keys: first..=i.
    const unsigned int first = i + 1 > window ? i + 1 - window : 0;
    float max = -__int_as_float(0x7f800000);
    for (unsigned int j = first + threadIdx.x; j <= i; j += blockDim.x) max = fmaxf(max, s[j] * scale);
    max = block_max(max);
    float sum = 0.0f;
    for (unsigned int j = first + threadIdx.x; j <= i; j += blockDim.x) sum += expf(s[j] * scale - max);
    sum = block_sum(sum);
    const float inv = 1.0f / sum;
    for (unsigned int j = threadIdx.x; j < seq_len; j += blockDim.x) {
        const bool visible = j >= first && j <= i;
        p[j] = from_f32<T>(visible ? expf(s[j] * scale - max) * inv : 0.0f);
    }
}

#define ATTENTION_SOFTMAX(T)                                                                            \
    extern "C" __global__ void attention_softmax_##T(const float* __restrict__ scores, T* __restrict__ probs, \
                                                     unsigned int seq_len, unsigned int window, float scale) { \
        attention_softmax<T>(scores, probs, seq_len, window, scale);                                    \
    }
FOR_EACH_DTYPE(ATTENTION_SOFTMAX)
