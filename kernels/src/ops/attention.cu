// attention.cu: causal grouped-query attention, the CUDA half of ops/attention.rs, flash-style
// (Dao et al. 2022): the [T, T] score matrix is never stored. Same mask and GQA mapping as the CPU
// (query head h reads kv head h / (n_heads / n_kv_heads); key j is visible to query i when j <= i
// and i - j < window), f32 arithmetic throughout, output rounded once to the dtype.
//
// One block of 4 warps per (sequence, head, tile of BLOCK_Q = 32 queries); each warp owns 8 query
// rows. The block walks the keys its rows can see in tiles of BLOCK_KV = 32, staged in shared
// memory as f32, and keeps for each row a running maximum m, a running sum l of exp(s - m) and an
// unnormalised output o (online softmax, Milakov & Gimelshein 2018); when a tile raises m, the
// earlier l and o are scaled by exp(m_old - m_new). The output is o / l at the end.
//
// Per tile, two phases with one shared buffer (K, then V, so a 256-wide head fits in 69 KiB):
// - scores: lane l scores key l of the tile against the warp's 8 rows, reading its K row as
//   float4 (the row stride is 4 mod 8 floats, so the 8 lanes of each quarter-warp hit different
//   banks) and the query rows as float4 broadcasts. The scores never leave registers: warp
//   shuffles give the rows' maxima and sums, and each lane writes its p = exp(s - m) to p_s.
// - values: lane l owns output dims l, l + 32, ... (HD_MAX / 32 accumulators per row) and adds
//   p * V over the tile, reading 4 keys' p at once as a float4 broadcast.
//
// Dynamic shared memory, in floats (the Rust launcher computes the same size; keep them in step):
//   q_s  [BLOCK_Q][q_stride]    q_stride  = head_dim rounded up to 4 (float4 reads)
//   kv_s [BLOCK_KV][kv_stride]  kv_stride = head_dim rounded up to 8, plus 4 (conflict-free float4)
//   p_s  [BLOCK_Q][BLOCK_KV]
// Columns past head_dim and rows past the sequence or the tile are staged as 0, so the float4
// reads past head_dim add 0 * 0 and keys past the tile add p * V = 0 * 0 (never 0 * uninitialised
// memory, which could be NaN).
#include "common.cuh"

constexpr int N_WARPS = 4;
constexpr int ROWS_PER_WARP = 8;
constexpr int BLOCK_Q = N_WARPS * ROWS_PER_WARP;  // query rows per block
constexpr int BLOCK_KV = 32;                      // keys per tile: one per lane when scoring
constexpr int THREADS = N_WARPS * 32;

// Stages rows [first, first + count) of a [*, row_stride] matrix (from `base`, head_dim values
// each) into dst[n_rows][dst_stride] as f32, filling `cols` columns; the rest of the n_rows x cols
// box is 0. Consecutive threads take consecutive values of a row (coalesced reads).
template <typename T>
__device__ void stage_rows(const T* __restrict__ base, unsigned long long row_stride, unsigned int first,
                           unsigned int count, unsigned int head_dim, float* __restrict__ dst, int n_rows,
                           unsigned int cols, unsigned int dst_stride) {
    for (unsigned int idx = threadIdx.x; idx < n_rows * cols; idx += blockDim.x) {
        const unsigned int r = idx / cols, d = idx % cols;
        dst[r * dst_stride + d] =
            r < count && d < head_dim ? to_f32(base[(unsigned long long)(first + r) * row_stride + d]) : 0.0f;
    }
}

