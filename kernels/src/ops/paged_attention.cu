// paged_attention.cu: the CUDA half of ops/paged_attention.rs and ops/rope_positions.rs: the serving
// engine's writes into the paged KV cache, rotary embedding at given positions, and attention over
// the paged cache.
//
// Layouts (see the Rust docs): a layer's cache is [n_blocks * block_size slots, n_kv_heads * head_dim];
// a row's sequence finds position t in slot tables[row_table[r] + t / block_size] * block_size +
// t % block_size. All indices are u32, uploaded once per step (awq_kernels::Indices).
#include "common.cuh"

// write_kv_slots_<x>_<c>(x, slots, cache, n, width): row r of x[rows, width] into row slots[r] of the
// cache, converted to the cache's dtype. n = rows * width.
template <typename X, typename C>
__device__ void write_kv_slots(const X* __restrict__ x, const unsigned* __restrict__ slots, C* __restrict__ cache,
                               unsigned long long n, unsigned int width) {
    GRID_STRIDE(e, n) {
        const unsigned long long r = e / width, c = e % width;
        cache[(unsigned long long)slots[r] * width + c] = from_f32<C>(to_f32(x[e]));
    }
}
#define WRITE_KV_SLOTS(X, C)                                                                                  \
    extern "C" __global__ void write_kv_slots_##X##_##C(const X* __restrict__ x, const unsigned* __restrict__ slots, \
                                                        C* __restrict__ cache, unsigned long long n,        \
                                                        unsigned int width) {                               \
        write_kv_slots<X, C>(x, slots, cache, n, width);                                                     \
    }
FOR_EACH_DTYPE_PAIR(WRITE_KV_SLOTS)

// rope_at_<t>(x, positions, cos, sin, out, n, width, head_dim, half): rope.cu's rotation with row r at
// position positions[r]; cos and sin are [n_positions, half] (the RopeCache), so the values equal the
// CPU's bit for bit (same table, products and sums rounded separately).
template <typename T>
__device__ void rope_at(const T* __restrict__ x, const unsigned* __restrict__ positions,
                        const float* __restrict__ cos_table, const float* __restrict__ sin_table, T* __restrict__ out,
                        unsigned long long n, unsigned int width, unsigned int head_dim, unsigned int half) {
    GRID_STRIDE(e, n) {
        const unsigned int d = (unsigned int)(e % width) % head_dim;
        const float v = to_f32(x[e]);
        if (d >= 2 * half) {
            out[e] = from_f32<T>(v);
            continue;
        }
        const unsigned long long pos = positions[e / width];
        const unsigned int i = d < half ? d : d - half;
        const float c = cos_table[pos * half + i], s = sin_table[pos * half + i];
        float r;
        if (d < half) {
            r = __fsub_rn(__fmul_rn(v, c), __fmul_rn(to_f32(x[e + half]), s));
        } else {
            r = __fadd_rn(__fmul_rn(v, c), __fmul_rn(to_f32(x[e - half]), s));
        }
        out[e] = from_f32<T>(r);
    }
}
#define ROPE_AT(T)                                                                                           \
    extern "C" __global__ void rope_at_##T(const T* __restrict__ x, const unsigned* __restrict__ positions,     \
                                           const float* __restrict__ cos_table,                              \
                                           const float* __restrict__ sin_table, T* __restrict__ out,         \
                                           unsigned long long n, unsigned int width, unsigned int head_dim,  \
                                           unsigned int half) {                                              \
        rope_at<T>(x, positions, cos_table, sin_table, out, n, width, head_dim, half);                        \
    }
FOR_EACH_DTYPE(ROPE_AT)

