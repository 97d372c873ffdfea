// w4a16.cu: 4-bit weights times 16-bit activations (ops/w4a16.rs), for f16 and bf16.
//
// Weight layout (built once on the host by Int4Weight::from_awq, see w4a16.rs): the weight [N, K]
// is cut into pieces of 16 output rows (a tile) x 64 input columns (a chunk); piece (t, c) is 512
// bytes, one uint4 per lane of a warp, at words[piece_index(t, c) * 32 + lane]. Pieces are ordered
// so that what one streaming block reads (8 tiles x 8 chunks, 32 KB) is contiguous and the blocks
// of a launch read the weight front to back (strided reads of 4 KB would leave much of HBM's
// bandwidth unused); missing tiles and chunks at the edges are zero padding. Word j of a lane's uint4
// holds the 8 codes that lane feeds, as the A operand, to the j-th m16n8k16 tensor-core MMA of the
// 64-column chunk (rows gid and gid + 8, the MMA's k = 2*tig, 2*tig + 1, 2*tig + 8, 2*tig + 9, with
// gid = lane / 4 and tig = lane % 4). The k order is a permutation of the step's 16 columns, the
// same for weights and activations (the sum does not care): k = 2*tig + e is column 4*tig + e and
// k = 2*tig + 8 + e is column 4*tig + 2 + e, so the B operand a lane needs for one step, columns
// 4*tig .. 4*tig + 3 of its activation row, is one 8-byte shared load (load_b). The codes are in
// the nibble order that the magic-number conversion below turns into the MMA's register pairs with
// one shift, one AND and one OR per pair:
//   (word >> 4i) & 0x000F000F | MAGIC  ->  the 16-bit pair (MAGIC + code, MAGIC + code') = register i.
// MAGIC is 1024.0 in f16 (0x6400) and 128.0 in bf16 (0x4300): OR-ing a nibble into the low
// mantissa bits gives MAGIC + nibble exactly. Subtracting (MAGIC + zero) leaves q - z, an exact
// small integer, so the tensor cores multiply exact integers by the activations in f32; the group's
// scale is applied to the f32 partial sum when the group ends (one FMA per accumulator per group).
//
// Group parameters: params[(t * K/g + group) * 8 + r] is a uint2 holding four 16-bit values for
// rows r and r + 8 of tile t: (MAGIC + zero[r], MAGIC + zero[r+8], scale[r], scale[r+8]).
//
// Kernels (which one serves which call: W4A16Path in w4a16.rs):
// - w4a16_gemv_*_t{1,2} (up to 16 activation rows, large weights, sm_90): persistent blocks fed
//   by TMA bulk copies, each streaming an equal share of the weight (w4a16_gemv, below).
// - w4a16_stream_*_t{1,2,4,8} (up to 64 rows: small weights at up to 16, 17 to 32 rows of weights
//   no wider than long, and every call up to 64 rows on GPUs without wgmma): one block of 8 warps
//   per (8*TILES rows, 128 output rows, a range of K slices), pipelined a slice ahead
//   (w4a16_stream); K ranges meet in an f32 workspace (split-K, finish_block).
// - w4a16_fused_*_n{64,128,256} (17 to 256 rows where it pays, sm_90a): warpgroup MMAs (wgmma)
//   with the weight dequantized in registers as the A operand (w4a16_fused, below); its
//   activations are first rewritten by w4a16_stage_x into the layout wgmma reads.
// The split-K kernels (gemv, stream) are launched to overlap the kernel before them (programmatic
// dependent launch, sm_90): each waits for it (wait_for_previous_kernel) before reading x or
// writing y, its workspace or its counters.
// - w4a16_dequantize_*: writes the dense weight [N, K] (for cuBLAS at large batch), one warp per
//   16x64 piece, staged through shared memory so every store is a full 16-byte vector.
//
// Benchmark knobs (preprocessor definitions through AWQ_NVRTC_DEFINES; BENCHMARKS.md uses them):
// W4A16_LOAD (the streaming kernel's weight load), W4A16_GEMV_STAGES=n (fewer ring stages),
// W4A16_GEMV_SKIP_MATH (the decode kernel's copies alone), W4A16_GEMV_SKIP_LOADS (its math alone,
// on stale shared memory), W4A16_FUSED_HALF_X (the prefill kernel with half of each activation
// stage copied) and W4A16_FUSED_SKIP_DEQUANT (its raw words as the A operand). The last four give
// wrong results by design.
#include "common.cuh"

