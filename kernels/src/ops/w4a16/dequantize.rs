//! The dequantize kernel (`dequantize.cu`, `w4a16_dequantize`): the dense `[out, in]` weight in the
//! activations' dtype, for `W4A16Path::DequantizeGemm` (dequantize, then cuBLAS through
//! `ops::linear`) and `Int4Weight::dequantize` on CUDA.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::cuda::BLOCK;
use super::layout::{padded_pieces, DeviceInt4, TILE_COLS, TILE_ROWS};
use super::Int4Weight;
use crate::cuda::{kernel_dim, CudaSource, CudaStorage};
use crate::{Result, Tensor};

pub(crate) const CUDA_SOURCE: CudaSource = CudaSource {
    file: "ops/w4a16/dequantize.cu",
    code: include_str!("dequantize.cu"),
    headers: &[&super::W4A16_HEADER],
    kernels: &["w4a16_dequantize_f16", "w4a16_dequantize_bf16"],
};

/// The dense `[out, in]` weight, one warp per 16 x 64 tile.
pub(super) fn dequantize(w: &Int4Weight, d: &DeviceInt4) -> Result<Tensor> {
    let (n, k) = (w.out_features, w.in_features);
    let mut out = d.dev.alloc_buf(w.dtype, n * k)?;
    let pieces = padded_pieces(n / TILE_ROWS, k / TILE_COLS);
    let blocks = kernel_dim("w4a16", pieces.div_ceil(8))?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let (n32, k32, g32) = (kernel_dim("w4a16", n)? as i32, kernel_dim("w4a16", k)? as i32, w.group_size as i32);
    let kernel = d.dev.kernel(&CUDA_SOURCE, &format!("w4a16_dequantize_{}", w.dtype))?;
    let mut args = kernel.args();
    args.arg(&*d.words);
    args.arg(&*d.params);
    out.arg_mut(&mut args);
    args.arg(&n32);
    args.arg(&k32);
    args.arg(&g32);
    // SAFETY: w4a16_dequantize_<t>(const uint4* words, const uint2* params, T* w, int n, int k,
    // int group_size), the dtype the weight was packed for: words and params are its layout
    // for [n, k] (from_awq), out holds n * k values; warp p < pieces handles piece p and skips
    // padding pieces.
    unsafe { kernel.launch(args, cfg) }?;
    Ok(Tensor::from_cuda(&[n, k], CudaStorage::new(d.dev.clone(), out)))
}
