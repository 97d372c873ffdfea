// dequantize.cu: w4a16_dequantize_*, the dense weight [N, K] for dequantize + cuBLAS (dequantize.rs
// launches it): one warp per 16x64 piece, staged through shared memory so every store is a full
// 16-byte vector. The weight layout and what the kernels share: w4a16.cuh.
#include "w4a16.cuh"

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

#define W4A16_DEQUANTIZE(T)                                                                             \
    extern "C" __global__ void __launch_bounds__(DEQUANT_WARPS * 32)                                    \
        w4a16_dequantize_##T(const uint4* words, const uint2* params, T* w, int n, int k, int group_size) { \
        w4a16_dequantize<T>(words, params, w, n, k, group_size);                                        \
    }

W4A16_DEQUANTIZE(f16) W4A16_DEQUANTIZE(bf16)
