// quantize.cu: group-wise quantization, the CUDA half of ops/quantize.rs, with the same formulas
// (AutoAWQ 0.2.9's pseudo_quantize_tensor): quantize_groups_<t> writes codes, scales and zeros;
// pseudo_quantize_<t> quantizes and dequantizes in one pass.
//
// One warp per group of `g` consecutive values (any g; 32, 64 and 128 in practice): the lanes
// stride the group for its min/max (or max |w|), reduce across the warp, and every lane derives the
// same scale and zero (group_params), then the codes clamp(rint(w / scale) + zero). The divisions
// are IEEE (no fast math), rintf rounds half to even like f32::round_ties_even, and clamps and the
// cast to i8 follow Rust's f32::clamp and `as i8` (NaN kept, then 0; -0.0 kept), so for the same
// inputs codes, scales and zeros equal the CPU's bit for bit, ties included.
#include "common.cuh"

// Rust's f32::clamp: NaN stays NaN and a value equal to a bound keeps its own bits (-0.0 stays).
__device__ __forceinline__ float clamp_f32(float x, float lo, float hi) {
    if (x < lo) x = lo;
    if (x > hi) x = hi;
    return x;
}

// Rust's `q as i8` for a code: saturating, NaN to 0 (codes are whole numbers, so no truncation).
__device__ __forceinline__ signed char code_to_i8(float q) {
    if (q != q) return 0;
    return (signed char)fminf(fmaxf(q, -128.0f), 127.0f);
}

// Scale and zero of the group at `src` (QuantSpec::group_params), the same in every lane of the warp.
template <typename T>
__device__ void group_params(const T* __restrict__ src, unsigned int g, unsigned int lane, int zero_point,
                             float min_int, float max_int, float* scale, float* zero) {
    if (zero_point) {
        const float inf = __int_as_float(0x7f800000);  // no <cmath> under NVRTC
        float lo = inf, hi = -inf;
        for (unsigned int j = lane; j < g; j += 32) {
            const float v = to_f32(src[j]);
            lo = fminf(lo, v);
            hi = fmaxf(hi, v);
        }
        lo = warp_min(lo);
        hi = warp_max(hi);
        *scale = fmaxf(hi - lo, 1e-5f) / max_int;
        *zero = clamp_f32(-rintf(lo / *scale), min_int, max_int);
    } else {
        float m = 0.0f;
        for (unsigned int j = lane; j < g; j += 32) m = fmaxf(m, fabsf(to_f32(src[j])));
        m = warp_max(m);
        *scale = fmaxf(m, 1e-5f) / max_int;
        *zero = 0.0f;
    }
}

// The code of `w` (QuantSpec::code).
__device__ __forceinline__ float quant_code(float w, float scale, float zero, float min_int, float max_int) {
    return clamp_f32(rintf(w / scale) + zero, min_int, max_int);
}

template <typename T>
__device__ void pseudo_quantize(const T* __restrict__ w, T* __restrict__ out, unsigned long long n_groups,
                                unsigned int g, int zero_point, float min_int, float max_int) {
    const unsigned int lane = threadIdx.x & 31;
    const unsigned long long warps = ((unsigned long long)gridDim.x * blockDim.x) >> 5;
    for (unsigned long long group = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
         group < n_groups; group += warps) {
        const T* src = w + group * g;
        T* dst = out + group * g;
        float scale, zero;
        group_params(src, g, lane, zero_point, min_int, max_int, &scale, &zero);
        for (unsigned int j = lane; j < g; j += 32) {
            const float q = quant_code(to_f32(src[j]), scale, zero, min_int, max_int);
            dst[j] = from_f32<T>((q - zero) * scale);
        }
    }
}

// Groups are numbered row-major (group = row * (in / g) + index in the row), so they index
// scales[out, in / g] and zeros[out, in / g] directly, and group * g is their first code.
template <typename T>
__device__ void quantize_groups(const T* __restrict__ w, signed char* __restrict__ codes, float* __restrict__ scales,
                                float* __restrict__ zeros, unsigned long long n_groups, unsigned int g,
                                int zero_point, float min_int, float max_int) {
    const unsigned int lane = threadIdx.x & 31;
    const unsigned long long warps = ((unsigned long long)gridDim.x * blockDim.x) >> 5;
    for (unsigned long long group = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
         group < n_groups; group += warps) {
        const T* src = w + group * g;
        float scale, zero;
        group_params(src, g, lane, zero_point, min_int, max_int, &scale, &zero);
        for (unsigned int j = lane; j < g; j += 32) {
            codes[group * g + j] = code_to_i8(quant_code(to_f32(src[j]), scale, zero, min_int, max_int));
        }
        if (lane == 0) {
            scales[group] = scale;
            zeros[group] = zero;
        }
    }
}

// pseudo_quantize_<t>(w, out, n_groups, g, zero_point, min_int, max_int); blockDim.x a multiple of 32.
#define PSEUDO_QUANTIZE(T)                                                                              \
    extern "C" __global__ void pseudo_quantize_##T(const T* __restrict__ w, T* __restrict__ out,        \
                                                   unsigned long long n_groups, unsigned int g,         \
                                                   int zero_point, float min_int, float max_int) {      \
        pseudo_quantize<T>(w, out, n_groups, g, zero_point, min_int, max_int);                          \
    }
