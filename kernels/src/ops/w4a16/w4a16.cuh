// w4a16.cuh: what the W4A16 kernels of ops/w4a16/ share (the .cu files beside it: stream.cu,
// decode.cu, fused.cu, dequantize.cu). NVRTC gets it in memory, as common.cuh (each of those
// sources' CudaSource lists it).
//
// Weight layout (built once on the host by Int4Weight::from_awq, see layout.rs): the weight [N, K]
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
// Kernels (which one serves which call: W4A16Path in mod.rs):
// - decode.cu, w4a16_gemv_*_t{1,2} (up to 16 activation rows, large weights, sm_90): persistent
//   blocks fed by TMA bulk copies, each streaming an equal share of the weight.
// - stream.cu, w4a16_stream_*_t{1,2,4,8} (up to 64 rows: small weights at up to 16, 17 to 32 rows
//   of weights no wider than long, and every call up to 64 rows on GPUs without wgmma): one block
//   of 8 warps per (8*TILES rows, 128 output rows, a range of K slices), pipelined a slice ahead;
//   K ranges meet in an f32 workspace (split-K, finish_block).
// - fused.cu, w4a16_fused_*_n{64,128,256} (17 to 256 rows where it pays, sm_90a): warpgroup MMAs
//   (wgmma) with the weight dequantized in registers as the A operand; its activations are first
//   rewritten by w4a16_stage_x into the layout wgmma reads.
// - dequantize.cu, w4a16_dequantize_*: writes the dense weight [N, K] (for cuBLAS at large batch).
// The split-K kernels (gemv, stream) are launched to overlap the kernel before them (programmatic
// dependent launch, sm_90): each waits for it (wait_for_previous_kernel) before reading x or
// writing y, its workspace or its counters.
//
// Probes: W4A16_GEMV_SKIP_MATH (the decode kernel's copies alone), W4A16_GEMV_SKIP_LOADS (its
// math alone, on stale shared memory), W4A16_FUSED_HALF_X (the prefill kernel with half of each
// activation stage copied) and W4A16_FUSED_SKIP_DEQUANT (its raw words as the A operand) are
// preprocessor switches for benchmarks (BENCHMARKS.md) that give wrong results by design.
// Preprocessor definitions reach NVRTC only in a build with the `kernel-probes` cargo feature
// (kernels/Cargo.toml, `AWQ_NVRTC_DEFINES`); a normal build cannot turn them on.
#pragma once

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
// writing what it reads). mod.rs (launch_split_k) launches the split-K kernels so.
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

// A weight word read once: bypass L1 (nothing else reads it).
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Where piece (tile, chunk) starts, in uint4 units / 32: [slice of 8 chunks][group of 8 tiles]
// [tile % 8][chunk % 8]. layout.rs (piece_index) computes the same.
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

// TMA bulk copies and the mbarriers that count them (sm_90 and later; decode.cu, fused.cu).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define W4A16_HAS_BULK_COPY 1
#endif

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
#endif  // W4A16_HAS_BULK_COPY
