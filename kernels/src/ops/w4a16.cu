// w4a16.cu: 4-bit weights times 16-bit activations (ops/w4a16.rs), for f16 and bf16.
//
// Weight layout (built once on the host by Int4Weight::from_awq, see w4a16.rs): the weight [N, K]
// is cut into pieces of 16 output rows (a tile) x 64 input columns (a chunk); piece (t, c) is 512
// bytes, one uint4 per lane of a warp, at words[piece_index(t, c) * 32 + lane]. Pieces are ordered
// so that what one streaming block reads (8 tiles x 8 chunks, 32 KB) is contiguous and the blocks
// of a launch read the weight front to back (strided reads of 4 KB would leave much of HBM's
// bandwidth unused); missing tiles and chunks at the edges are zero padding. Word j of a lane's uint4
// holds the 8 codes that lane feeds, as the A operand, to the j-th m16n8k16 tensor-core MMA of the
// 64-column chunk (rows gid and gid + 8, columns 2*tig, 2*tig + 1, 2*tig + 8, 2*tig + 9, with
// gid = lane / 4 and tig = lane % 4), in the nibble order that the magic-number conversion below
// turns into the MMA's register pairs with one shift, one AND and one OR per pair:
//   (word >> 4i) & 0x000F000F | MAGIC  ->  the 16-bit pair (MAGIC + code, MAGIC + code') = register i.
// MAGIC is 1024.0 in f16 (0x6400) and 128.0 in bf16 (0x4300): OR-ing a nibble into the low
// mantissa bits gives MAGIC + nibble exactly. Subtracting (MAGIC + zero) leaves q - z, an exact
// small integer, so the tensor cores multiply exact integers by the activations in f32; the group's
// scale is applied to the f32 partial sum when the group ends (one FMA per accumulator per group).
//
// Group parameters: params[(t * K/g + group) * 8 + r] is a uint2 holding four 16-bit values for
// rows r and r + 8 of tile t: (MAGIC + zero[r], MAGIC + zero[r+8], scale[r], scale[r+8]).
//
// Kernels:
// - w4a16_stream_*_t{1,2} (up to 16 activation rows): one block of 8 warps per (8*TILES rows, 128
//   output rows, one K slice of 512 columns); each warp requests its 16-row tile's words of the
//   slice at once with 16-byte non-allocating loads while the block stages the slice's activations
//   in shared memory (w4a16_stream_slice).
// - w4a16_stream_*_t{4,8} (17 to 64 rows): the same per block over a range of K slices, pipelined a
//   slice ahead (w4a16_stream).
//   In both, K ranges meet in an f32 workspace (split-K, finish_block).
// - w4a16_dequantize_*: writes the dense weight [N, K] (for cuBLAS at large batch), one warp per
//   16x64 piece, staged through shared memory so every store is a full 16-byte vector.
#include "common.cuh"

