// stream.cu: w4a16_stream_*_t{1,2,4,8}, the split-K mma.sync kernel (stream.rs launches it): up to
// 64 activation rows (small weights at up to 16, 17 to 32 rows of weights no wider than long, and
// every call up to 64 rows on GPUs without wgmma). One block of 8 warps per (8*TILES rows, 128
// output rows, a range of K slices), pipelined a slice ahead (w4a16_stream); K ranges meet in an
// f32 workspace (split-K, finish_block). The weight layout and what the kernels share: w4a16.cuh.
#include "w4a16.cuh"

constexpr int STREAM_MAX_CHUNKS = 8; // 64-column chunks per slice at most: 16-byte loads per lane per slice

// Input columns per K slice for TILES token tiles: 512, fewer for many tokens so the two staged
// slices of activations stay near 32 KB of shared memory.
template <int TILES> struct StreamSlice {
    static constexpr int COLS = TILES <= 2 ? 512 : (TILES == 4 ? 256 : 128);
    static constexpr int CHUNKS = COLS / 64;
    static constexpr int PITCH = COLS + 16;  // halves per staged row: +32 bytes, so the 8-byte loads of 8 rows hit distinct banks
};

// 16 bytes global -> shared without passing through registers (the copy engine of sm_80+).
__device__ __forceinline__ void copy_async_16(void* smem, const void* gmem) {
    const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most one committed group (the newest) is still in flight.
__device__ __forceinline__ void copy_async_wait_all_but_newest() { asm volatile("cp.async.wait_group 1;\n" ::); }

// One warp's running state over the groups of its tile.
struct GroupCursor {
    int group, step_in_group;
    GroupParams gp;
};

// The MMAs of one K slice for one warp: A = the tile's dequantized codes (q - z, exact) from the
// slice's words, B = the staged activations; each group's f32 sum is scaled when the group ends.
template <typename T, int TILES>
__device__ __forceinline__ void mma_slice(const uint4 (&q)[STREAM_MAX_CHUNKS], const T* staged_x, int c_count,
                                          const uint2* tile_params, int groups, int steps_per_group,
                                          GroupCursor& cur, float (&acc)[TILES][4], float (&part)[TILES][4]) {
    typedef Int4Traits<T> Tr;
    constexpr int PITCH = StreamSlice<TILES>::PITCH;
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int u = 0; u < StreamSlice<TILES>::CHUNKS; ++u) {
        if (u >= c_count) continue;  // not `break`: keeps the loop unrolled, q in registers
        const unsigned qw[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            unsigned a[4];
            Tr::dequant(qw[j], cur.gp, a);
#pragma unroll
            for (int t = 0; t < TILES; ++t) {
                const uint2 b = load_b(staged_x + (t * 8 + gid) * PITCH, (u * 4 + j) * 16, tig, true);
                Tr::mma(part[t], a, b.x, b.y);
            }
            if (++cur.step_in_group == steps_per_group) {
                fold_group<T, TILES>(acc, part, cur.gp);
                cur.step_in_group = 0;
                if (++cur.group < groups) cur.gp = split_params(__ldg(tile_params + (size_t)cur.group * 8));
            }
        }
    }
}

