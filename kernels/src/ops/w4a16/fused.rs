//! The prefill kernel (`fused.cu`, `w4a16_fused`): 17 to 256 activation rows where it pays
//! (`fused_pays`), sm_90a. Warpgroup MMAs (wgmma) with the weight dequantized in registers as the A
//! operand, so it crosses memory once, as 4 bits; the activations are first rewritten by
//! `w4a16_stage_x` into wgmma's swizzled layout and fed by a ring of TMA bulk copies. Weights too
//! narrow to fill the GPU are split along K, and `w4a16_sum_splits` adds the splits in order.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::cuda::{BLOCK, STREAM_WARPS};
use super::layout::{DeviceInt4, TILE_COLS, TILE_ROWS};
use super::Int4Weight;
use crate::cuda::{kernel_dim, CudaSource, CudaStorage};
use crate::{Result, Tensor};

pub(crate) const CUDA_SOURCE: CudaSource = CudaSource {
    file: "ops/w4a16/fused.cu",
    code: include_str!("fused.cu"),
    headers: &[&super::W4A16_HEADER],
    kernels: &[
        "w4a16_fused_f16_n64",
        "w4a16_fused_f16_n128",
        "w4a16_fused_f16_n256",
        "w4a16_fused_bf16_n64",
        "w4a16_fused_bf16_n128",
        "w4a16_fused_bf16_n256",
        "w4a16_stage_x_f16",
        "w4a16_stage_x_bf16",
        "w4a16_sum_splits_f16",
        "w4a16_sum_splits_bf16",
    ],
};

/// Threads per prefill block: two warpgroups (fused.cu, FUSED_THREADS).
const FUSED_BLOCK: u32 = 8 * 32;
/// The most stages in the prefill kernel's ring (fused.cu, FUSED_MAX_STAGES), and the dynamic
/// shared memory they may take (the sm_90 limit per block less the 1 KB alignment slack and the
/// barriers).
const FUSED_MAX_STAGES: usize = 8;
const FUSED_SHARED_BUDGET: usize = 224 * 1024;

/// Activation rows per prefill block (wgmma's N): the fewest of 64, 128, 256 that hold `m`, 256
/// above (the weight is then dequantized once per 256 rows).
fn fused_tokens(m: usize) -> usize {
    match m {
        0..=64 => 64,
        65..=128 => 128,
        _ => 256,
    }
}