template <typename T, int HD_MAX>
__device__ void causal_attention(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                 T* __restrict__ out, unsigned int seq_len, unsigned int n_heads,
                                 unsigned int n_kv_heads, unsigned int head_dim, unsigned int window,
                                 float scale) {
    constexpr int DIMS_PER_LANE = HD_MAX / 32;
    const float neg_inf = -__int_as_float(0x7f800000);  // no <cmath> under NVRTC

    extern __shared__ float4 smem4[];  // declared as float4 for 16-byte alignment
    float* smem = reinterpret_cast<float*>(smem4);
    const unsigned int q_stride = (head_dim + 3) & ~3u;
    const unsigned int kv_stride = ((head_dim + 7) & ~7u) + 4;
    float* q_s = smem;
    float* kv_s = q_s + BLOCK_Q * q_stride;
    float* p_s = kv_s + BLOCK_KV * kv_stride;

    // blockIdx.x = (seq * n_heads + head) * n_tiles + (n_tiles - 1 - tile): the last query tiles
    // see the most keys, so they start first and the grid does not end on a few long blocks.
    const unsigned int n_tiles = (seq_len + BLOCK_Q - 1) / BLOCK_Q;
    const unsigned int tile = n_tiles - 1 - blockIdx.x % n_tiles;
    const unsigned int head = (blockIdx.x / n_tiles) % n_heads;
    const unsigned int seq = blockIdx.x / n_tiles / n_heads;
    const unsigned int kv_head = head / (n_heads / n_kv_heads);

    // Row i of this sequence's head is at base + i * width (rows are [batch * seq_len, heads * hd]).
    const unsigned long long q_width = (unsigned long long)n_heads * head_dim;
    const unsigned long long kv_width = (unsigned long long)n_kv_heads * head_dim;
    const unsigned long long first_row = (unsigned long long)seq * seq_len;
    const T* q_base = q + first_row * q_width + (unsigned long long)head * head_dim;
    const T* k_base = k + first_row * kv_width + (unsigned long long)kv_head * head_dim;
    const T* v_base = v + first_row * kv_width + (unsigned long long)kv_head * head_dim;
    T* out_base = out + first_row * q_width + (unsigned long long)head * head_dim;

    const unsigned int q0 = tile * BLOCK_Q;
    const unsigned int q_end = min(q0 + BLOCK_Q, seq_len);
    stage_rows(q_base, q_width, q0, q_end - q0, head_dim, q_s, BLOCK_Q, q_stride, q_stride);

    const unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const unsigned int row0 = warp * ROWS_PER_WARP;  // the warp's first row in the tile
    float m[ROWS_PER_WARP], l[ROWS_PER_WARP], o[ROWS_PER_WARP][DIMS_PER_LANE];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        m[r] = neg_inf;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < DIMS_PER_LANE; ++c) o[r][c] = 0.0f;
    }

    // The keys some row of the tile sees: from q0 + 1 - window (query q0's first) to q_end - 1.
    const unsigned int kv_begin = q0 + 1 > window ? q0 + 1 - window : 0;
    for (unsigned int kv0 = kv_begin; kv0 < q_end; kv0 += BLOCK_KV) {
        const unsigned int kv_count = min((unsigned int)BLOCK_KV, q_end - kv0);

        __syncthreads();  // every warp is done with the previous tile's V (and with q_s staging)
        stage_rows(k_base, kv_width, kv0, kv_count, head_dim, kv_s, BLOCK_KV, q_stride, kv_stride);
        __syncthreads();

        // Scores of key kv0 + lane against the warp's rows. Past head_dim both sides are 0.
        float s[ROWS_PER_WARP];
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) s[r] = 0.0f;
        const float* k_row = kv_s + lane * kv_stride;
        // Not unrolled: one step already issues 9 independent float4 reads, and unrolling it (or the
        // value loop below) only adds live registers until ptxas spills (sm_90, NVRTC 13.0).