template <typename T> struct Int4Traits;
struct GroupParams;
template <> struct Int4Traits<f16> {
    static constexpr unsigned MAGIC = 0x64006400u;
    // The A operand of one MMA step from its word (see the file's docs): registers 0 and 2 (low
    // nibbles) as (MAGIC + q) - (MAGIC + z); registers 1 and 3 (high nibbles, left in place by the
    // mask, so MAGIC + 16q) as (MAGIC + 16q) / 16 - (64 + z) in one HFMA2. Both are exact, and this
    // costs one shift, four LOP3 and four half2 ops per step instead of three shifts more.
    static __device__ __forceinline__ void dequant(unsigned word, const GroupParams& gp, unsigned (&a)[4]);
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
    // bf16 has 7 mantissa bits: a high nibble left in place would reach the exponent, so every
    // register is shifted down first (three shifts, four LOP3, four subtractions per step).
    static __device__ __forceinline__ void dequant(unsigned word, const GroupParams& gp, unsigned (&a)[4]);
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

// Programmatic dependent launch (sm_90; no-ops for a kernel launched without it, and on older
// GPUs): let the next kernel on the stream start its blocks as ours finish, and wait until the
// kernel before ours has finished and its writes are visible (before reading its output or
// writing what it reads). w4a16.rs launches the split-K kernels so.
__device__ __forceinline__ void allow_next_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

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
// the same as -(64 + z) pairs (f16's high-nibble conversion), and the two scales.
struct GroupParams {
    unsigned zero_lo, zero_hi;  // (MAGIC + z[gid]) twice, (MAGIC + z[gid + 8]) twice
    unsigned neg_hi;            // f16 only: -(64 + z[gid + 8]) twice (the high-nibble registers' rows)
    unsigned scale_lo_bits, scale_hi_bits;
};
__device__ __forceinline__ GroupParams split_params(uint2 p) {
    GroupParams g;
    g.zero_lo = (p.x & 0xFFFFu) * 0x10001u;
    g.zero_hi = (p.x >> 16) * 0x10001u;
    // 960 - (1024 + z) = -(64 + z), exact in f16 (integers below 2048). Meaningless for bf16 (unused).
    g.neg_hi = Int4Traits<f16>::sub2(0x63806380u, g.zero_hi);
    g.scale_lo_bits = p.y & 0xFFFFu;
    g.scale_hi_bits = p.y >> 16;
    return g;
}

// (a & b) | c in one instruction (LOP3's truth table 0xEA).
__device__ __forceinline__ unsigned and_or(unsigned a, unsigned b, unsigned c) {
    unsigned r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// a * b + c on two f16 lanes, as bits.
__device__ __forceinline__ unsigned fma_f16x2(unsigned a, unsigned b, unsigned c) {
    unsigned r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

__device__ __forceinline__ void Int4Traits<f16>::dequant(unsigned word, const GroupParams& gp, unsigned (&a)[4]) {
    const unsigned shifted = word >> 8, sixteenth = 0x2C002C00u;  // 1/16 twice
    a[0] = sub2(and_or(word, 0x000F000Fu, MAGIC), gp.zero_lo);
    a[1] = fma_f16x2(and_or(word, 0x00F000F0u, MAGIC), sixteenth, gp.neg_hi);
    a[2] = sub2(and_or(shifted, 0x000F000Fu, MAGIC), gp.zero_lo);
    a[3] = fma_f16x2(and_or(shifted, 0x00F000F0u, MAGIC), sixteenth, gp.neg_hi);
}

__device__ __forceinline__ void Int4Traits<bf16>::dequant(unsigned word, const GroupParams& gp, unsigned (&a)[4]) {
    a[0] = sub2(magic_pair<bf16>(word, 0), gp.zero_lo);
    a[1] = sub2(magic_pair<bf16>(word, 1), gp.zero_hi);
    a[2] = sub2(magic_pair<bf16>(word, 2), gp.zero_lo);
    a[3] = sub2(magic_pair<bf16>(word, 3), gp.zero_hi);
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

// The B operand of one MMA step for one lane: the activations of columns 4*tig .. 4*tig + 3 of the
// step (see the layout above), zero for a token past the batch (its row in shared memory is stale).
template <typename T>
__device__ __forceinline__ uint2 load_b(const T* staged_row, int step_col, int tig, bool token_ok) {
    return token_ok ? *reinterpret_cast<const uint2*>(staged_row + step_col + 4 * tig) : make_uint2(0, 0);
}

constexpr int STREAM_WARPS = 8;     // one 16-row weight tile per warp: 128 output rows per block
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

// ---------------------------------------------------------------------------------------------
// w4a16_gemv_*_t{1,2}: up to 16 activation rows (decode), built for Hopper.
//
// The weight is streamed once, in slices of 8 tiles x 8 chunks (128 output rows x 512 input
// columns, one contiguous 32 KB run of the layout). The slices are numbered row group by row
// group, and block b of the persistent grid (one block per multiprocessor) takes the b-th equal
// share of that sequence ("stream-K"): every block streams the same number of bytes, whatever the
// shape, with no waves and no ramp between them. A row group whose slices are shared by several
// blocks is finished by the last of them to arrive, which adds their f32 partial sums in block
// order (the result does not depend on which block came last).
//
// Inside a block one producer warp keeps a ring of `stages` slices in flight (w4a16.rs picks
// three) with TMA bulk copies (cp.async.bulk, sm_90): the slice's 32 KB of words, its activation
// rows and its group parameters land in one shared-memory stage whose mbarrier counts the bytes.
// Sixteen consumer warps (two per 16-row tile, each taking half of the slice's chunks) wait on the
// stage, run the MMAs from shared memory and release it on a second mbarrier. No register holds a
// word in flight, so the loads in flight are bounded by shared memory, not by occupancy.
//
// The output's bits depend on the grid (one block per multiprocessor: where the shares split the
// row groups), so they are the same from call to call on one kind of GPU, not across kinds.
// Compiled for sm_90 and later only (the kernels exist on older GPUs, empty: w4a16.rs never
// launches them there).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define W4A16_HAS_BULK_COPY 1
#endif
constexpr int GEMV_KSPLIT = 2;                        // consumer warps per tile
constexpr int GEMV_CONSUMERS = STREAM_WARPS * GEMV_KSPLIT;
constexpr int GEMV_THREADS = (GEMV_CONSUMERS + 1) * 32;
constexpr int GEMV_SLICE_CHUNKS = 8;                  // 512 input columns per slice
constexpr int GEMV_WORD_BYTES = STREAM_WARPS * GEMV_SLICE_CHUNKS * 512;  // 32 KB
constexpr int GEMV_X_PITCH = GEMV_SLICE_CHUNKS * 64 + 16;  // halves per staged row: +32 bytes, as StreamSlice
constexpr int GEMV_MAX_STAGES = 8;  // the barriers' array size; w4a16.rs passes fewer

#ifdef W4A16_HAS_BULK_COPY
__device__ __forceinline__ unsigned smem_address(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbarrier_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count) : "memory");
}
// Arrives once and announces `bytes` that bulk copies will deliver in the current phase.
__device__ __forceinline__ void mbarrier_expect_bytes(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(unsigned long long* bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(smem_address(bar)), "r"(parity)
                     : "memory");
    } while (!done);
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) global -> shared by the TMA unit,
// counted on `bar` when they have landed.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     smem_address(dst)),
                 "l"(src), "r"(bytes), "r"(smem_address(bar))
                 : "memory");
}
// atomicAdd(counter, 1) with acquire-release semantics at GPU scope; returns the old value.
__device__ __forceinline__ unsigned arrive_acq_rel(unsigned* counter) {
    unsigned old;
    asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], 1;\n" : "=r"(old) : "l"(counter) : "memory");
    return old;
}
// A barrier for the consumer warps alone (the producer runs ahead and never joins).
__device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;\n" ::"n"(GEMV_CONSUMERS * 32) : "memory");
}

// The stream-K split: block b takes steps [start(b), start(b + 1)) of `total`.
struct GemvSplit {
    int total, blocks;
    __device__ __forceinline__ int start(int b) const { return (int)((long long)b * total / blocks); }
    // The block whose share holds step x.
    __device__ __forceinline__ int block_of(int x) const {
        return (int)(((long long)(x + 1) * blocks + total - 1) / total) - 1;
    }
};

// One stage's layout in dynamic shared memory: the words ([tile][chunk][lane] uint4), then
// TOKENS activation rows of GEMV_X_PITCH halves, then per tile `pg` groups of 8 uint2 parameters.
template <int TILES> struct GemvStage {
    static constexpr int X_BYTES = 8 * TILES * GEMV_X_PITCH * 2;
    static __device__ __forceinline__ int bytes(int pg) { return GEMV_WORD_BYTES + X_BYTES + STREAM_WARPS * pg * 64; }
};

