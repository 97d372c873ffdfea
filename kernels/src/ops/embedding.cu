// embedding.cu: gathers table rows by token id, the CUDA half of ops/embedding.rs.
//
// One thread per output value (grid-stride); consecutive threads copy consecutive values of one
// row. Each value is widened to f32, multiplied by `scale` (1 for a plain lookup: exact) and rounded
// once to the output dtype, as on the CPU, so the result equals the CPU's bit for bit. The ids were
// checked against the table on the host.
#include "common.cuh"

// embedding_<table>_<out>(table, ids, out, n, d, scale): out[i, c] = table[ids[i], c] * scale over
// n = len(ids) * d.
#define EMBEDDING(T, O)                                                                                 \
    extern "C" __global__ void embedding_##T##_##O(const T* __restrict__ table,                        \
                                                   const unsigned int* __restrict__ ids,               \
                                                   O* __restrict__ out, unsigned long long n,          \
                                                   unsigned int d, float scale) {                      \
        GRID_STRIDE(e, n) {                                                                             \
            const unsigned long long row = ids[e / d];                                                  \
            out[e] = from_f32<O>(to_f32(table[row * d + e % d]) * scale);                               \
        }                                                                                               \
    }
FOR_EACH_DTYPE_PAIR(EMBEDDING)