FOR_EACH_DTYPE(PSEUDO_QUANTIZE)

// quantize_groups_<t>(w, codes, scales, zeros, n_groups, g, zero_point, min_int, max_int); blockDim.x a
// multiple of 32.
#define QUANTIZE_GROUPS(T)                                                                              \
    extern "C" __global__ void quantize_groups_##T(const T* __restrict__ w, signed char* __restrict__ codes, \
                                                   float* __restrict__ scales, float* __restrict__ zeros, \
                                                   unsigned long long n_groups, unsigned int g,         \
                                                   int zero_point, float min_int, float max_int) {      \
        quantize_groups<T>(w, codes, scales, zeros, n_groups, g, zero_point, min_int, max_int);         \
    }
FOR_EACH_DTYPE(QUANTIZE_GROUPS)

// ---- Packing in AutoAWQ's GEMM layout (quantize_packed) -----------------------------------------
// Nibble k of a word holds output 8c + AWQ_ORDER[k] (ops/w4a16/layout.rs); values are stored as
// (code + shift) & 0xF, shift 8 for signed symmetric codes and 0 otherwise, as PackedLinear::from_groups.
__device__ __forceinline__ unsigned int awq_output_of_nibble(int k) { return (k >> 2) | ((k & 3) << 1); }

// awq_pack<T>(src[outs, cols], dst[cols, outs / 8], outs, cols, shift): whole numbers (i8 codes,
// or zero points held in f32) packed 8 outputs to a word. Word (i, c) with i the fastest index: a
// warp reads consecutive columns of the same 8 rows.
template <typename T>
__device__ void awq_pack(const T* __restrict__ src, int* __restrict__ dst, unsigned int outs, unsigned int cols, int shift) {
    const unsigned long long n = (unsigned long long)cols * (outs / 8);
    GRID_STRIDE(t, n) {
        const unsigned int i = (unsigned int)(t % cols), c = (unsigned int)(t / cols);
        unsigned int word = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const unsigned long long o = 8ull * c + awq_output_of_nibble(k);
            word |= ((unsigned int)((int)src[o * cols + i] + shift) & 0xFu) << (4 * k);
        }
        dst[(unsigned long long)i * (outs / 8) + c] = (int)word;
    }
}

// The codes: [outs, ins] -> qweight [ins, outs / 8].
extern "C" __global__ void awq_pack_words(const signed char* __restrict__ codes, int* __restrict__ qweight,
                                          unsigned int outs, unsigned int ins, int shift) {
    awq_pack(codes, qweight, outs, ins, shift);
}

// The zero points: [outs, groups] -> qzeros [groups, outs / 8].
extern "C" __global__ void awq_pack_zeros(const float* __restrict__ zeros, int* __restrict__ qzeros,
                                          unsigned int outs, unsigned int groups, int shift) {
    awq_pack(zeros, qzeros, outs, groups, shift);
}

// awq_pack_scales(scales[outs, groups] f32, out[groups, outs] f16 bits, outs, groups): transposed
// and rounded to f16 (nearest even, as half::f16::from_f32).
extern "C" __global__ void awq_pack_scales(const float* __restrict__ scales, unsigned short* __restrict__ out,
                                           unsigned int outs, unsigned int groups) {
    const unsigned long long n = (unsigned long long)groups * outs;
    GRID_STRIDE(t, n) {
        const unsigned int o = (unsigned int)(t % outs), j = (unsigned int)(t / outs);
        out[t] = __half_as_ushort(__float2half_rn(scales[(unsigned long long)o * groups + j]));
    }
}

// ---- AWQ's clip search (ops/clip.rs) ---------------------------------------------------------
// The loss of a clip candidate for output row o and group j is mean_t (x_t . (q - w))^2 over the
// sampled tokens x_t: with d = q - w and the group's Gram matrix G_j = X_j^T X_j that is
// d^T G_j d / t. So the tokens are read once (clip_gram: one block per group), and each candidate
// then costs g^2 multiply-adds from shared memory instead of t * g (clip_search: one warp per row,
// the group's G in shared memory, the candidates of the row in turn, exactly as the CPU reference
// clamps, quantizes and compares them: the first of equal losses wins).