// Where a slice starts among the groups, kept by counting (no division per slice: a division by a
// run-time value is a subroutine of tens of instructions, and 64-bit ones many more).
// `in_group`/`group`: how many MMA steps into which group a consumer's half of the slice starts;
// `staged`: the first group the slice's stage holds (the group of its first column).
struct GemvCursor {
    int col, in_group, group, staged;
    __device__ __forceinline__ void start(int slice, int half, int group_size) {
        const int steps_per_group = group_size >> 4;
        const int first_step = (slice * GEMV_SLICE_CHUNKS + half * (GEMV_SLICE_CHUNKS / GEMV_KSPLIT)) * 4;
        col = slice * GEMV_SLICE_CHUNKS * 64;
        in_group = first_step % steps_per_group;
        group = first_step / steps_per_group;
        staged = col / group_size;
    }
    __device__ __forceinline__ void next_slice(int group_size) {
        const int steps_per_group = group_size >> 4;
        col += GEMV_SLICE_CHUNKS * 64;
        in_group += GEMV_SLICE_CHUNKS * 4;
        while (in_group >= steps_per_group) in_group -= steps_per_group, ++group;
        while ((staged + 1) * group_size <= col) ++staged;
    }
};

// A consumer warp's half of one slice: chunks [half * 4, half * 4 + 4) of its tile, starting
// `in_group` steps into staged group `g`. Each group's f32 sum is scaled when the group ends, and
// what is left of a group at the end is scaled too (the next slice starts a fresh partial sum).
// SPG > 0: the group has SPG steps and SPG divides the 16 steps of a half, so every half starts on
// a group boundary and where groups end is known at compile time (no bookkeeping per step: a
// quarter of the instructions). SPG = 0: any group size, counted at run time.
template <typename T, int TILES, int SPG>
__device__ __forceinline__ void gemv_half_slice(const unsigned char* stage, int pg, int tile_in_group, int half,
                                                int c_count, int m, int group_size, int in_group, int g,
                                                float (&acc)[TILES][4]) {
    typedef Int4Traits<T> Tr;
    constexpr int HALF_CHUNKS = GEMV_SLICE_CHUNKS / GEMV_KSPLIT;
    static_assert(SPG == 0 || (HALF_CHUNKS * 4) % SPG == 0, "a static group size must divide a half slice");
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int u_begin = half * HALF_CHUNKS;
    if (u_begin >= c_count) return;
    const uint4* words = reinterpret_cast<const uint4*>(stage) + tile_in_group * GEMV_SLICE_CHUNKS * 32 + lane;
    const T* staged_x = reinterpret_cast<const T*>(stage + GEMV_WORD_BYTES);
    const uint2* params = reinterpret_cast<const uint2*>(stage + GEMV_WORD_BYTES + GemvStage<TILES>::X_BYTES) +
                          tile_in_group * pg * 8 + gid;
    const int steps_per_group = SPG ? SPG : group_size >> 4;
    GroupParams gp = split_params(params[g * 8]);
    // Activation rows past m are stale bytes in shared memory: their lanes feed zeros instead.
    bool token_ok[TILES];
#pragma unroll
    for (int t = 0; t < TILES; ++t) token_ok[t] = t * 8 + gid < m;
    float part[TILES][4];
#pragma unroll
    for (int t = 0; t < TILES; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[t][i] = 0.0f;
    auto fold = [&]() { fold_group<T, TILES>(acc, part, gp); };
    // Every chunk's words requested first (a stage always holds all 8 chunks, padding included).
    uint4 q[HALF_CHUNKS];
#pragma unroll
    for (int du = 0; du < HALF_CHUNKS; ++du) q[du] = words[(u_begin + du) * 32];
#pragma unroll
    for (int du = 0; du < HALF_CHUNKS; ++du) {
        const int u = u_begin + du;
        if (u >= c_count) {  // the last slice of a K that is not a multiple of 512
            if (SPG && (du * 4) % SPG != 0) fold();
            return;
        }
        const unsigned qw[4] = {q[du].x, q[du].y, q[du].z, q[du].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int st = du * 4 + j;
            if (SPG ? (st != 0 && st % SPG == 0) : (st != 0 && in_group == 0))
                gp = split_params(params[(SPG ? g + st / SPG : g) * 8]);
            unsigned a[4];
            Tr::dequant(qw[j], gp, a);
#pragma unroll
            for (int t = 0; t < TILES; ++t) {
                const uint2 b = load_b(staged_x + (t * 8 + gid) * GEMV_X_PITCH, (u * 4 + j) * 16, tig, token_ok[t]);
                Tr::mma(part[t], a, b.x, b.y);
            }
            if (SPG) {
                if ((st + 1) % (SPG ? SPG : 1) == 0) fold();
            } else if (++in_group == steps_per_group) {
                fold();
                in_group = 0;
                ++g;
            }
        }
    }
    if (!SPG && in_group != 0) fold();
}

// gemv_half_slice with the group size fixed at compile time where it can be (AWQ's usual 32..256).
template <typename T, int TILES>
__device__ __forceinline__ void gemv_half_slice_any(const unsigned char* stage, int pg, int tile_in_group, int half,
                                                    int c_count, int m, int group_size, int in_group, int g,
                                                    float (&acc)[TILES][4]) {
#define W4A16_HALF(SPG) gemv_half_slice<T, TILES, SPG>(stage, pg, tile_in_group, half, c_count, m, group_size, in_group, g, acc)
    switch (group_size) {
        case 32: W4A16_HALF(2); break;
        case 64: W4A16_HALF(4); break;
        case 128: W4A16_HALF(8); break;
        case 256: W4A16_HALF(16); break;
        default: W4A16_HALF(0); break;
    }
#undef W4A16_HALF
}

template <typename T, int TILES>
__device__ void w4a16_gemv(const uint4* __restrict__ words, const uint2* __restrict__ params, const T* __restrict__ x,
                           const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ partial,
                           unsigned* __restrict__ arrivals, int m, int n, int k, int group_size, int stages, int pg,
                           int has_bias) {
    constexpr int TOKENS = 8 * TILES;
    extern __shared__ __align__(128) unsigned char gemv_smem[];
    __shared__ __align__(8) unsigned long long full[GEMV_MAX_STAGES], empty[GEMV_MAX_STAGES];
    __shared__ float halves[STREAM_WARPS][TILES * 4][32];  // the second half's sums, per tile
    __shared__ bool last_block[2];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tiles = n >> 4, row_groups = (tiles + STREAM_WARPS - 1) / STREAM_WARPS;
    const int chunks = k >> 6, groups = k / group_size;
    const int slices = (chunks + GEMV_SLICE_CHUNKS - 1) / GEMV_SLICE_CHUNKS;
    const GemvSplit split{row_groups * slices, (int)gridDim.x};  // w4a16.rs keeps the total below 2^31
    const int begin = split.start(blockIdx.x), end = split.start(blockIdx.x + 1);
    const int stage_bytes = GemvStage<TILES>::bytes(pg);
#ifdef W4A16_GEMV_STAGES  // benchmark knob (AWQ_NVRTC_DEFINES): fewer stages than shared memory allows
    stages = min(stages, W4A16_GEMV_STAGES);
#endif

    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            mbarrier_init(&full[s], 1);
            mbarrier_init(&empty[s], GEMV_CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    allow_next_kernel();

    if (warp == GEMV_CONSUMERS) {
        // The producer: lane 0 claims a free stage and announces its bytes, then the lanes issue
        // one copy each (lane 0 the words, lanes 1..m the activation rows, lanes 24..31 the
        // parameters of the 8 tiles).
        int stage = 0, rg = begin / slices, slice = begin % slices;
        unsigned phase = 0;
        bool reusing = false;  // whether the ring has wrapped (stages must then be released first)
        int g_first = (slice * GEMV_SLICE_CHUNKS * 64) / group_size, g_end = g_first;
        // The first round of stages gets its words and parameters (which no kernel writes) before
        // the kernel before ours has finished, and its activations (that kernel's output, maybe)
        // after: lanes 1..m copy row lane - 1 of each stage's slice.
        auto first_round_activations = [&]() {
            wait_for_previous_kernel();
            if (lane < 1 || lane > m) return;
            for (int s = 0; s < min(stages, end - begin); ++s) {
                const int sl = (begin + s) % slices, c_count = min(GEMV_SLICE_CHUNKS, chunks - sl * GEMV_SLICE_CHUNKS);
                bulk_copy(gemv_smem + (size_t)s * stage_bytes + GEMV_WORD_BYTES + (lane - 1) * GEMV_X_PITCH * 2,
                          x + (size_t)(lane - 1) * k + sl * GEMV_SLICE_CHUNKS * 64, c_count * 128, &full[s]);
            }
        };
        for (int step = begin; step < end; ++step) {
            const int col = slice * GEMV_SLICE_CHUNKS * 64;
            const int c_count = min(GEMV_SLICE_CHUNKS, chunks - slice * GEMV_SLICE_CHUNKS);
            while ((g_first + 1) * group_size <= col) ++g_first;
            while (g_end < groups && g_end * group_size < col + c_count * 64) ++g_end;
            const int tiles_here = min(STREAM_WARPS, tiles - rg * STREAM_WARPS);
            const unsigned x_row_bytes = c_count * 128, param_bytes = (g_end - g_first) * 64;
            unsigned char* base = gemv_smem + (size_t)stage * stage_bytes;
            if (lane == 0) {
                if (reusing) mbarrier_wait(&empty[stage], phase ^ 1);
#ifdef W4A16_GEMV_SKIP_LOADS  // benchmark knob: the math alone, on whatever the stages hold (wrong results)
                mbarrier_expect_bytes(&full[stage], 0);
#else
                mbarrier_expect_bytes(&full[stage], GEMV_WORD_BYTES + m * x_row_bytes + tiles_here * param_bytes);
#endif
            }
#ifdef W4A16_GEMV_SKIP_LOADS
            if (++stage == stages) stage = 0, phase ^= 1, reusing = true;
            if (++slice == slices) slice = 0, ++rg, g_first = g_end = 0;
            continue;
#endif
            __syncwarp();
            if (lane == 0) {
                bulk_copy(base, words + piece_index(rg * STREAM_WARPS, slice * GEMV_SLICE_CHUNKS, row_groups) * 32,
                          GEMV_WORD_BYTES, &full[stage]);
            } else if (lane <= m && reusing) {  // the first round's wait for x is below
                bulk_copy(base + GEMV_WORD_BYTES + (lane - 1) * GEMV_X_PITCH * 2,
                          x + (size_t)(lane - 1) * k + col, x_row_bytes, &full[stage]);
            } else if (lane >= 32 - STREAM_WARPS && lane - (32 - STREAM_WARPS) < tiles_here) {
                const int t = lane - (32 - STREAM_WARPS), tile = rg * STREAM_WARPS + t;
                bulk_copy(base + GEMV_WORD_BYTES + GemvStage<TILES>::X_BYTES + t * pg * 64,
                          params + ((size_t)tile * groups + g_first) * 8, param_bytes, &full[stage]);
            }
            if (++stage == stages) stage = 0, phase ^= 1, reusing = true;
            if (++slice == slices) slice = 0, ++rg, g_first = g_end = 0;
            if (step + 1 == min(end, begin + stages)) first_round_activations();
        }
        return;
    }

    // The consumers write y, the partial sums and the arrival counters, which the kernel before
    // ours may still be using (the same kernel, one call earlier): they wait for it to finish.
    wait_for_previous_kernel();
    // The consumers: warp w takes tile w % 8 of each row group, half w / 8 of each slice.
    const int tile_in_group = warp % STREAM_WARPS, half = warp / STREAM_WARPS;
    const int gid = lane >> 2, tig = lane & 3;
    const int my_first_rg = begin / slices;
    // Our row groups that other blocks also contribute to (scalars, not an array: registers).
    int shared_rg0 = -1, shared_rg1 = -1, shared_count = 0;
    int stage = 0, step = begin;
    unsigned phase = 0;
    while (step < end) {
        const int rg = step / slices;
        const int item_end = min(end, (rg + 1) * slices);
        const int tile = rg * STREAM_WARPS + tile_in_group;
        const bool has_tile = tile < tiles;
        float acc[TILES][4];
#pragma unroll
        for (int t = 0; t < TILES; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[t][i] = 0.0f;
        int slice = step - rg * slices;
        GemvCursor cursor;
        cursor.start(slice, half, group_size);
        for (; step < item_end; ++step, ++slice) {
            mbarrier_wait(&full[stage], phase);
            const int c_count = min(GEMV_SLICE_CHUNKS, chunks - slice * GEMV_SLICE_CHUNKS);
#ifdef W4A16_GEMV_SKIP_MATH  // benchmark knob: the copy pipeline alone (wrong results)
            if (false)
#else
            if (has_tile)
#endif
                gemv_half_slice_any<T, TILES>(gemv_smem + (size_t)stage * stage_bytes, pg, tile_in_group, half, c_count, m,
                                          group_size, cursor.in_group, cursor.group - cursor.staged, acc);
            __syncwarp();
            if (lane == 0) mbarrier_arrive(&empty[stage]);
            if (++stage == stages) stage = 0, phase ^= 1;
            cursor.next_slice(group_size);
        }

        // The two halves of each tile meet in the first (fixed order: first + second).
        consumers_sync();  // the previous row group's reads of `halves` are done
        if (half == 1) {
#pragma unroll
            for (int t = 0; t < TILES; ++t)
#pragma unroll
                for (int i = 0; i < 4; ++i) halves[tile_in_group][t * 4 + i][lane] = acc[t][i];
        }
        consumers_sync();
        if (half == 0) {
#pragma unroll
            for (int t = 0; t < TILES; ++t)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[t][i] += halves[tile_in_group][t * 4 + i][lane];
        }

        // Output element i of token tile t: row gid + 8 * (i / 2) of the tile, token 8t + 2 tig + i % 2.
        const int b_first = split.block_of(rg * slices), b_last = split.block_of((rg + 1) * slices - 1);
        if (b_first == b_last) {  // the whole row group was ours
            if (half == 0 && has_tile) {
#pragma unroll
                for (int t = 0; t < TILES; ++t)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int token = 8 * t + 2 * tig + (i & 1), col = tile * 16 + gid + 8 * (i >> 1);
                        if (token < m) y[(size_t)token * n + col] = from_f32<T>(acc[t][i] + (has_bias ? to_f32(bias[col]) : 0.0f));
                    }
            }
            continue;
        }
        // Shared with other blocks: our partial sums go to our slot (0 for our first row group, 1
        // for our last), and the fix-up waits for the end of our stream (below), so that no
        // consumer stalls on another block mid-stream.
        float* mine = partial + ((size_t)blockIdx.x * 2 + (rg == my_first_rg ? 0 : 1)) * TOKENS * 128;
        if (half == 0 && has_tile) {
#pragma unroll
            for (int t = 0; t < TILES; ++t)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int token = 8 * t + 2 * tig + (i & 1), row = tile_in_group * 16 + gid + 8 * (i >> 1);
                    mine[token * 128 + row] = acc[t][i];
                }
        }
        (shared_count++ == 0 ? shared_rg0 : shared_rg1) = rg;
    }

    // The fix-ups of our shared row groups (at most 2: our first and our last). One thread per row
    // group counts us in, after a barrier, with an acquire-release atomic: the barrier orders every
    // consumer's partial sums before it, the release publishes them device-wide, and the last
    // block's acquire (passed on by the barrier after it) makes every contributor's visible to all
    // its threads. The last block to arrive adds the contributions in block order and writes y.
    if (shared_count == 0) return;
    consumers_sync();
    if (lane == 0 && warp < shared_count) {
        const int rg = warp == 0 ? shared_rg0 : shared_rg1;
        const int contributors = split.block_of((rg + 1) * slices - 1) - split.block_of(rg * slices) + 1;
        last_block[warp] = arrive_acq_rel(arrivals + rg) == (unsigned)(contributors - 1);
    }
    consumers_sync();
    for (int i = 0; i < shared_count; ++i) {
        if (!last_block[i]) continue;
        const int rg = i == 0 ? shared_rg0 : shared_rg1;
        const int b_first = split.block_of(rg * slices), b_last = split.block_of((rg + 1) * slices - 1);
        const int rows = min(STREAM_WARPS * 16, n - rg * STREAM_WARPS * 16);
        for (int v = threadIdx.x; v < m * rows; v += GEMV_CONSUMERS * 32) {
            const int token = v / rows, row = v % rows, col = rg * STREAM_WARPS * 16 + row;
            float sum = has_bias ? to_f32(bias[col]) : 0.0f;
            for (int b = b_first; b <= b_last; ++b) {
                const int slot = rg == split.start(b) / slices ? 0 : 1;
                sum += __ldcg(partial + (((size_t)b * 2 + slot) * TOKENS + token) * 128 + row);
            }
            y[(size_t)token * n + col] = from_f32<T>(sum);
        }
        if (threadIdx.x == 0) arrivals[rg] = 0;  // ready for the next launch
    }
}
#endif  // W4A16_HAS_BULK_COPY

constexpr int DEQUANT_WARPS = 8;
constexpr int DEQUANT_PITCH = 40;  // u32 per staged row: 32 + 8, keeps 16-byte rows and no conflicts

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
        // Registers 0 and 1 are columns 4 tig, 4 tig + 1 of the step (rows gid, gid + 8); 2 and 3
        // the next two: u32 slots 2 tig and 2 tig + 1 of the step's 8.
        rows[gid * DEQUANT_PITCH + j * 8 + 2 * tig] = Tr::mul2(Tr::sub2(magic_pair<T>(qw[j], 0), gp.zero_lo), s_lo);
        rows[(gid + 8) * DEQUANT_PITCH + j * 8 + 2 * tig] = Tr::mul2(Tr::sub2(magic_pair<T>(qw[j], 1), gp.zero_hi), s_hi);
        rows[gid * DEQUANT_PITCH + j * 8 + 2 * tig + 1] = Tr::mul2(Tr::sub2(magic_pair<T>(qw[j], 2), gp.zero_lo), s_lo);
        rows[(gid + 8) * DEQUANT_PITCH + j * 8 + 2 * tig + 1] = Tr::mul2(Tr::sub2(magic_pair<T>(qw[j], 3), gp.zero_hi), s_hi);
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

// ---------------------------------------------------------------------------------------------
// w4a16_fused_*_n{64,128,256}: prefill (17 to 256 activation rows where it pays, w4a16.rs's
// fused_pays), built for Hopper (sm_90a).
//
// Computes y^T = W x^T on the warpgroup tensor cores (wgmma) with the weight as the A operand, in
// registers: each consumer warp reads its 16-row tile's packed words straight from global memory
// (the layout above is already the m16n8k16 A-fragment order, which is also wgmma's per warp) and
// dequantizes them to (q - z) * s in registers, so the weight crosses HBM once as 4 bits and no
// dense copy of it is ever written. The activations are the B operand, TOKENS rows (wgmma's N) x
// 64 columns per stage, fed into shared memory by TMA bulk copies (a ring of stages). Their
// shared-memory image must be wgmma's K-major layout with the 128-byte swizzle, and the columns
// must follow the weight's K permutation (see the layout above): w4a16_stage_x writes that image
// once per call, so each stage is one contiguous bulk copy.
//
// A block is 128 output rows (two warpgroups of 64, a warp per 16-row tile) x TOKENS activation
// rows x a range of K (split-K where the weight is too narrow to fill the GPU with blocks; the
// splits' f32 partial sums are then added in order by w4a16_sum_splits). Thread 0 keeps the ring of stages full; each warpgroup, per 64-column chunk, waits for its
// stage, issues four wgmmas from the chunk's registers, and while they run dequantizes the next
// chunk into a second set of registers (after waiting for the MMAs that read them, one chunk
// back). The words are loaded four chunks ahead. The weight's rounding, (q - z) * s to 16 bits
// before the product, is the dequantize + cuBLAS path's, so the two agree to f32 summation order.
//
// What bounds it (BENCHMARKS.md): at 1024 rows and more the tensor pipe is ~60% busy. Halving the
// activations' L2 traffic (W4A16_FUSED_HALF_X) gains 3%, skipping the dequantization 16%; the
// rest is the pipeline's shape (one chunk of MMAs in flight behind the one being dequantized for,
// waves of non-persistent blocks, an epilogue nothing overlaps).
//
// Compiled with wgmma only for sm_90a (NVRTC's arch for an sm_90 device; the kernels exist
// elsewhere, empty: w4a16.rs never launches them there).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define W4A16_HAS_WGMMA 1
#endif
constexpr int FUSED_CONSUMERS = 8;                      // warps: two warpgroups
constexpr int FUSED_THREADS = FUSED_CONSUMERS * 32;
constexpr int FUSED_MAX_STAGES = 8;
constexpr int FUSED_BAND = 4;                           // token blocks per band (block order)

// The activation image w4a16_fused reads (see above): x_img[token block][chunk][row][16-byte unit],
// unit u of row r holding the columns of logical unit u ^ (r % 8) (the 128-byte swizzle), a
// logical unit being 8 consecutive k of wgmma's K order: k = 2*tig + e of step s is column
// 16*s + 4*tig + e, k = 8 + 2*tig + e is 16*s + 4*tig + 2 + e. Rows past m are zeros.
template <typename T>
__device__ void w4a16_stage_x(const T* __restrict__ x, uint4* __restrict__ x_img, int m, int k, int tokens,
                              long long units) {
    const long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= units) return;
    const int chunks = k >> 6;
    const int phys = (int)(v & 7), row = (int)((v >> 3) % tokens);
    const long long rest = (v >> 3) / tokens;
    const int chunk = (int)(rest % chunks), token = (int)(rest / chunks) * tokens + row;
    const int logical = phys ^ (row & 7), step = logical >> 1, high = logical & 1;
    uint4 out = make_uint4(0, 0, 0, 0);
    if (token < m) {
        // Column pairs 4*tig + 2*high (+1) of the step for tig = 0..3: u32 words 2*tig + high.
        const unsigned* src = reinterpret_cast<const unsigned*>(x + (size_t)token * k + chunk * 64 + step * 16);
        out = make_uint4(src[high], src[2 + high], src[4 + high], src[6 + high]);
    }
    x_img[v] = out;
}