#pragma unroll 1
        for (unsigned int d = 0; d < q_stride; d += 4) {
            const float4 kk = *reinterpret_cast<const float4*>(k_row + d);
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r) {
                const float4 qq = *reinterpret_cast<const float4*>(q_s + (row0 + r) * q_stride + d);
                s[r] += qq.x * kk.x + qq.y * kk.y + qq.z * kk.z + qq.w * kk.w;
            }
        }

        // Online softmax. A masked key (and every key of a row past the sequence) gets p = 0; a row
        // that has seen no visible key yet keeps m = -inf, l = 0, o = 0 (alpha is taken as 0
        // rather than exp(-inf - -inf) = NaN).
        const unsigned int j = kv0 + lane;
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) {
            const unsigned int i = q0 + row0 + r;
            const bool visible = i < seq_len && j <= i && i - j < window;  // j <= i < q_end: in the tile
            const float score = visible ? s[r] * scale : neg_inf;
            const float m_new = fmaxf(m[r], warp_max(score));
            const float p = visible ? expf(score - m_new) : 0.0f;
            const float alpha = m[r] == neg_inf ? 0.0f : expf(m[r] - m_new);
            l[r] = l[r] * alpha + warp_sum(p);
            m[r] = m_new;
#pragma unroll
            for (int c = 0; c < DIMS_PER_LANE; ++c) o[r][c] *= alpha;
            p_s[(row0 + r) * BLOCK_KV + lane] = p;
        }

        __syncthreads();  // every warp is done with K (and p_s is written) before V replaces K
        stage_rows(v_base, kv_width, kv0, kv_count, head_dim, kv_s, BLOCK_KV, q_stride, kv_stride);
        __syncthreads();

        // o += p V over the tile's keys, 4 at a time; keys past kv_count have p = 0 and V = 0.
        const unsigned int kv_count4 = (kv_count + 3) & ~3u;
#pragma unroll 1
        for (unsigned int jj = 0; jj < kv_count4; jj += 4) {
            float4 pp[ROWS_PER_WARP];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r)
                pp[r] = *reinterpret_cast<const float4*>(p_s + (row0 + r) * BLOCK_KV + jj);
#pragma unroll
            for (int c = 0; c < DIMS_PER_LANE; ++c) {
                const unsigned int d = lane + 32 * c;
                if (d < head_dim) {
                    const float* vv = kv_s + jj * kv_stride + d;
                    const float v0 = vv[0], v1 = vv[kv_stride], v2 = vv[2 * kv_stride], v3 = vv[3 * kv_stride];
#pragma unroll
                    for (int r = 0; r < ROWS_PER_WARP; ++r)
                        o[r][c] += pp[r].x * v0 + pp[r].y * v1 + pp[r].z * v2 + pp[r].w * v3;
                }
            }
        }
    }

    // o / l; a row that saw no key (only with a window of 0) is 0, as on the CPU.
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const unsigned int i = q0 + row0 + r;
        if (i >= seq_len) continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        T* dst = out_base + (unsigned long long)i * q_width;
#pragma unroll
        for (int c = 0; c < DIMS_PER_LANE; ++c) {
            const unsigned int d = lane + 32 * c;
            if (d < head_dim) dst[d] = from_f32<T>(o[r][c] * inv);
        }
    }
}

// causal_attention_<t>_hd<HD_MAX>(q, k, v, out, seq_len, n_heads, n_kv_heads, head_dim, window,
// scale): head_dim <= HD_MAX; grid = batch * n_heads * ceil(seq_len / BLOCK_Q) blocks of THREADS
// threads; dynamic shared memory as laid out above; window = seq_len for full causal attention.
#define CAUSAL_ATTENTION(T, HD)                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS) causal_attention_##T##_hd##HD(                \
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out, \
        unsigned int seq_len, unsigned int n_heads, unsigned int n_kv_heads, unsigned int head_dim,     \
        unsigned int window, float scale) {                                                             \
        causal_attention<T, HD>(q, k, v, out, seq_len, n_heads, n_kv_heads, head_dim, window, scale);   \
    }
#define CAUSAL_ATTENTION_EVERY_HD(T) CAUSAL_ATTENTION(T, 64) CAUSAL_ATTENTION(T, 128) CAUSAL_ATTENTION(T, 256)
FOR_EACH_DTYPE(CAUSAL_ATTENTION_EVERY_HD)