/// The prefill kernel (fused.cu, w4a16_fused): `x` is first rewritten into the swizzled,
/// K-permuted image the kernel's bulk copies read (w4a16_stage_x, 2 bytes per activation each
/// way), then one block per (token block, 128 output rows, K split). A weight too narrow to
/// fill the GPU with blocks is split along K; the splits' f32 partial sums meet in a workspace
/// that w4a16_sum_splits adds in split order.
pub(super) fn fused(
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
    if m == 0 {
        return Ok(Tensor::from_cuda(&[m, n], CudaStorage::new(d.dev.clone(), y)));
    }
    let tokens = fused_tokens(m);
    let token_blocks = m.div_ceil(tokens);
    let (m32, n32, k32) = (kernel_dim("w4a16", m)? as i32, kernel_dim("w4a16", n)? as i32, kernel_dim("w4a16", k)? as i32);
    let (tokens32, blocks32) = (tokens as i32, kernel_dim("w4a16", token_blocks)? as i32);

    let mut x_img = d.dev.alloc_buf(dtype, token_blocks * tokens * k)?;
    let units = token_blocks * tokens * k / 8;
    let units64 = units as i64;
    let cfg = LaunchConfig { grid_dim: (kernel_dim("w4a16", units.div_ceil(BLOCK as usize))?, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let kernel = d.dev.kernel(&CUDA_SOURCE, &format!("w4a16_stage_x_{dtype}"))?;
    let mut args = kernel.args();
    sx.buf().arg(&mut args);
    x_img.arg_mut(&mut args);
    args.arg(&m32);
    args.arg(&k32);
    args.arg(&tokens32);
    args.arg(&units64);
    // SAFETY: w4a16_stage_x_<t>(const T* x, uint4* x_img, int m, int k, int tokens, i64 units),
    // the dtype that of x and x_img: x holds m rows of k values, x_img token_blocks * tokens *
    // k values = `units` 16-byte units; thread v < units writes unit v and reads row v's token
    // only when it is below m.
    unsafe { kernel.launch(args, cfg) }?;

    let stage_bytes = tokens * 128;
    let stages = (FUSED_SHARED_BUDGET / stage_bytes).min(FUSED_MAX_STAGES);
    // The ring's stages also hold the epilogue's staged output: TOKENS rows of 132 f32 at most.
    debug_assert!(stages * stage_bytes >= tokens * 132 * 4);
    let shared = stages * stage_bytes + 1024;
    let name = format!("w4a16_fused_{dtype}_n{tokens}");
    d.dev.allow_dynamic_shared(&CUDA_SOURCE, &name, shared)?;
    let row_groups = (n / TILE_ROWS).div_ceil(STREAM_WARPS);
    let blocks = token_blocks * row_groups;
    // Enough splits for a wave of blocks, each of at least 8 chunks (512 columns) of K.
    let splits = d.dev.multiprocessors().div_ceil(blocks).clamp(1, (k / TILE_COLS / 8).max(1));
    let partial = d.dev.alloc::<f32>(if splits > 1 { splits * m * n } else { 1 })?;
    let cfg = LaunchConfig {
        grid_dim: (kernel_dim("w4a16", blocks * splits)?, 1, 1),
        block_dim: (FUSED_BLOCK, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    let (g32, stages32, has_bias) = (w.group_size as i32, stages as i32, sb.is_some() as i32);
    let splits32 = splits as i32;
    let kernel = d.dev.kernel(&CUDA_SOURCE, &name)?;
    let mut args = kernel.args();
    args.arg(&*d.words);
    args.arg(&*d.params);
    x_img.arg(&mut args);
    // Without a bias the kernel never reads this pointer; x is any valid one.
    sb.unwrap_or(sx).buf().arg(&mut args);
    y.arg_mut(&mut args);
    args.arg(&partial);
    args.arg(&m32);
    args.arg(&n32);
    args.arg(&k32);
    args.arg(&g32);
    args.arg(&blocks32);
    args.arg(&splits32);
    args.arg(&stages32);
    args.arg(&has_bias);
    // SAFETY: w4a16_fused_<t>_n<tokens>(const uint4* words, const uint2* params, const T* x_img,
    // const T* bias, T* y, float* partial, int m, int n, int k, int group_size, int
    // token_blocks, int splits, int stages, int has_bias): words and params are this weight's
    // layout for [n, k] in groups of group_size (from_awq), x_img was staged above for
    // token_blocks blocks of `tokens` rows, y holds m * n values, partial splits * m * n when
    // splits > 1, bias n values when has_bias; the dynamic shared memory (stages of tokens *
    // 128 bytes plus 1 KB of alignment slack) was allowed above.
    unsafe { kernel.launch(args, cfg) }?;
    if splits > 1 {
        let cfg = LaunchConfig { grid_dim: (kernel_dim("w4a16", (m * n).div_ceil(BLOCK as usize))?, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let kernel = d.dev.kernel(&CUDA_SOURCE, &format!("w4a16_sum_splits_{dtype}"))?;
        let mut args = kernel.args();
        args.arg(&partial);
        sb.unwrap_or(sx).buf().arg(&mut args);
        y.arg_mut(&mut args);
        args.arg(&m32);
        args.arg(&n32);
        args.arg(&splits32);
        args.arg(&has_bias);
        // SAFETY: w4a16_sum_splits_<t>(const float* partial, const T* bias, T* y, int m, int
        // n, int splits, int has_bias): partial holds splits * m * n sums (written by the
        // kernel above, in stream order), y m * n values, bias n when has_bias (else never
        // read); thread v < m * n writes y[v].
        unsafe { kernel.launch(args, cfg) }?;
    }
    Ok(Tensor::from_cuda(&[m, n], CudaStorage::new(d.dev.clone(), y)))
}