// y = the splits' partial sums, added in split order (deterministic), plus the bias.
template <typename T>
__device__ void w4a16_sum_splits(const float* __restrict__ partial, const T* __restrict__ bias, T* __restrict__ y,
                                 int m, int n, int splits, int has_bias) {
    const long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= (long long)m * n) return;
    const int col = (int)(v % n);
    float sum = has_bias ? to_f32(bias[col]) : 0.0f;
    for (int s = 0; s < splits; ++s) sum += partial[(size_t)s * m * n + v];
    y[v] = from_f32<T>(sum);
}

#ifdef W4A16_HAS_WGMMA
template <typename T, int N> __device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long desc);
// One wgmma per (N, type): D[64 x N] += A[64 x 16] (registers) * B[16 x N] (shared memory, K-major).
// The operand lists are written out: the asm takes every accumulator register by name.
#define W4A16_WGMMA_N64(T)                                                                                                         \
    template <> __device__ __forceinline__ void wgmma_rs<T, 64>(float (&d)[32], const unsigned (&a)[4], unsigned long long desc) { \
        asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n wgmma.mma_async.sync.aligned.m64n64k16.f32." #T "." #T " {"     \
                     "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                      \
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"                              \
                     "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                                              \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),             \
                       "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),       \
                       "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),     \
                       "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])      \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));                                             \
    }