// rope_qkv_<t>_<c>(qkv, positions, slots, cos, sin, q, k_cache, v_cache, n, width, q_width, kv_width,
// head_dim, half): the fused q|k|v projection of a step split in one pass: q's columns rotated into
// q, k's rotated into the k cache at the row's slot, v's copied into the v cache there. The
// rotation is rope_at's; k is rounded to qkv's dtype before the cache's (what rope_at then
// write_kv_slots do), so the values equal the unfused ops' bit for bit.
template <typename T, typename C>
__device__ void rope_qkv(const T* __restrict__ qkv, const unsigned* __restrict__ positions,
                         const unsigned* __restrict__ slots, const float* __restrict__ cos_table,
                         const float* __restrict__ sin_table, T* __restrict__ q, C* __restrict__ k_cache,
                         C* __restrict__ v_cache, unsigned long long n, unsigned int width, unsigned int q_width,
                         unsigned int kv_width, unsigned int head_dim, unsigned int half) {
    GRID_STRIDE(e, n) {
        const unsigned long long r = e / width;
        const unsigned int c = (unsigned int)(e % width);
        const float v = to_f32(qkv[e]);
        if (c >= q_width + kv_width) {
            v_cache[(unsigned long long)slots[r] * kv_width + (c - q_width - kv_width)] = from_f32<C>(v);
            continue;
        }
        const unsigned int col = c < q_width ? c : c - q_width;  // within q's or k's columns
        const unsigned int d = col % head_dim;
        float out = v;
        if (d < 2 * half) {
            const unsigned long long pos = positions[r];
            const unsigned int i = d < half ? d : d - half;
            const float cs = cos_table[pos * half + i], sn = sin_table[pos * half + i];
            out = d < half ? __fsub_rn(__fmul_rn(v, cs), __fmul_rn(to_f32(qkv[e + half]), sn))
                           : __fadd_rn(__fmul_rn(v, cs), __fmul_rn(to_f32(qkv[e - half]), sn));
        }
        if (c < q_width) {
            q[r * q_width + col] = from_f32<T>(out);
        } else {
            k_cache[(unsigned long long)slots[r] * kv_width + col] = from_f32<C>(to_f32(from_f32<T>(out)));
        }
    }
}
#define ROPE_QKV(T, C)                                                                                       \
    extern "C" __global__ void rope_qkv_##T##_##C(                                                           \
        const T* __restrict__ qkv, const unsigned* __restrict__ positions, const unsigned* __restrict__ slots,  \
        const float* __restrict__ cos_table, const float* __restrict__ sin_table, T* __restrict__ q,           \
        C* __restrict__ k_cache, C* __restrict__ v_cache, unsigned long long n, unsigned int width,           \
        unsigned int q_width, unsigned int kv_width, unsigned int head_dim, unsigned int half) {              \
        rope_qkv<T, C>(qkv, positions, slots, cos_table, sin_table, q, k_cache, v_cache, n, width, q_width,   \
                       kv_width, head_dim, half);                                                            \
    }
FOR_EACH_DTYPE_PAIR(ROPE_QKV)

// Attention over the paged cache.
//
// One block of PA_WARPS warps per (query row, KV head, partition): the block serves the `group`
// query heads that read this KV head (GQA), so each key and value is loaded once for all of them.
// A row's visible positions [lo, pos] are cut into partitions of `part_len` positions; within a
// partition the warps take positions in turn, a lane holding E = head_dim / 32 values of each
// query, key and value. Each warp keeps a running softmax (max m, sum l, weighted values acc) per
// query head, rescaled as the max grows (Milakov & Gimelshein's online softmax, as FlashAttention);
// the warps' states are merged through shared memory at the end. With one partition the block
// writes the output row; with several it writes its partition's normalised output and (m, l) to a
// scratch buffer that paged_attention_merge combines (flash-decoding: a decode step has few rows,
// and partitions are what fills the GPU then).
#define PA_WARPS 4
#define PA_MAX_GROUP 8
// -inf (NVRTC has no math.h's INFINITY): the running max before any score.
#define NEG_INF __int_as_float(0xff800000)

