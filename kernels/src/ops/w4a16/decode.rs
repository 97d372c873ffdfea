//! The decode kernel (`decode.cu`, `w4a16_gemv`): up to 16 activation rows on large weights,
//! sm_90. One persistent block per multiprocessor streams an equal share of the weight's
//! 512-column slices through a ring of TMA bulk copies (a producer warp, 16 consumer warps on the
//! tensor cores); row groups shared by several blocks are finished, in block order, by the last to
//! arrive. Launched through `launch_split_k` (mod.rs), overlapping the kernel before it.

use cudarc::driver::LaunchConfig;

use super::cuda::{launch_split_k, SplitK, STREAM_WARPS};
use super::layout::{DeviceInt4, TILE_ROWS};
use super::Int4Weight;
use crate::cuda::{kernel_dim, CudaSource, CudaStorage};
use crate::{Result, Tensor};

pub(crate) const CUDA_SOURCE: CudaSource = CudaSource {
    file: "ops/w4a16/decode.cu",
    code: include_str!("decode.cu"),
    headers: &[&super::W4A16_HEADER],
    kernels: &["w4a16_gemv_f16_t1", "w4a16_gemv_f16_t2", "w4a16_gemv_bf16_t1", "w4a16_gemv_bf16_t2"],
};

/// Threads per decode block: 16 consumer warps and one producer (decode.cu, GEMV_THREADS).
const DECODE_BLOCK: u32 = 17 * 32;
/// Bytes of one decode stage besides the group parameters: 32 KB of words and 8 * tiles
/// activation rows of 528 halves (decode.cu, GemvStage).
const DECODE_WORD_BYTES: usize = 32 * 1024;
const DECODE_X_ROW_BYTES: usize = 528 * 2;
const DECODE_SLICE_COLS: usize = 512;
/// Dynamic shared memory the decode kernel may take: the sm_90 limit per block (227 KB) less
/// its static arrays (barriers, the halves' exchange, 8 KB at most).
const DECODE_SHARED_BUDGET: usize = 227 * 1024 - 9 * 1024;
/// Stages in the ring: three measured best on an H100 (two or four to five were 1-3% slower:
/// fewer hide less latency, more leave more loaded stages to compute after the last load).
const DECODE_STAGES: usize = 3;

/// The most groups one 512-column slice of the decode kernel touches: its stage holds that many
/// parameter groups per tile.
fn groups_per_slice(k: usize, group_size: usize) -> usize {
    (0..k.div_ceil(DECODE_SLICE_COLS))
        .map(|s| {
            let (c0, c1) = (s * DECODE_SLICE_COLS, ((s + 1) * DECODE_SLICE_COLS).min(k));
            c1.div_ceil(group_size) - c0 / group_size
        })
        .max()
        .unwrap_or(1)
}

/// The decode kernel (decode.cu, w4a16_gemv): one persistent block per multiprocessor, each
/// streaming an equal share of the weight's 512-column slices.
pub(super) fn decode(
    sx: &CudaStorage,
    sb: Option<&CudaStorage>,
    w: &Int4Weight,
    d: &DeviceInt4,
    m: usize,
    k: usize,
) -> Result<Tensor> {
    let n = w.out_features;
    let dtype = sx.dtype();
    let tiles = if m <= 8 { 1 } else { 2 };
    let pg = groups_per_slice(k, w.group_size);
    let stage_bytes = DECODE_WORD_BYTES + 8 * tiles * DECODE_X_ROW_BYTES + STREAM_WARPS * pg * 64;
    let stages = (DECODE_SHARED_BUDGET / stage_bytes).min(DECODE_STAGES);
    if stages < 2 {
        // Not reached by any group size from_awq accepts (16 is the worst: 3 stages fit);
        // kept so that a future layout change degrades to the other kernel, not an error.
        return super::stream::stream(sx, sb, w, d, m, k);
    }
    let mut y = d.dev.alloc_buf(dtype, m * n)?;
    if m > 0 {
        let row_groups = (n / TILE_ROWS).div_ceil(STREAM_WARPS);
        let steps = row_groups * k.div_ceil(DECODE_SLICE_COLS);
        let blocks = steps.min(d.dev.multiprocessors());
        let name = format!("w4a16_gemv_{dtype}_t{tiles}");
        let shared = stages * stage_bytes;
        d.dev.allow_dynamic_shared(&CUDA_SOURCE, &name, shared)?;
        let cfg = LaunchConfig {
            grid_dim: (kernel_dim("w4a16", blocks)?, 1, 1),
            block_dim: (DECODE_BLOCK, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        // Two slots of 8 * tiles x 128 partial sums per block (its first and last row group).
        let partial = d.dev.alloc::<f32>(blocks * 2 * 8 * tiles * 128)?;
        let arrivals = d.dev.arrival_counters(row_groups)?;
        // The TMA copies need 16-byte aligned sources: every tensor owns its whole allocation
        // (256-byte aligned) and rows are k * 2 bytes, a multiple of 128.
        let split_k = SplitK { partial: &partial, arrivals: &arrivals };
        launch_split_k(d, &CUDA_SOURCE, w, &name, cfg, (sx, sb), (m, k), &mut y, split_k, &[stages as i32, pg as i32])?;
    }
    Ok(Tensor::from_cuda(&[m, n], CudaStorage::new(d.dev.clone(), y)))
}