// Writes a block's results. C fragment element i of token tile t is output row gid + 8 * (i / 2)
// of the warp's tile, token 8t + 2 * tig + i % 2. With one K range (gridDim.z == 1) the block
// writes y. With several, each writes f32 partial sums to `partial` [range][token][n] and the last
// block of the (token block, tile group) to arrive, counted in `arrivals`, adds them in range
// order (the result does not depend on which block came last), adds the bias, writes y and resets
// its counter to 0 for the next launch. Every thread of the block must call it.
template <typename T, int TILES>
__device__ void finish_block(const float (&acc)[TILES][4], bool has_tile, int tile, int token0,
                             const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ partial,
                             unsigned* __restrict__ arrivals, int m, int n, int has_bias) {
    constexpr int TOKENS = 8 * TILES;
    __shared__ bool last_block;
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    if (gridDim.z == 1) {
        if (!has_tile) return;
#pragma unroll
        for (int t = 0; t < TILES; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int token = token0 + 8 * t + 2 * tig + (i & 1), col = tile * 16 + gid + 8 * (i >> 1);
                if (token < m) y[(size_t)token * n + col] = from_f32<T>(acc[t][i] + (has_bias ? to_f32(bias[col]) : 0.0f));
            }
        return;
    }
    if (has_tile) {
#pragma unroll
        for (int t = 0; t < TILES; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int token = token0 + 8 * t + 2 * tig + (i & 1), col = tile * 16 + gid + 8 * (i >> 1);
                if (token < m) partial[((size_t)blockIdx.z * m + token) * n + col] = acc[t][i];
            }
    }
    __threadfence();  // our partials are visible device-wide before we are counted
    __syncthreads();
    unsigned* counter = arrivals + (size_t)blockIdx.x * gridDim.y + blockIdx.y;
    if (threadIdx.x == 0) last_block = atomicAdd(counter, 1u) == gridDim.z - 1;
    __syncthreads();
    if (!last_block) return;
    __threadfence();  // and everyone else's are visible to us
    const int rows = min(STREAM_WARPS * 16, n - (int)blockIdx.y * STREAM_WARPS * 16);
    for (int v = threadIdx.x; v < TOKENS * rows; v += blockDim.x) {
        const int token = token0 + v / rows, col = blockIdx.y * STREAM_WARPS * 16 + v % rows;
        if (token >= m) continue;
        float sum = has_bias ? to_f32(bias[col]) : 0.0f;
        for (int r = 0; r < (int)gridDim.z; ++r) sum += __ldcg(partial + ((size_t)r * m + token) * n + col);
        y[(size_t)token * n + col] = from_f32<T>(sum);
    }
    if (threadIdx.x == 0) *counter = 0;
}

