// loss.cu: per-row negative log-likelihood, the CUDA half of ops/loss.rs, with the CPU's steps: the
// row maximum in f32, log Z = ln(sum exp(l - max)) + max in f64, nll = log Z - l[target].
//
// One block per row (blockDim.x a multiple of 32, at most 1024, striding the row twice); each
// block writes its row's nll, and the host adds the rows in order, so the total does not depend on
// the launch shape.
#include "common.cuh"

template <typename T>
__device__ void nll_rows(const T* __restrict__ logits, const unsigned int* __restrict__ targets,
                         double* __restrict__ nll, unsigned int vocab) {
    const T* row = logits + (unsigned long long)blockIdx.x * vocab;
    float max = -__int_as_float(0x7f800000);
    for (unsigned int j = threadIdx.x; j < vocab; j += blockDim.x) max = fmaxf(max, to_f32(row[j]));
    max = block_max(max);
    double sum = 0.0;
    for (unsigned int j = threadIdx.x; j < vocab; j += blockDim.x) sum += exp((double)to_f32(row[j]) - (double)max);
    sum = block_sum(sum);
    if (threadIdx.x == 0) nll[blockIdx.x] = log(sum) + (double)max - (double)to_f32(row[targets[blockIdx.x]]);
}

// nll_rows_<t>(logits, targets, nll, vocab): grid = rows; nll[r] in f64.
#define NLL_ROWS(T)                                                                                     \
    extern "C" __global__ void nll_rows_##T(const T* __restrict__ logits,                              \
                                            const unsigned int* __restrict__ targets,                  \
                                            double* __restrict__ nll, unsigned int vocab) {             \
        nll_rows<T>(logits, targets, nll, vocab);                                                       \
    }
FOR_EACH_DTYPE(NLL_ROWS)