#define W4A16_WGMMA_N128(T)                                                                                                         \
    template <> __device__ __forceinline__ void wgmma_rs<T, 128>(float (&d)[64], const unsigned (&a)[4], unsigned long long desc) { \
        asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %69, 0;\n wgmma.mma_async.sync.aligned.m64n128k16.f32." #T "." #T " {"     \
                     "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                       \
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                             \
                     "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                             \
                     "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                               \
                     "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                                               \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),              \
                       "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),        \
                       "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),      \
                       "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),      \
                       "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),      \
                       "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),      \
                       "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),      \
                       "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])       \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));                                              \
    }
#define W4A16_WGMMA_N256(T)                                                                                                            \
    template <> __device__ __forceinline__ void wgmma_rs<T, 256>(float (&d)[128], const unsigned (&a)[4], unsigned long long desc) {   \
        asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %133, 0;\n wgmma.mma_async.sync.aligned.m64n256k16.f32." #T "." #T " {"       \
                     "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                          \
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                                \
                     "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                                \
                     "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                                \
                     "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                                \
                     "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                                \
                     "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "                    \
                     "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"                  \
                     "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"                                                             \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                 \
                       "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),           \
                       "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),         \
                       "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),         \
                       "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),         \
                       "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),         \
                       "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),         \
                       "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),         \
                       "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),         \
                       "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),         \
                       "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),         \
                       "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),         \
                       "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),     \
                       "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
                       "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
                       "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])  \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));                                                 \
    }
