// groups.cu: per-group views of a weight matrix (a group: group_size consecutive values of a row),
// the CUDA half of ops/groups.rs.
#include "common.cuh"

// max_abs_groups_<t>(w, out, n_groups, g): out[j] = max |w| over group j; one warp per group,
// lanes striding over its values. NaNs are skipped (fmaxf), as the CPU's fold with f32::max.
#define MAX_ABS_GROUPS(T)                                                                               \
    extern "C" __global__ void max_abs_groups_##T(const T* __restrict__ w, float* __restrict__ out,     \
                                                  unsigned long long n_groups, unsigned int g) {        \
        const unsigned int lane = threadIdx.x & 31;                                                     \
        const unsigned long long warps = (unsigned long long)gridDim.x * (blockDim.x >> 5);             \
        for (unsigned long long j = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;   \
             j < n_groups; j += warps) {                                                                \
            const T* group = w + j * g;                                                                 \
            float m = 0.0f;                                                                             \
            for (unsigned int k = lane; k < g; k += 32) m = fmaxf(m, fabsf(to_f32(group[k])));          \
            m = warp_max(m);                                                                            \
            if (lane == 0) out[j] = m;                                                                  \
        }                                                                                               \
    }
FOR_EACH_DTYPE(MAX_ABS_GROUPS)

// clamp_groups_<t>(w, max_val, out, n, g): out[i] = w[i] clamped to +-max_val[i / g]. Comparisons
// written as on the CPU, so a NaN value stays NaN.
#define CLAMP_GROUPS(T)                                                                                 \
    extern "C" __global__ void clamp_groups_##T(const T* __restrict__ w, const float* __restrict__ max_val, \
                                                T* __restrict__ out, unsigned long long n, unsigned int g) { \
        GRID_STRIDE(i, n) {                                                                             \
            const float m = max_val[i / g], v = to_f32(w[i]);                                           \
            out[i] = from_f32<T>(v < -m ? -m : (v > m ? m : v));                                        \
        }                                                                                               \
    }
FOR_EACH_DTYPE(CLAMP_GROUPS)

// group_relative_abs_partial_<t>(w, maxima, partial, rows, cols, g, rows_per_chunk):
// partial[chunk, c] = sum over the chunk's rows r of |w[r, c]| / (maxima[r, c / g] + 1e-6), each
// term in f32, the sum in f64 in row order: the CPU's order. grid.y is the chunk, one thread per
// column, so a warp reads consecutive columns of one row.
#define GROUP_RELATIVE_ABS_PARTIAL(T)                                                                   \
    extern "C" __global__ void group_relative_abs_partial_##T(                                          \
        const T* __restrict__ w, const float* __restrict__ maxima, double* __restrict__ partial,       \
        unsigned int rows, unsigned int cols, unsigned int g, unsigned int rows_per_chunk) {            \
        const unsigned int col = blockIdx.x * blockDim.x + threadIdx.x;                                 \
        if (col >= cols) return;                                                                        \
        const unsigned int start = blockIdx.y * rows_per_chunk;                                         \
        const unsigned int end = min(rows, start + rows_per_chunk);                                     \
        const unsigned int groups_per_row = cols / g, group = col / g;                                  \
        double s = 0.0;                                                                                 \
        for (unsigned int r = start; r < end; ++r) {                                                    \
            const float max = maxima[(unsigned long long)r * groups_per_row + group] + 1e-6f;           \
            s += (double)(fabsf(to_f32(w[(unsigned long long)r * cols + col])) / max);                  \
        }                                                                                               \
        partial[(unsigned long long)blockIdx.y * cols + col] = s;                                       \
    }
FOR_EACH_DTYPE(GROUP_RELATIVE_ABS_PARTIAL)
