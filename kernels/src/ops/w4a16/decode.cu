// decode.cu: w4a16_gemv_*_t{1,2}, the decode kernel (decode.rs launches it). The weight layout and
// what the kernels share: w4a16.cuh.
#include "w4a16.cuh"

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
// Inside a block one producer warp keeps a ring of `stages` slices in flight (decode.rs picks
// three) with TMA bulk copies (cp.async.bulk, sm_90): the slice's 32 KB of words, its activation
// rows and its group parameters land in one shared-memory stage whose mbarrier counts the bytes.
// Sixteen consumer warps (two per 16-row tile, each taking half of the slice's chunks) wait on the
// stage, run the MMAs from shared memory and release it on a second mbarrier. No register holds a
// word in flight, so the loads in flight are bounded by shared memory, not by occupancy.
//
// The output's bits depend on the grid (one block per multiprocessor: where the shares split the
// row groups), so they are the same from call to call on one kind of GPU, not across kinds.
// Compiled for sm_90 and later only (the kernels exist on older GPUs, empty: mod.rs never
// launches them there).
constexpr int GEMV_KSPLIT = 2;                        // consumer warps per tile
constexpr int GEMV_CONSUMERS = STREAM_WARPS * GEMV_KSPLIT;
constexpr int GEMV_THREADS = (GEMV_CONSUMERS + 1) * 32;
constexpr int GEMV_SLICE_CHUNKS = 8;                  // 512 input columns per slice
constexpr int GEMV_WORD_BYTES = STREAM_WARPS * GEMV_SLICE_CHUNKS * 512;  // 32 KB
constexpr int GEMV_X_PITCH = GEMV_SLICE_CHUNKS * 64 + 16;  // halves per staged row: +32 bytes, as StreamSlice
constexpr int GEMV_MAX_STAGES = 8;  // the barriers' array size; decode.rs passes fewer

#ifdef W4A16_HAS_BULK_COPY
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
    const GemvSplit split{row_groups * slices, (int)gridDim.x};  // decode.rs keeps the total below 2^31
    const int begin = split.start(blockIdx.x), end = split.start(blockIdx.x + 1);
    const int stage_bytes = GemvStage<TILES>::bytes(pg);

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
#ifdef W4A16_GEMV_SKIP_LOADS  // probe (w4a16.cuh): the math alone, on whatever the stages hold (wrong results)
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
#ifdef W4A16_GEMV_SKIP_MATH  // probe (w4a16.cuh): the copy pipeline alone (wrong results)
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

W4A16_GEMV(f16, 1) W4A16_GEMV(f16, 2) W4A16_GEMV(bf16, 1) W4A16_GEMV(bf16, 2)