W4A16_WGMMA_N64(f16) W4A16_WGMMA_N64(bf16)
W4A16_WGMMA_N128(f16) W4A16_WGMMA_N128(bf16)
W4A16_WGMMA_N256(f16) W4A16_WGMMA_N256(bf16)

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int PENDING> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}
// Pins the accumulators in place across the asynchronous MMAs (the compiler must not move or
// copy a register the tensor cores are still writing).
template <int R> __device__ __forceinline__ void fence_accumulators(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The descriptor of a K-major B operand in shared memory with the 128-byte swizzle: rows of 128
// bytes, 8-row groups 1024 bytes apart (the stride byte offset); the start must sit in a 1024-byte
// aligned image, plus 32 bytes per 16-column step.
__device__ __forceinline__ unsigned long long swizzled_b_descriptor(const void* start) {
    const unsigned long long address = smem_address(start);
    return ((address & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

// One 64-column chunk of a warp's tile, dequantized to the four steps' A registers: (q - z) * s.
template <typename T>
__device__ __forceinline__ void dequant_chunk(uint4 q, const GroupParams (&gp)[4], unsigned (&a)[4][4]) {
    typedef Int4Traits<T> Tr;
    const unsigned qw[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        Tr::dequant(qw[j], gp[j], a[j]);
        const unsigned s_lo = gp[j].scale_lo_bits * 0x10001u, s_hi = gp[j].scale_hi_bits * 0x10001u;
        // Registers 0 and 2 are row gid, 1 and 3 row gid + 8 (the m16n8k16 A fragment).
        a[j][0] = Tr::mul2(a[j][0], s_lo);
        a[j][1] = Tr::mul2(a[j][1], s_hi);
        a[j][2] = Tr::mul2(a[j][2], s_lo);
        a[j][3] = Tr::mul2(a[j][3], s_hi);
    }
}

// Writes a block's accumulators (a 128-row x `tokens` tile, wgmma's fragment layout, + bias if
// given) to out[token][n] as OutT, staged through `smem` so that every store is 16 bytes along a
// token's row. Every thread of the block calls it, after a barrier.
template <typename OutT, int ACC>
__device__ __forceinline__ void store_tile(const float (&acc)[ACC], unsigned char* smem, OutT* __restrict__ out,
                                           const OutT* __restrict__ bias, int m, int n, int row0, int token0, int tokens) {
    constexpr int PITCH = 128 + 16 / sizeof(OutT);  // +16 bytes per row: fewer bank conflicts
    constexpr int PER_UNIT = 16 / sizeof(OutT), UNITS = 128 / PER_UNIT;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    OutT* staged = reinterpret_cast<OutT*>(smem);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = warp * 16 + gid + 8 * half, col = row0 + row;
        const float b = bias != nullptr && col < n ? to_f32(bias[col]) : 0.0f;
#pragma unroll
        for (int j = 0; j < ACC / 4; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) staged[(8 * j + 2 * tig + e) * PITCH + row] = from_f32<OutT>(acc[4 * j + 2 * half + e] + b);
    }
    __syncthreads();
    const int rows = min(128, n - row0);
    for (int v = threadIdx.x; v < tokens * UNITS; v += FUSED_CONSUMERS * 32) {
        const int t = v / UNITS, unit = v % UNITS;
        if (token0 + t < m && unit * PER_UNIT < rows)
            *reinterpret_cast<uint4*>(out + (size_t)(token0 + t) * n + row0 + unit * PER_UNIT) =
                *reinterpret_cast<const uint4*>(staged + t * PITCH + unit * PER_UNIT);
    }
}

template <typename T, int TOKENS>
__device__ void w4a16_fused(const uint4* __restrict__ words, const uint2* __restrict__ params,
                            const T* __restrict__ x_img, const T* __restrict__ bias, T* __restrict__ y,
                            float* __restrict__ partial, int m, int n, int k, int group_size, int token_blocks,
                            int splits, int stages, int has_bias) {
    constexpr int STAGE_BYTES = TOKENS * 128;
    constexpr int ACC = TOKENS / 2;
    extern __shared__ __align__(128) unsigned char fused_smem_raw[];
    __shared__ __align__(8) unsigned long long full[FUSED_MAX_STAGES], empty[FUSED_MAX_STAGES];
    // The swizzle is computed from address bits: the stages start on a 1024-byte boundary.
    unsigned char* smem = fused_smem_raw + ((1024 - (smem_address(fused_smem_raw) & 1023)) & 1023);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = k >> 6, tiles = n >> 4, groups = k / group_size;
    // Block order: K splits outermost; in a split, bands of FUSED_BAND token blocks; in a band,
    // every row group in turn, the band's token blocks side by side. The blocks running at once
    // then read a few row groups' words (from HBM once, by the band's first block) and the band's
    // activations (from L2).
    const int row_groups = (tiles + 7) >> 3;
    const int split = blockIdx.x / (token_blocks * row_groups), in_split = blockIdx.x % (token_blocks * row_groups);
    const int band = in_split / (FUSED_BAND * row_groups), in_band = in_split % (FUSED_BAND * row_groups);
    const int band_width = min(FUSED_BAND, token_blocks - band * FUSED_BAND);
    const int row_group = in_band / band_width, token_block = band * FUSED_BAND + in_band % band_width;
    // Split-K (narrow weights, where the blocks would not fill the GPU): chunks [chunk0,
    // chunk0 + my_chunks) of K; the splits' f32 partial sums are added by w4a16_sum_splits.
    const int per_split = (chunks + splits - 1) / splits;
    const int chunk0 = split * per_split, my_chunks = min(chunks, chunk0 + per_split) - chunk0;

    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            mbarrier_init(&full[s], 1);
            mbarrier_init(&empty[s], 2);  // one arrival per consumer warpgroup
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    // Thread 0 issues the bulk copies: the first `stages` chunks now, then each chunk as the stage
    // it goes to is released (a producer warp of its own would cost a warpgroup's registers).
    const unsigned char* x_block =
        reinterpret_cast<const unsigned char*>(x_img) + ((size_t)token_block * chunks + chunk0) * STAGE_BYTES;
#ifdef W4A16_FUSED_HALF_X  // benchmark knob: half of each stage copied (wrong results): what L2 traffic costs
    constexpr int COPY_BYTES = STAGE_BYTES / 2;
#else
    constexpr int COPY_BYTES = STAGE_BYTES;
#endif
    auto request = [&](int c, int s) {
        mbarrier_expect_bytes(&full[s], COPY_BYTES);
        bulk_copy(smem + s * STAGE_BYTES, x_block + (size_t)c * STAGE_BYTES, COPY_BYTES, &full[s]);
    };
    if (threadIdx.x == 0)
        for (int c = 0; c < min(stages, my_chunks); ++c) request(c, c);

    // Consumer warp w: tile w of the row group, rows 16 (w % 4) .. of its warpgroup's 64.
    const int gid = lane >> 2, tig = lane & 3;
    const int tile = row_group * 8 + warp;
    const uint4* tile_words = words + piece_index(tile, 0, row_groups) * 32 + lane;
    auto chunk_words = [&](int c) {  // c counts from chunk0
        c += chunk0;
        return load_stream(tile_words + ((size_t)(c >> 3) * row_groups * 64 + (c & 7)) * 32);
    };
    const uint2* tile_params = params + (size_t)min(tile, tiles - 1) * groups * 8 + gid;
    const int steps_per_group = group_size >> 4;

    // The group parameters by counting steps; the next group's are loaded a whole group ahead (a
    // load used at once would stall every group boundary).
    int group = chunk0 * 64 / group_size, in_group = chunk0 * 4 % steps_per_group;
    uint2 raw = __ldg(tile_params + (size_t)group * 8), raw_next = __ldg(tile_params + (size_t)min(group + 1, groups - 1) * 8);
    auto advance = [&](int steps) {
        in_group += steps;
        if (in_group == steps_per_group) {
            in_group = 0;
            raw = raw_next;
            if (++group + 1 < groups) raw_next = __ldg(tile_params + (size_t)(group + 1) * 8);
        }
    };
    // Chunk c's words dequantized into `a`. Groups of 64 columns or more (AWQ's are 128) hold whole
    // chunks: one set of parameters for the chunk's four steps.
    const bool whole_chunks = steps_per_group % 4 == 0;
    auto dequant_next = [&](uint4 q, unsigned (&a)[4][4]) {
#ifdef W4A16_FUSED_SKIP_DEQUANT  // benchmark knob: the raw words as the A operand (wrong results)
        const unsigned qw[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) a[j][i] = qw[j] ^ (unsigned)i;
        return;
#endif
        if (whole_chunks) {
            const GroupParams g = split_params(raw);
            const GroupParams gp[4] = {g, g, g, g};
            dequant_chunk<T>(q, gp, a);
            advance(4);
        } else {
            GroupParams gp[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                gp[j] = split_params(raw);
                advance(1);
            }
            dequant_chunk<T>(q, gp, a);
        }
    };

    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.0f;
    // The words in flight: a ring of four chunks, q[c % 4] holding chunk c, each loaded four
    // chunks before it is dequantized (the loop below is unrolled by four, so every index is a
    // compile-time one and no register is copied while its load is in flight).
    unsigned a_even[4][4], a_odd[4][4];
    uint4 q[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) q[i] = chunk_words(min(i, my_chunks - 1));
    dequant_next(q[0], a_even);
    if (my_chunks > 4) q[0] = chunk_words(4);

    // Chunk c: its four MMAs from registers `a`, then (while they run) chunk c + 1 dequantized
    // into `a_next` from `q_next` (which then loads chunk c + 5), once chunk c - 1's MMAs, which
    // read `a_next`, are done.
    // The ring by counting (no division by the run-time stage count): chunk c's stage and phase
    // parity, and chunk c - 1's.
    int stage = 0, stage_prev = 0;
    unsigned phase = 0, phase_prev = 0;
    auto chunk_step = [&](int c, unsigned (&a)[4][4], unsigned (&a_next)[4][4], uint4& q_next) {
        mbarrier_wait(&full[stage], phase);
        const unsigned char* b_operand = smem + stage * STAGE_BYTES;
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma_rs<T, TOKENS>(acc, a[j], swizzled_b_descriptor(b_operand + 32 * j));
        wgmma_commit();
        fence_accumulators(acc);
        // Unconditional (at c = 0 it returns at once): the compiler must see every path wait
        // before `a_next` is written, or it serializes all the MMAs.
        wgmma_wait<1>();
        fence_accumulators(acc);
        if (c > 0) {
            // Chunk c - 1's stage is free once both warpgroups are done with it: thread 0 refills
            // it with chunk c - 1 + stages.
            if ((warp & 3) == 0 && lane == 0) mbarrier_arrive(&empty[stage_prev]);
            if (threadIdx.x == 0 && c - 1 + stages < my_chunks) {
                mbarrier_wait(&empty[stage_prev], phase_prev);
                request(c - 1 + stages, stage_prev);
            }
        }
        stage_prev = stage, phase_prev = phase;
        if (++stage == stages) stage = 0, phase ^= 1;
        if (c + 1 < my_chunks) {
            dequant_next(q_next, a_next);
            if (c + 5 < my_chunks) q_next = chunk_words(c + 5);
        }
    };
    for (int c = 0; c < my_chunks; c += 4) {
        chunk_step(c, a_even, a_odd, q[1]);
        if (c + 1 < my_chunks) chunk_step(c + 1, a_odd, a_even, q[2]);
        if (c + 2 < my_chunks) chunk_step(c + 2, a_even, a_odd, q[3]);
        if (c + 3 < my_chunks) chunk_step(c + 3, a_odd, a_even, q[0]);
    }
    wgmma_wait<0>();
    fence_accumulators(acc);

    // Epilogue: the block's [TOKENS x 128] output through shared memory (the stages are free once
    // both warpgroups are done), then 16-byte stores along each token's row: of y, or with a split
    // K, f32 partial sums to partial[split][token][n] (added by w4a16_sum_splits, with the bias).
    __syncthreads();
    const int row0 = row_group * 128, token0 = token_block * TOKENS;
    if (splits > 1)
        store_tile<float, ACC>(acc, smem, partial + (size_t)split * m * n, nullptr, m, n, row0, token0, TOKENS);
    else
        store_tile<T, ACC>(acc, smem, y, has_bias ? bias : nullptr, m, n, row0, token0, TOKENS);
}
#endif  // W4A16_HAS_WGMMA

#define W4A16_STREAM(T, TILES)                                                                          \
    extern "C" __global__ void __launch_bounds__(STREAM_WARPS * 32)                                     \
        w4a16_stream_##T##_t##TILES(const uint4* words, const uint2* params, const T* x, const T* bias, \
                                    T* y, float* partial, unsigned* arrivals, int m, int n, int k,      \
                                    int group_size, int slices_per_block, int has_bias) {               \
        w4a16_stream<T, TILES>(words, params, x, bias, y, partial, arrivals, m, n, k, group_size,      \
                               slices_per_block, has_bias);                                             \
    }
#define W4A16_GEMV(T, TILES)                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 1)                                       \
        w4a16_gemv_##T##_t##TILES(const uint4* words, const uint2* params, const T* x, const T* bias,   \
                                  T* y, float* partial, unsigned* arrivals, int m, int n, int k,        \
                                  int group_size, int stages, int pg, int has_bias) {                   \
        W4A16_GEMV_BODY(T, TILES)                                                                       \
    }
#ifdef W4A16_HAS_BULK_COPY
#define W4A16_GEMV_BODY(T, TILES) \
    w4a16_gemv<T, TILES>(words, params, x, bias, y, partial, arrivals, m, n, k, group_size, stages, pg, has_bias);
#else
#define W4A16_GEMV_BODY(T, TILES)
#endif
#define W4A16_FUSED(T, TOKENS)                                                                          \
    extern "C" __global__ void __launch_bounds__(FUSED_THREADS, 1)                                      \
        w4a16_fused_##T##_n##TOKENS(const uint4* words, const uint2* params, const T* x_img, const T* bias, \
                                    T* y, float* partial, int m, int n, int k, int group_size,          \
                                    int token_blocks, int splits, int stages, int has_bias) {           \
        W4A16_FUSED_BODY(T, TOKENS)                                                                     \
    }
