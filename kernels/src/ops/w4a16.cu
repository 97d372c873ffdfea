// w4a16.cu: 4-bit weights times 16-bit activations (ops/w4a16.rs), for f16 and bf16.
//
// Weight layout (built once on the host by Int4Weight::from_awq_gemm, see w4a16.rs): the weight
// [N, K] is cut into tiles of 16 output rows x 64 input columns; tile (t, c) is 512 bytes, one
// uint4 per lane of a warp, stored at words[(t * K/64 + c) * 32 + lane]. Word j of a lane's uint4
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
// - w4a16_stream_*: the decode/small-batch kernel. One block of 8 warps per (8*TILES activation
//   rows, 128 output rows, K slice of up to 512 columns); each warp streams one 16-row tile's words
//   of the slice with 16-byte non-allocating loads, all in flight at once, while the block stages the
//   activations of the slice in shared memory; K slices meet in an f32 workspace (split-K).
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

// A weight word read once: bypass L1 (nothing else reads it) and let L2 treat it as streaming.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
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
constexpr int STREAM_MAX_CHUNKS = 8; // 64-column chunks per slice at most: 16-byte loads in flight per lane

// Input columns per block (one K slice) for TILES token tiles: 512, fewer for many tokens so the
// staged activations stay near 16 KB of shared memory.
template <int TILES> struct StreamSlice {
    static constexpr int COLS = TILES <= 2 ? 512 : (TILES == 4 ? 256 : 128);
    static constexpr int PITCH = COLS + 8;  // halves per staged row: +16 bytes spreads rows over banks
};

