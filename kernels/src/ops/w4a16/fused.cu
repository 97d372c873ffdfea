// fused.cu: the prefill kernel w4a16_fused_*_n{64,128,256} and its helpers w4a16_stage_x_* and
// w4a16_sum_splits_* (fused.rs launches them). The weight layout and what the kernels share:
// w4a16.cuh.
#include "w4a16.cuh"

// w4a16_fused_*_n{64,128,256}: prefill (17 to 256 activation rows where it pays, mod.rs's
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
// elsewhere, empty: mod.rs never launches them there).
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
#ifdef W4A16_FUSED_HALF_X  // probe (w4a16.cuh): half of each stage copied (wrong results): what L2 traffic costs
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
#ifdef W4A16_FUSED_SKIP_DEQUANT  // probe (w4a16.cuh): the raw words as the A operand (wrong results)
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

W4A16_FUSED(f16, 64) W4A16_FUSED(f16, 128) W4A16_FUSED(f16, 256)
W4A16_FUSED(bf16, 64) W4A16_FUSED(bf16, 128) W4A16_FUSED(bf16, 256)
W4A16_STAGE_X(f16) W4A16_STAGE_X(bf16)
W4A16_SUM_SPLITS(f16) W4A16_SUM_SPLITS(bf16)