// gram[j] = X_j^T X_j in f32, X_j = the g columns of group j of xs[t, in]. Thread `tid` keeps
// entries (a0 + p * 256 / G, tid % G) for p < G * G / 256: a fixed column, so one shared read per
// multiply-add, and a row shared by the whole warp (a broadcast).
template <typename T, int G>
__device__ void clip_gram(const T* __restrict__ xs, float* __restrict__ gram, int t, int in) {
    constexpr int PER = G * G / 256, ROW_STEP = 256 / G;
    __shared__ float tokens[32][G];
    const int j = blockIdx.x, tid = threadIdx.x, b = tid % G, a0 = tid / G;
    float acc[PER];
#pragma unroll
    for (int p = 0; p < PER; ++p) acc[p] = 0.0f;
    for (int t0 = 0; t0 < t; t0 += 32) {
        const int n = min(32, t - t0);
        __syncthreads();
        for (int v = tid; v < n * G; v += 256) tokens[v / G][v % G] = to_f32(xs[(size_t)(t0 + v / G) * in + j * G + v % G]);
        __syncthreads();
        for (int r = 0; r < n; ++r) {
            const float xb = tokens[r][b];
#pragma unroll
            for (int p = 0; p < PER; ++p) acc[p] += tokens[r][a0 + p * ROW_STEP] * xb;
        }
    }
    float* gj = gram + (size_t)j * G * G;
#pragma unroll
    for (int p = 0; p < PER; ++p) gj[(a0 + p * ROW_STEP) * G + b] = acc[p];
}

constexpr int CLIP_ROWS = 128;  // output rows per block (16 per warp)

// best[o, j] = the clip threshold of row o, group j. Dynamic shared memory: G_j, then one G-float
// buffer per warp for the candidate's d.
template <typename T, int G>
__device__ void clip_search(const T* __restrict__ w, const float* __restrict__ gram, float* __restrict__ best,
                            int out, int in, int n_grid, int n_shrink, int zero_point, float min_int, float max_int) {
    constexpr int PER = G / 32;
    extern __shared__ float clip_smem[];
    const int j = blockIdx.x, groups = in / G, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* gs = clip_smem;
    float* dbuf = clip_smem + G * G + warp * G;
    const float* gj = gram + (size_t)j * G * G;
    for (int v = threadIdx.x; v < G * G; v += blockDim.x) gs[v] = gj[v];
    __syncthreads();
    const float inf = __int_as_float(0x7f800000);
    const int row_end = min(out, (int)(blockIdx.y + 1) * CLIP_ROWS);
    for (int o = blockIdx.y * CLIP_ROWS + warp; o < row_end; o += blockDim.x >> 5) {
        float wv[PER];
        const T* src = w + (size_t)o * in + j * G + lane * PER;
        float m = 0.0f;
#pragma unroll
        for (int p = 0; p < PER; ++p) {
            wv[p] = to_f32(src[p]);
            m = fmaxf(m, fabsf(wv[p]));
        }
        m = warp_max(m);
        float min_err = inf, best_val = m;
        for (int i = 0; i < n_shrink; ++i) {
            const float max_val = m * (1.0f - (float)i / (float)n_grid);
            float c[PER];
            float lo = inf, hi = -inf, amax = 0.0f;
#pragma unroll
            for (int p = 0; p < PER; ++p) {
                c[p] = clamp_f32(wv[p], -max_val, max_val);
                lo = fminf(lo, c[p]);
                hi = fmaxf(hi, c[p]);
                amax = fmaxf(amax, fabsf(c[p]));
            }
            float scale, zero;
            if (zero_point) {
                lo = warp_min(lo);
                hi = warp_max(hi);
                scale = fmaxf(hi - lo, 1e-5f) / max_int;
                zero = clamp_f32(-rintf(lo / scale), min_int, max_int);
            } else {
                scale = fmaxf(warp_max(amax), 1e-5f) / max_int;
                zero = 0.0f;
            }
            float d[PER];
#pragma unroll
            for (int p = 0; p < PER; ++p) {
                d[p] = (quant_code(c[p], scale, zero, min_int, max_int) - zero) * scale - wv[p];
                dbuf[lane * PER + p] = d[p];
            }
            __syncwarp();
            // d^T G d = sum_l d_l (G d)_l, G symmetric: this lane's columns of row l of G.
            float e = 0.0f;
            for (int l = 0; l < G; ++l) {
                const float* row = gs + l * G + lane * PER;
                float gd = 0.0f;
#pragma unroll
                for (int p = 0; p < PER; ++p) gd += row[p] * d[p];
                e += dbuf[l] * gd;
            }
            e = warp_sum(e);
            __syncwarp();  // the buffer is rewritten by the next candidate
            if (e < min_err) {
                min_err = e;
                best_val = max_val;
            }
        }
        if (lane == 0) best[(size_t)o * groups + j] = best_val;
    }
}

#define CLIP_KERNELS(T, G)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) clip_gram_##T##_g##G(const T* xs, float* gram, int t, int in) { \
        clip_gram<T, G>(xs, gram, t, in);                                                               \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) clip_search_##T##_g##G(                           \
        const T* w, const float* gram, float* best, int out, int in, int n_grid, int n_shrink, int zero_point, \
        float min_int, float max_int) {                                                                 \
        clip_search<T, G>(w, gram, best, out, in, n_grid, n_shrink, zero_point, min_int, max_int);      \
    }
#define CLIP_KERNELS_ALL_G(T) CLIP_KERNELS(T, 32) CLIP_KERNELS(T, 64) CLIP_KERNELS(T, 128)
FOR_EACH_DTYPE(CLIP_KERNELS_ALL_G)