// Block (token block, group of 8 tiles, K slice). Each warp streams its tile's words of the slice
// (all loads issued first), the block stages the slice of the activations in shared memory
// meanwhile, then each warp runs the MMAs. With one slice the block writes y; with several, each
// writes f32 partial sums to `partial` [slice][token][n] and the last block of the (token block,
// tile group) to arrive, counted in `arrivals`, adds them in slice order (the result does not
// depend on which block came last), adds the bias, writes y and resets its counter to 0 for the
// next launch.
template <typename T, int TILES>
__device__ void w4a16_stream(const uint4* __restrict__ words, const uint2* __restrict__ params,
                             const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                             float* __restrict__ partial, unsigned* __restrict__ arrivals,
                             int m, int n, int k, int group_size, int has_bias) {
    typedef Int4Traits<T> Tr;
    constexpr int COLS = StreamSlice<TILES>::COLS, PITCH = StreamSlice<TILES>::PITCH;
    constexpr int TOKENS = 8 * TILES;
    __shared__ __align__(16) T staged_x[TOKENS * PITCH];
    __shared__ bool last_block;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int token0 = blockIdx.x * TOKENS;
    const int tile = blockIdx.y * STREAM_WARPS + warp;
    const int slice = blockIdx.z, slices = gridDim.z;
    const int chunks = k >> 6, groups = k / group_size, steps_per_group = group_size >> 4;
    const int tiles = n >> 4;
    const int c_begin = slice * (COLS / 64), c_count = min(COLS / 64, chunks - c_begin);
    const bool has_tile = tile < tiles;

    // 1. The weight words of the slice, all requested before anything waits on them.
    uint4 q[STREAM_MAX_CHUNKS];
    const uint4* tile_words = words + ((size_t)tile * chunks + c_begin) * 32 + lane;
#pragma unroll
    for (int u = 0; u < COLS / 64; ++u)
        if (has_tile && u < c_count) q[u] = load_stream(tile_words + (size_t)u * 32);

    // 2. The activations of the slice, zero for tokens past m (their MMA columns are discarded).
    const int col0 = c_begin * 64;
    for (int v = threadIdx.x; v < TOKENS * (COLS / 8); v += blockDim.x) {
        const int r = v / (COLS / 8), c = (v % (COLS / 8)) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (token0 + r < m && c < c_count * 64) val = __ldg(reinterpret_cast<const uint4*>(x + (size_t)(token0 + r) * k + col0 + c));
        *reinterpret_cast<uint4*>(staged_x + r * PITCH + c) = val;
    }
    __syncthreads();

    // 3. The MMAs: A = the tile's dequantized codes (q - z, exact), B = staged activations; each
    //    group's f32 sum is scaled when the group ends.
    float acc[TILES][4], part[TILES][4];
#pragma unroll
    for (int t = 0; t < TILES; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][i] = part[t][i] = 0.0f;
    if (has_tile) {
        const uint2* tile_params = params + (size_t)tile * groups * 8 + gid;
        int group = (c_begin * 4) / steps_per_group, step_in_group = (c_begin * 4) % steps_per_group;
        GroupParams gp = split_params(__ldg(tile_params + (size_t)group * 8));
#pragma unroll
        for (int u = 0; u < COLS / 64; ++u) {
            if (u >= c_count) continue;  // not `break`: keeps the loop unrolled, q in registers
            const unsigned qw[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                unsigned a[4];
                a[0] = Tr::sub2(magic_pair<T>(qw[j], 0), gp.zero_lo);
                a[1] = Tr::sub2(magic_pair<T>(qw[j], 1), gp.zero_hi);
                a[2] = Tr::sub2(magic_pair<T>(qw[j], 2), gp.zero_lo);
                a[3] = Tr::sub2(magic_pair<T>(qw[j], 3), gp.zero_hi);
                const int col = (u * 4 + j) * 16 + 2 * tig;
#pragma unroll
                for (int t = 0; t < TILES; ++t) {
                    const T* row = staged_x + (t * 8 + gid) * PITCH + col;
                    const unsigned b0 = *reinterpret_cast<const unsigned*>(row);
                    const unsigned b1 = *reinterpret_cast<const unsigned*>(row + 8);
                    Tr::mma(part[t], a, b0, b1);
                }
                if (++step_in_group == steps_per_group) {
                    fold_group<T, TILES>(acc, part, gp);
                    step_in_group = 0;
                    ++group;
                    if (group < groups) gp = split_params(__ldg(tile_params + (size_t)group * 8));
                }
            }
        }
        if (step_in_group != 0) fold_group<T, TILES>(acc, part, gp);
    }

    // C fragment element i of token tile t: output row gid + 8 * (i / 2) of the tile, token
    // 8t + 2 * tig + i % 2.
    if (slices == 1) {
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
                if (token < m) partial[((size_t)slice * m + token) * n + col] = acc[t][i];
            }
    }
    // 4. The last block of this (token block, tile group) to finish sums the slices.
    __threadfence();  // our partials are visible device-wide before we are counted
    __syncthreads();
    unsigned* counter = arrivals + (size_t)blockIdx.x * gridDim.y + blockIdx.y;
    if (threadIdx.x == 0) last_block = atomicAdd(counter, 1u) == (unsigned)(slices - 1);
    __syncthreads();
    if (!last_block) return;
    __threadfence();  // and everyone else's are visible to us
    const int rows = min(STREAM_WARPS * 16, n - blockIdx.y * STREAM_WARPS * 16);
    for (int v = threadIdx.x; v < TOKENS * rows; v += blockDim.x) {
        const int token = token0 + v / rows, col = blockIdx.y * STREAM_WARPS * 16 + v % rows;
        if (token >= m) continue;
        float sum = has_bias ? to_f32(bias[col]) : 0.0f;
        for (int s = 0; s < slices; ++s) sum += __ldcg(partial + ((size_t)s * m + token) * n + col);
        y[(size_t)token * n + col] = from_f32<T>(sum);
    }
    if (threadIdx.x == 0) *counter = 0;
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
    const size_t piece = (size_t)blockIdx.x * DEQUANT_WARPS + warp;
    if (piece >= (size_t)(n >> 4) * chunks) return;  // whole warps only: no block-wide barrier below
    const int tile = (int)(piece / chunks), chunk = (int)(piece % chunks);
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
                                    int group_size, int has_bias) {                                     \
        w4a16_stream<T, TILES>(words, params, x, bias, y, partial, arrivals, m, n, k, group_size, has_bias); \
    }
#define W4A16_DEQUANTIZE(T)                                                                             \
    extern "C" __global__ void __launch_bounds__(DEQUANT_WARPS * 32)                                    \
        w4a16_dequantize_##T(const uint4* words, const uint2* params, T* w, int n, int k, int group_size) { \
        w4a16_dequantize<T>(words, params, w, n, k, group_size);                                        \
    }

W4A16_STREAM(f16, 1) W4A16_STREAM(f16, 2) W4A16_STREAM(f16, 4) W4A16_STREAM(f16, 8)
W4A16_STREAM(bf16, 1) W4A16_STREAM(bf16, 2) W4A16_STREAM(bf16, 4) W4A16_STREAM(bf16, 8)
W4A16_DEQUANTIZE(f16) W4A16_DEQUANTIZE(bf16)