template <typename T> struct Int4Traits;
template <> struct Int4Traits<f16> {
    static constexpr unsigned MAGIC = 0x64006400u;
    static __device__ __forceinline__ unsigned sub2(unsigned a, unsigned b) {
        __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
        return *reinterpret_cast<unsigned*>(&r);
    }
    static __device__ __forceinline__ unsigned mul2(unsigned a, unsigned b) {
        __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
        return *reinterpret_cast<unsigned*>(&r);
    }
    static __device__ __forceinline__ float bits_to_f32(unsigned bits) {
        return __half2float(__ushort_as_half((unsigned short)bits));
    }
    static __device__ __forceinline__ void mma(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct Int4Traits<bf16> {
    static constexpr unsigned MAGIC = 0x43004300u;
    static __device__ __forceinline__ unsigned sub2(unsigned a, unsigned b) {
        __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
        return *reinterpret_cast<unsigned*>(&r);
    }
    static __device__ __forceinline__ unsigned mul2(unsigned a, unsigned b) {
        __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
        return *reinterpret_cast<unsigned*>(&r);
    }
    static __device__ __forceinline__ float bits_to_f32(unsigned bits) { return __uint_as_float(bits << 16); }
    static __device__ __forceinline__ void mma(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// A weight word read once: bypass L1 (nothing else reads it). W4A16_LOAD picks the PTX load (a
// benchmark knob, see AWQ_NVRTC_DEFINES in cuda/nvrtc.rs).
#ifndef W4A16_LOAD
#define W4A16_LOAD "ld.global.nc.L1::no_allocate.v4.u32"
#endif
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm volatile(W4A16_LOAD " {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Where piece (tile, chunk) starts, in uint4 units / 32: [slice of 8 chunks][group of 8 tiles]
// [tile % 8][chunk % 8]. w4a16.rs (piece_index) computes the same.
__device__ __forceinline__ size_t piece_index(int tile, int chunk, int tile_groups) {
    return ((((size_t)(chunk >> 3) * tile_groups + (tile >> 3)) * 8 + (tile & 7)) * 8 + (chunk & 7));
}

// Register i of the A operand, before the zero point: codes at nibbles i and i + 4 as MAGIC + code.
template <typename T> __device__ __forceinline__ unsigned magic_pair(unsigned word, int i) {
    return ((word >> (4 * i)) & 0x000F000Fu) | Int4Traits<T>::MAGIC;
}

// The group parameters one lane needs: zero points as (MAGIC + z) pairs for rows gid and gid + 8,
// and the two scales.
struct GroupParams {
    unsigned zero_lo, zero_hi;  // (MAGIC + z[gid]) twice, (MAGIC + z[gid + 8]) twice
    unsigned scale_lo_bits, scale_hi_bits;
};
__device__ __forceinline__ GroupParams split_params(uint2 p) {
    GroupParams g;
    g.zero_lo = (p.x & 0xFFFFu) * 0x10001u;
    g.zero_hi = (p.x >> 16) * 0x10001u;
    g.scale_lo_bits = p.y & 0xFFFFu;
    g.scale_hi_bits = p.y >> 16;
    return g;
}

// Adds a finished group's partial sums, times its scales, to the accumulators; clears the partials.
template <typename T, int TILES>
__device__ __forceinline__ void fold_group(float (&acc)[TILES][4], float (&part)[TILES][4], const GroupParams& gp) {
    const float s_lo = Int4Traits<T>::bits_to_f32(gp.scale_lo_bits), s_hi = Int4Traits<T>::bits_to_f32(gp.scale_hi_bits);
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
        acc[t][0] += s_lo * part[t][0];
        acc[t][1] += s_lo * part[t][1];
        acc[t][2] += s_hi * part[t][2];
        acc[t][3] += s_hi * part[t][3];
#pragma unroll
        for (int i = 0; i < 4; ++i) part[t][i] = 0.0f;
    }
}

constexpr int STREAM_WARPS = 8;     // one 16-row weight tile per warp: 128 output rows per block
constexpr int STREAM_MAX_CHUNKS = 8; // 64-column chunks per slice at most: 16-byte loads per lane per slice

// Input columns per K slice for TILES token tiles: 512, fewer for many tokens so the two staged
// slices of activations stay near 32 KB of shared memory.
template <int TILES> struct StreamSlice {
    static constexpr int COLS = TILES <= 2 ? 512 : (TILES == 4 ? 256 : 128);
    static constexpr int CHUNKS = COLS / 64;
    static constexpr int PITCH = COLS + 8;  // halves per staged row: +16 bytes spreads rows over banks
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
            a[0] = Tr::sub2(magic_pair<T>(qw[j], 0), cur.gp.zero_lo);
            a[1] = Tr::sub2(magic_pair<T>(qw[j], 1), cur.gp.zero_hi);
            a[2] = Tr::sub2(magic_pair<T>(qw[j], 2), cur.gp.zero_lo);
            a[3] = Tr::sub2(magic_pair<T>(qw[j], 3), cur.gp.zero_hi);
            const int col = (u * 4 + j) * 16 + 2 * tig;
#pragma unroll
            for (int t = 0; t < TILES; ++t) {
                const T* row = staged_x + (t * 8 + gid) * PITCH + col;
                Tr::mma(part[t], a, *reinterpret_cast<const unsigned*>(row), *reinterpret_cast<const unsigned*>(row + 8));
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

// Block (token block, group of 8 tiles, one K slice), for up to 16 tokens: each warp requests
// all its words of the slice at once, the block stages the slice's activations meanwhile, then
// the MMAs. No pipeline: half the registers of w4a16_stream, so twice the blocks per
// multiprocessor, which hides HBM latency better at these sizes (BENCHMARKS.md).
template <typename T, int TILES>
__device__ void w4a16_stream_slice(const uint4* __restrict__ words, const uint2* __restrict__ params,
                                   const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                   float* __restrict__ partial, unsigned* __restrict__ arrivals,
                                   int m, int n, int k, int group_size, int has_bias) {
    typedef StreamSlice<TILES> Slice;
    constexpr int TOKENS = 8 * TILES;
    __shared__ __align__(16) T staged_x[TOKENS * Slice::PITCH];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2;
    const int token0 = blockIdx.x * TOKENS;
    const int tile = blockIdx.y * STREAM_WARPS + warp;
    const int chunks = k >> 6, groups = k / group_size, steps_per_group = group_size >> 4;
    const int c_begin = blockIdx.z * Slice::CHUNKS, c_count = min(Slice::CHUNKS, chunks - c_begin);
    const bool has_tile = tile < (n >> 4);

    uint4 q[STREAM_MAX_CHUNKS];
    const uint4* tile_words = words + piece_index(tile, c_begin, gridDim.y) * 32 + lane;
#pragma unroll
    for (int u = 0; u < Slice::CHUNKS; ++u)
        if (has_tile && u < c_count) q[u] = load_stream(tile_words + (size_t)u * 32);
    for (int v = threadIdx.x; v < TOKENS * (Slice::COLS / 8); v += blockDim.x) {
        const int r = v / (Slice::COLS / 8), c = (v % (Slice::COLS / 8)) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (token0 + r < m && c < c_count * 64)
            val = __ldg(reinterpret_cast<const uint4*>(x + (size_t)(token0 + r) * k + c_begin * 64 + c));
        *reinterpret_cast<uint4*>(staged_x + r * Slice::PITCH + c) = val;
    }
    __syncthreads();

    float acc[TILES][4], part[TILES][4];
#pragma unroll
    for (int t = 0; t < TILES; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][i] = part[t][i] = 0.0f;
    if (has_tile) {
        const uint2* tile_params = params + (size_t)tile * groups * 8 + gid;
        GroupCursor cur;
        cur.group = (c_begin * 4) / steps_per_group;
        cur.step_in_group = (c_begin * 4) % steps_per_group;
        cur.gp = split_params(__ldg(tile_params + (size_t)cur.group * 8));
        mma_slice<T, TILES>(q, staged_x, c_count, tile_params, groups, steps_per_group, cur, acc, part);
        if (cur.step_in_group != 0) fold_group<T, TILES>(acc, part, cur.gp);
    }
    finish_block<T, TILES>(acc, has_tile, tile, token0, bias, y, partial, arrivals, m, n, has_bias);
}

// Block (token block, group of 8 tiles, K range): each warp owns one 16-row tile and walks the
// block's K slices with a two-deep pipeline: while it multiplies slice s, the words of slice s + 1
// are on their way to its registers and the block's copy of the activations of slice s + 1 is on
// its way to shared memory (cp.async), so HBM always has this warp's next 4 KB in flight.
// Used from 17 tokens up, where the MMAs take long enough that overlapping them with the next
// slice's loads pays (BENCHMARKS.md).
template <typename T, int TILES>
__device__ void w4a16_stream(const uint4* __restrict__ words, const uint2* __restrict__ params,
                             const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                             float* __restrict__ partial, unsigned* __restrict__ arrivals,
                             int m, int n, int k, int group_size, int slices_per_block, int has_bias) {
    typedef StreamSlice<TILES> Slice;
    constexpr int TOKENS = 8 * TILES;
    __shared__ __align__(16) T staged_x[2][TOKENS * Slice::PITCH];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
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

constexpr int DEQUANT_WARPS = 8;
constexpr int DEQUANT_PITCH = 36;  // u32 per staged row: 32 + 4, keeps 16-byte rows and no conflicts

template <typename T>
__device__ void w4a16_dequantize(const uint4* __restrict__ words, const uint2* __restrict__ params,
                                 T* __restrict__ w, int n, int k, int group_size) {
    typedef Int4Traits<T> Tr;
    __shared__ __align__(16) unsigned staged[DEQUANT_WARPS][16 * DEQUANT_PITCH];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int chunks = k >> 6, groups = k / group_size;
    // Pieces in memory order; padding pieces are skipped (whole warps: no block barrier below).
    const int tile_groups = (n + 127) >> 7;
    const size_t piece = (size_t)blockIdx.x * DEQUANT_WARPS + warp;
    const int tile = (int)((piece >> 6) % tile_groups) * 8 + (int)((piece >> 3) & 7);
    const int chunk = (int)(piece / ((size_t)tile_groups * 64)) * 8 + (int)(piece & 7);
    if (tile >= (n >> 4) || chunk >= chunks) return;
    const uint4 q = load_stream(words + piece * 32 + lane);
    const unsigned qw[4] = {q.x, q.y, q.z, q.w};
    unsigned* rows = staged[warp];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int group = ((chunk * 4 + j) * 16) / group_size;
        const GroupParams gp = split_params(__ldg(params + ((size_t)tile * groups + group) * 8 + gid));
        const unsigned s_lo = gp.scale_lo_bits * 0x10001u, s_hi = gp.scale_hi_bits * 0x10001u;
        // (q - z) is exact; the one rounding is the product with the scale, as in AWQ's own dequant.
        rows[gid * DEQUANT_PITCH + j * 8 + tig] = Tr::mul2(Tr::sub2(magic_pair<T>(qw[j], 0), gp.zero_lo), s_lo);
        rows[(gid + 8) * DEQUANT_PITCH + j * 8 + tig] = Tr::mul2(Tr::sub2(magic_pair<T>(qw[j], 1), gp.zero_hi), s_hi);
        rows[gid * DEQUANT_PITCH + j * 8 + tig + 4] = Tr::mul2(Tr::sub2(magic_pair<T>(qw[j], 2), gp.zero_lo), s_lo);
        rows[(gid + 8) * DEQUANT_PITCH + j * 8 + tig + 4] = Tr::mul2(Tr::sub2(magic_pair<T>(qw[j], 3), gp.zero_hi), s_hi);
    }
    __syncwarp();
    // 16 rows of 128 bytes: eight lanes write one row's 128 contiguous bytes.
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int seg = lane + 32 * r, row = seg >> 3, col16 = seg & 7;
        const uint4 v = *reinterpret_cast<const uint4*>(rows + row * DEQUANT_PITCH + col16 * 4);
        *reinterpret_cast<uint4*>(w + (size_t)(tile * 16 + row) * k + chunk * 64 + col16 * 8) = v;
    }
}

#define W4A16_STREAM(T, TILES)                                                                          \
    extern "C" __global__ void __launch_bounds__(STREAM_WARPS * 32)                                     \
        w4a16_stream_##T##_t##TILES(const uint4* words, const uint2* params, const T* x, const T* bias, \
                                    T* y, float* partial, unsigned* arrivals, int m, int n, int k,      \
                                    int group_size, int slices_per_block, int has_bias) {               \
        if (TILES <= 2)                                                                                 \
            w4a16_stream_slice<T, TILES>(words, params, x, bias, y, partial, arrivals, m, n, k, group_size, \
                                         has_bias);                                                     \
        else                                                                                            \
            w4a16_stream<T, TILES>(words, params, x, bias, y, partial, arrivals, m, n, k, group_size,  \
                                   slices_per_block, has_bias);                                         \
    }
#define W4A16_DEQUANTIZE(T)                                                                             \
    extern "C" __global__ void __launch_bounds__(DEQUANT_WARPS * 32)                                    \
        w4a16_dequantize_##T(const uint4* words, const uint2* params, T* w, int n, int k, int group_size) { \
        w4a16_dequantize<T>(words, params, w, n, k, group_size);                                        \
    }

W4A16_STREAM(f16, 1) W4A16_STREAM(f16, 2) W4A16_STREAM(f16, 4) W4A16_STREAM(f16, 8)
W4A16_STREAM(bf16, 1) W4A16_STREAM(bf16, 2) W4A16_STREAM(bf16, 4) W4A16_STREAM(bf16, 8)
W4A16_DEQUANTIZE(f16) W4A16_DEQUANTIZE(bf16)