template <typename C, int E>
__device__ __forceinline__ void load_lane(const C* __restrict__ p, float (&v)[E]) {
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] = to_f32(p[i]);
}
template <>
__device__ __forceinline__ void load_lane<f16, 2>(const f16* __restrict__ p, float (&v)[2]) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(p));
    v[0] = f.x;
    v[1] = f.y;
}
template <>
__device__ __forceinline__ void load_lane<f16, 4>(const f16* __restrict__ p, float (&v)[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
    v[0] = a.x;
    v[1] = a.y;
    v[2] = b.x;
    v[3] = b.y;
}
template <>
__device__ __forceinline__ void load_lane<f16, 8>(const f16* __restrict__ p, float (&v)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}

template <typename T, typename C, int E>
__device__ void paged_attention(const T* __restrict__ q, const C* __restrict__ k_cache, const C* __restrict__ v_cache,
                                const unsigned* __restrict__ positions, const unsigned* __restrict__ row_tables,
                                const unsigned* __restrict__ tables, T* __restrict__ out, float* __restrict__ part_out,
                                float* __restrict__ part_ml, unsigned int n_heads, unsigned int n_kv_heads,
                                unsigned int block_size, unsigned int window, float scale, unsigned int part_len) {
    constexpr int HD = 32 * E;
    const unsigned int r = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z, n_parts = gridDim.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned int group = n_heads / n_kv_heads;
    const unsigned int pos = positions[r];
    const unsigned int lo = (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const unsigned int begin = lo + part * part_len;
    const unsigned int end = min(pos + 1, begin + part_len);  // empty when begin > pos
    const unsigned* table = tables + row_tables[r];
    const unsigned long long kv_width = (unsigned long long)n_kv_heads * HD;

    float qv[PA_MAX_GROUP][E], acc[PA_MAX_GROUP][E], m[PA_MAX_GROUP], l[PA_MAX_GROUP];
#pragma unroll
    for (int g = 0; g < PA_MAX_GROUP; ++g) {
        m[g] = NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < E; ++i) {
            acc[g][i] = 0.f;
            qv[g][i] = g < group ? to_f32(q[((unsigned long long)r * n_heads + kvh * group + g) * HD + lane * E + i]) : 0.f;
        }
    }
    // A warp takes positions begin + warp, + PA_WARPS, ... in turn, UNROLL at a time: the chunk's
    // keys and values are all requested before any is used, so their loads (each behind its
    // block-table entry: two dependent global reads) overlap instead of stalling the warp one
    // position after another. The positions and their order are a warp's as before; only the
    // loads moved.
    constexpr int UNROLL = E >= 8 ? 2 : 4;
    for (unsigned int t0 = begin + warp; t0 < end; t0 += PA_WARPS * UNROLL) {
        float kv[UNROLL][E], vv[UNROLL][E];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const unsigned int t = t0 + u * PA_WARPS;
            if (t >= end) break;
            const unsigned long long slot = (unsigned long long)table[t / block_size] * block_size + t % block_size;
            const unsigned long long at = slot * kv_width + (unsigned long long)kvh * HD + lane * E;
            load_lane<C, E>(k_cache + at, kv[u]);
            load_lane<C, E>(v_cache + at, vv[u]);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (t0 + u * PA_WARPS >= end) break;
#pragma unroll
            for (int g = 0; g < PA_MAX_GROUP; ++g) {
                if (g >= group) break;
                float dot = 0.f;
#pragma unroll
                for (int i = 0; i < E; ++i) dot = fmaf(qv[g][i], kv[u][i], dot);
                const float s = warp_sum(dot) * scale;
                const float m_new = fmaxf(m[g], s);
                const float correction = expf(m[g] - m_new), p = expf(s - m_new);
                l[g] = l[g] * correction + p;
#pragma unroll
                for (int i = 0; i < E; ++i) acc[g][i] = fmaf(p, vv[u][i], acc[g][i] * correction);
                m[g] = m_new;
            }
        }
    }

    // Merge the warps: every warp publishes its state, then each thread finishes some (head, value)
    // pairs of the block's group.
    __shared__ float s_m[PA_WARPS][PA_MAX_GROUP], s_l[PA_WARPS][PA_MAX_GROUP];
    __shared__ float s_acc[PA_WARPS][PA_MAX_GROUP][HD];
#pragma unroll
    for (int g = 0; g < PA_MAX_GROUP; ++g) {
        if (g >= group) break;
        if (lane == 0) {
            s_m[warp][g] = m[g];
            s_l[warp][g] = l[g];
        }
#pragma unroll
        for (int i = 0; i < E; ++i) s_acc[warp][g][lane * E + i] = acc[g][i];
    }
    __syncthreads();
    for (unsigned int task = threadIdx.x; task < group * HD; task += blockDim.x) {
        const unsigned int g = task / HD, d = task % HD;
        float mm = NEG_INF;
        for (int w = 0; w < PA_WARPS; ++w) mm = fmaxf(mm, s_m[w][g]);
        float ll = 0.f, o = 0.f;
        if (mm != NEG_INF) {
            for (int w = 0; w < PA_WARPS; ++w) {
                const float f = expf(s_m[w][g] - mm);
                ll += s_l[w][g] * f;
                o += s_acc[w][g][d] * f;
            }
            o /= ll;
        }
        const unsigned long long head = (unsigned long long)r * n_heads + kvh * group + g;
        if (n_parts == 1) {
            out[head * HD + d] = from_f32<T>(o);
        } else {
            part_out[(head * n_parts + part) * HD + d] = o;
            if (d == 0) {
                part_ml[(head * n_parts + part) * 2] = mm;
                part_ml[(head * n_parts + part) * 2 + 1] = ll;
            }
        }
    }
}