#ifdef W4A16_HAS_WGMMA
#define W4A16_FUSED_BODY(T, TOKENS) \
    w4a16_fused<T, TOKENS>(words, params, x_img, bias, y, partial, m, n, k, group_size, token_blocks, splits, stages, \
                           has_bias);
#else
#define W4A16_FUSED_BODY(T, TOKENS)
#endif
#define W4A16_STAGE_X(T)                                                                                \
    extern "C" __global__ void w4a16_stage_x_##T(const T* x, uint4* x_img, int m, int k, int tokens,    \
                                                 long long units) {                                     \
        w4a16_stage_x<T>(x, x_img, m, k, tokens, units);                                                \
    }
#define W4A16_SUM_SPLITS(T)                                                                             \
    extern "C" __global__ void w4a16_sum_splits_##T(const float* partial, const T* bias, T* y, int m, int n, \
                                                    int splits, int has_bias) {                         \
        w4a16_sum_splits<T>(partial, bias, y, m, n, splits, has_bias);                                  \
    }
#define W4A16_DEQUANTIZE(T)                                                                             \
    extern "C" __global__ void __launch_bounds__(DEQUANT_WARPS * 32)                                    \
        w4a16_dequantize_##T(const uint4* words, const uint2* params, T* w, int n, int k, int group_size) { \
        w4a16_dequantize<T>(words, params, w, n, k, group_size);                                        \
    }

W4A16_STREAM(f16, 1) W4A16_STREAM(f16, 2) W4A16_STREAM(f16, 4) W4A16_STREAM(f16, 8)
W4A16_STREAM(bf16, 1) W4A16_STREAM(bf16, 2) W4A16_STREAM(bf16, 4) W4A16_STREAM(bf16, 8)
W4A16_GEMV(f16, 1) W4A16_GEMV(f16, 2) W4A16_GEMV(bf16, 1) W4A16_GEMV(bf16, 2)
W4A16_DEQUANTIZE(f16) W4A16_DEQUANTIZE(bf16)
W4A16_FUSED(f16, 64) W4A16_FUSED(f16, 128) W4A16_FUSED(f16, 256)
W4A16_FUSED(bf16, 64) W4A16_FUSED(bf16, 128) W4A16_FUSED(bf16, 256)
W4A16_STAGE_X(f16) W4A16_STAGE_X(bf16)
W4A16_SUM_SPLITS(f16) W4A16_SUM_SPLITS(bf16)
