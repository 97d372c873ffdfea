//! The split-K stream kernel (`stream.cu`, `w4a16_stream`): up to 64 activation rows, small
//! weights and GPUs without TMA or wgmma. One block of 8 warps per (8 * tiles activation rows, 128
//! output rows, range of K slices), mma.sync m16n8k16 on the tensor cores; with several K ranges
//! the blocks meet in an f32 workspace. Launched through `launch_split_k` (mod.rs), overlapping the
//! kernel before it.

/// How the streaming kernel splits K: `(ranges, slices per range)` for `slices` K slices and
/// `blocks` blocks per K range, `slots` blocks resident on the whole GPU at once. Picks the split
/// whose blocks fill the waves best (a last wave a quarter full wastes three quarters of it), and
/// among equals the fewest ranges (each range beyond the first costs a workspace round trip).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) fn split_k(slices: usize, blocks: usize, slots: usize) -> (usize, usize) {
    let mut best = (1, slices, 0.0f64);
    for wanted in 1..=slices.min(32) {
        let per_range = slices.div_ceil(wanted);
        let ranges = slices.div_ceil(per_range);
        let total = blocks * ranges;
        let waves = total.div_ceil(slots.max(1));
        let fill = total as f64 / (waves * slots.max(1)) as f64 * slices as f64 / (ranges * per_range) as f64;
        if fill > best.2 + 0.02 {
            best = (ranges, per_range, fill);
        }
    }
    (best.0, best.1)
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/w4a16/stream.cu",
    code: include_str!("stream.cu"),
    headers: &[&super::W4A16_HEADER],
    kernels: &[
        "w4a16_stream_f16_t1",
        "w4a16_stream_f16_t2",
        "w4a16_stream_f16_t4",
        "w4a16_stream_f16_t8",
        "w4a16_stream_bf16_t1",
        "w4a16_stream_bf16_t2",
        "w4a16_stream_bf16_t4",
        "w4a16_stream_bf16_t8",
    ],
};

#[cfg(feature = "cuda")]
pub(crate) use cuda::stream;

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::LaunchConfig;

    use super::CUDA_SOURCE;
    use crate::cuda::{kernel_dim, CudaStorage};
    use crate::ops::w4a16::cuda::{launch_split_k, SplitK, BLOCK, STREAM_WARPS};
    use crate::ops::w4a16::layout::{DeviceInt4, TILE_ROWS};
    use crate::ops::w4a16::Int4Weight;
    use crate::{Error, Result, Tensor};

    /// Streaming blocks resident per multiprocessor (registers: ~120 per thread, 256 threads).
    const BLOCKS_PER_SM: usize = 2;

    /// The streaming kernel (stream.cu): one block per (8 * tiles activation rows, 128 output rows,
    /// range of K slices); with several ranges, an f32 workspace for their partial sums.
    pub(crate) fn stream(
        sx: &CudaStorage,
        sb: Option<&CudaStorage>,
        w: &Int4Weight,
        d: &DeviceInt4,
        m: usize,
        k: usize,
    ) -> Result<Tensor> {
        let n = w.out_features;
        let dtype = sx.dtype();
        let mut y = d.dev.alloc_buf(dtype, m * n)?;
        if m > 0 {
            // Activation rows per block: 8 per MMA tile, at most 8 tiles; the K slice a block
            // covers shrinks as they grow (stream.cu, StreamSlice).
            let (tiles, slice_cols) = match m {
                0..=8 => (1, 512),
                9..=16 => (2, 512),
                17..=32 => (4, 256),
                _ => (8, 128),
            };
            let token_blocks = m.div_ceil(8 * tiles);
            let row_groups = (n / TILE_ROWS).div_ceil(STREAM_WARPS);
            let slices = k.div_ceil(slice_cols);
            let (ranges, slices_per_block) =
                super::split_k(slices, token_blocks * row_groups, BLOCKS_PER_SM * d.dev.multiprocessors());
            let too_big = |what: &str, v: usize| Error::Shape {
                op: "w4a16",
                detail: format!("{what} {v} exceeds the streaming kernel's grid (65535 blocks on that axis)"),
            };
            let row_groups32 = u32::try_from(row_groups).ok().filter(|&v| v <= 65535).ok_or_else(|| too_big("out_features / 128 =", row_groups))?;
            let slices32 = u32::try_from(ranges).ok().filter(|&v| v <= 65535).ok_or_else(|| too_big("K ranges", ranges))?;
            let cfg = LaunchConfig {
                grid_dim: (kernel_dim("w4a16", token_blocks)?, row_groups32, slices32),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // The workspace is only touched with more than one slice; a 1-element buffer otherwise.
            let partial = d.dev.alloc::<f32>(if ranges > 1 { ranges * m * n } else { 1 })?;
            let arrivals = d.dev.arrival_counters(token_blocks * row_groups)?;
            let name = format!("w4a16_stream_{dtype}_t{tiles}");
            let split_k = SplitK { partial: &partial, arrivals: &arrivals };
            launch_split_k(d, &CUDA_SOURCE, w, &name, cfg, (sx, sb), (m, k), &mut y, split_k, &[slices_per_block as i32])?;
        }
        Ok(Tensor::from_cuda(&[m, n], CudaStorage::new(d.dev.clone(), y)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_splits_cover_every_slice_and_fill_the_gpu() {
        for slices in 1..70 {
            for blocks in [1, 8, 32, 64, 224, 448, 3000] {
                let (ranges, per) = split_k(slices, blocks, 264);
                assert!(ranges * per >= slices && (ranges - 1) * per < slices, "{slices} {blocks}: {ranges} x {per}");
            }
        }
        // A small layer (32 blocks per range) is split to fill the 264 slots; one that fills them
        // evenly as it is (264 blocks) is not split.
        assert_eq!(split_k(8, 32, 264), (8, 1));
        assert_eq!(split_k(16, 264, 264), (1, 16));
    }
}