// paged_attention_<t>_<t>_<hd>(q, k_cache, v_cache, positions, row_tables, tables, out, part_out,
// part_ml, n_heads, n_kv_heads, block_size, window, scale, part_len): grid (rows, n_kv_heads,
// n_parts), PA_WARPS * 32 threads; n_heads / n_kv_heads <= PA_MAX_GROUP; window 0 = none.
#define PAGED_ATTENTION(T, C, HD)                                                                            \
    extern "C" __global__ void __launch_bounds__(PA_WARPS * 32) paged_attention_##T##_##C##_##HD(             \
        const T* __restrict__ q, const C* __restrict__ k_cache, const C* __restrict__ v_cache,                \
        const unsigned* __restrict__ positions, const unsigned* __restrict__ row_tables,                      \
        const unsigned* __restrict__ tables, T* __restrict__ out, float* __restrict__ part_out,               \
        float* __restrict__ part_ml, unsigned int n_heads, unsigned int n_kv_heads, unsigned int block_size,  \
        unsigned int window, float scale, unsigned int part_len) {                                            \
        paged_attention<T, C, HD / 32>(q, k_cache, v_cache, positions, row_tables, tables, out, part_out,     \
                                       part_ml, n_heads, n_kv_heads, block_size, window, scale, part_len);    \
    }
// The cache has the queries' dtype (f16 on a GPU, f32 in the CPU-shaped tests).
#define PAGED_ATTENTION_DIMS(T) PAGED_ATTENTION(T, T, 64) PAGED_ATTENTION(T, T, 128) PAGED_ATTENTION(T, T, 256)
FOR_EACH_DTYPE(PAGED_ATTENTION_DIMS)

// paged_attention_merge_<t>(part_out, part_ml, out, n_parts, head_dim): one block of head_dim threads
// per (row, head): the partitions' outputs weighted by l * exp(m - max m), as one softmax over all
// positions would have weighted them. Partitions past a row's positions have l = 0.
#define PAGED_ATTENTION_MERGE(T)                                                                             \
    extern "C" __global__ void paged_attention_merge_##T(const float* __restrict__ part_out,                  \
                                                         const float* __restrict__ part_ml, T* __restrict__ out, \
                                                         unsigned int n_parts, unsigned int head_dim) {        \
        const unsigned long long head = blockIdx.x;                                                          \
        const float* ml = part_ml + head * n_parts * 2;                                                      \
        float mm = NEG_INF;                                                                                \
        for (unsigned int p = 0; p < n_parts; ++p) mm = fmaxf(mm, ml[2 * p]);                                 \
        for (unsigned int d = threadIdx.x; d < head_dim; d += blockDim.x) {                                  \
            float weight_sum = 0.f, o = 0.f;                                                                 \
            for (unsigned int p = 0; p < n_parts; ++p) {                                                     \
                if (ml[2 * p] == NEG_INF) continue;                                                        \
                const float w = ml[2 * p + 1] * expf(ml[2 * p] - mm);                                         \
                weight_sum += w;                                                                             \
                o += w * part_out[(head * n_parts + p) * head_dim + d];                                      \
            }                                                                                                \
            out[head * head_dim + d] = from_f32<T>(o / weight_sum);                                          \
        }                                                                                                    \
    }
FOR_EACH_DTYPE(PAGED_ATTENTION_MERGE)