// Block (token block, group of 8 tiles, K range): each warp owns one 16-row tile and walks the
// block's K slices with a two-deep pipeline: while it multiplies slice s, the words of slice s + 1
// are on their way to its registers and the block's copy of the activations of slice s + 1 is on
// its way to shared memory (cp.async), so HBM always has this warp's next 4 KB in flight.
// Used from 17 tokens up, for small weights below (its fixed cost is the smaller), and for every
// size up to 64 on GPUs without TMA bulk copies (where w4a16_gemv is empty).
template <typename T, int TILES>
__device__ void w4a16_stream(const uint4* __restrict__ words, const uint2* __restrict__ params,
                             const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                             float* __restrict__ partial, unsigned* __restrict__ arrivals,
                             int m, int n, int k, int group_size, int slices_per_block, int has_bias) {
    typedef StreamSlice<TILES> Slice;
    constexpr int TOKENS = 8 * TILES;
    __shared__ __align__(16) T staged_x[2][TOKENS * Slice::PITCH];

    // Every thread reads x or writes y, the partial sums or the counters from the start: the
    // overlap with the kernel before is just the launch (the decode kernel does more).
    allow_next_kernel();
    wait_for_previous_kernel();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2;
    const int token0 = blockIdx.x * TOKENS;
    const int tile = blockIdx.y * STREAM_WARPS + warp;
    const int chunks = k >> 6, groups = k / group_size, steps_per_group = group_size >> 4;
    const int slices = (chunks + Slice::CHUNKS - 1) / Slice::CHUNKS;
    const int s_begin = blockIdx.z * slices_per_block, s_end = min(slices, s_begin + slices_per_block);
    const bool has_tile = tile < (n >> 4);

    // Requests the words of slice s (this warp) and the activations of slice s (the block), the
    // latter zero for tokens past m (their MMA columns are discarded) and columns past k.
    auto request = [&](uint4 (&q)[STREAM_MAX_CHUNKS], T* staged, int s) {
        const int c0 = s * Slice::CHUNKS, c_count = min(Slice::CHUNKS, chunks - c0);
        const uint4* tile_words = words + piece_index(tile, c0, gridDim.y) * 32 + lane;
#pragma unroll
        for (int u = 0; u < Slice::CHUNKS; ++u)
            if (has_tile && u < c_count) q[u] = load_stream(tile_words + (size_t)u * 32);
        for (int v = threadIdx.x; v < TOKENS * (Slice::COLS / 8); v += blockDim.x) {
            const int r = v / (Slice::COLS / 8), c = (v % (Slice::COLS / 8)) * 8;
            T* dst = staged + r * Slice::PITCH + c;
            if (token0 + r < m && c < c_count * 64) copy_async_16(dst, x + (size_t)(token0 + r) * k + c0 * 64 + c);
            else *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
        }
        copy_async_commit();
    };

    float acc[TILES][4], part[TILES][4];
#pragma unroll
    for (int t = 0; t < TILES; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][i] = part[t][i] = 0.0f;
    const uint2* tile_params = params + (size_t)min(tile, (n >> 4) - 1) * groups * 8 + gid;
    GroupCursor cur;
    cur.group = (s_begin * Slice::CHUNKS * 4) / steps_per_group;
    cur.step_in_group = (s_begin * Slice::CHUNKS * 4) % steps_per_group;
    cur.gp = split_params(__ldg(tile_params + (size_t)min(cur.group, groups - 1) * 8));

    uint4 q_even[STREAM_MAX_CHUNKS], q_odd[STREAM_MAX_CHUNKS];
    request(q_even, staged_x[0], s_begin);
    for (int s = s_begin; s < s_end; ++s) {
        const bool even = ((s - s_begin) & 1) == 0;
        if (s + 1 < s_end) {
            if (even) request(q_odd, staged_x[1], s + 1);
            else request(q_even, staged_x[0], s + 1);
        } else {
            copy_async_commit();  // an empty group keeps "all but the newest" meaning slice s
        }
        copy_async_wait_all_but_newest();
        __syncthreads();  // slice s's activations are in shared memory for every warp
        const int c_count = min(Slice::CHUNKS, chunks - s * Slice::CHUNKS);
        if (has_tile) {
            if (even) mma_slice<T, TILES>(q_even, staged_x[0], c_count, tile_params, groups, steps_per_group, cur, acc, part);
            else mma_slice<T, TILES>(q_odd, staged_x[1], c_count, tile_params, groups, steps_per_group, cur, acc, part);
        }
        __syncthreads();  // everyone is done reading the buffer the next request overwrites
    }
    if (has_tile && cur.step_in_group != 0) fold_group<T, TILES>(acc, part, cur.gp);

    finish_block<T, TILES>(acc, has_tile, tile, token0, bias, y, partial, arrivals, m, n, has_bias);
}

#define W4A16_STREAM(T, TILES)                                                                          \
    extern "C" __global__ void __launch_bounds__(STREAM_WARPS * 32)                                     \
        w4a16_stream_##T##_t##TILES(const uint4* words, const uint2* params, const T* x, const T* bias, \
                                    T* y, float* partial, unsigned* arrivals, int m, int n, int k,      \
                                    int group_size, int slices_per_block, int has_bias) {               \
        w4a16_stream<T, TILES>(words, params, x, bias, y, partial, arrivals, m, n, k, group_size,      \
                               slices_per_block, has_bias);                                             \
    }

W4A16_STREAM(f16, 1) W4A16_STREAM(f16, 2) W4A16_STREAM(f16, 4) W4A16_STREAM(f16, 8)
W4A16_STREAM(bf16, 1) W4A16_STREAM(bf16, 2) W4A16_STREAM(bf16, 4) W4A16_STREAM(bf16, 8)
