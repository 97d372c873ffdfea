//! W4A16 linear layers: 4-bit weights in AutoAWQ's GEMM layout times f16 or bf16 activations,
//! `y = x W^T (+ bias)` with f32 accumulation. This is the op a served AWQ model spends its time in.
//!
//! - [`PackedLinear`]: a linear as an AWQ checkpoint stores it (`qweight` I32 `[in, out / 8]`,
//!   `qzeros` I32 `[in / g, out / 8]`, `scales` F16 `[in / g, out]`; see `awq_model::awq_format`
//!   for the format and how it is written).
//! - [`Int4Weight`]: the same weight repacked once, at load time, into the layout the CUDA kernels
//!   stream: 16 output rows x 64 input columns per 512-byte tile, each lane's 16 bytes already in the
//!   register order of a tensor-core MMA operand (w4a16.cu explains it), plus the group zero points
//!   and scales interleaved per tile. Built on the host, moved with [`Int4Weight::to_device`].
//! - [`w4a16_linear`]: the op. On the CPU it is the reference: dequantize to f32 (exactly: a 4-bit
//!   difference times a 16-bit scale fits f32's mantissa) and multiply with the f32 GEMM of
//!   [`super::linear`]. On CUDA it picks a path by the number of activation rows and the weight's
//!   size (see [`W4A16Path`]): at decode sizes a kernel that streams the packed weight once and
//!   multiplies on the tensor cores (the persistent TMA kernel for large weights, the split-K one
//!   for small); from 17 to 256 rows where it pays ([`fused_pays`]), a Hopper kernel that
//!   dequantizes in registers in front of the warpgroup MMAs (wgmma), split along K for narrow
//!   weights; above, dequantization to a 16-bit workspace and cuBLAS.
//!
//! Shapes the kernels take: `out` a multiple of 16, `in` a multiple of 64, the group size a
//! multiple of 16 that divides `in`. [`Int4Weight::from_awq`] refuses others, naming the rule.

use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

use super::linear::{matmul_f32, StridedMatrix};
use super::{operands_and, Operands};
use super::quantize::{awq_code_shift, QuantSpec, QuantizedGroups};
use crate::rng::SplitMix64;
use crate::{DType, Device, Error, Result, Tensor};

/// The nibble order of AutoAWQ's GEMM packing: nibble k of an int32 holds output `8c + AWQ_ORDER[k]`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// The inverse of [`AWQ_ORDER`]: output `8c + r` sits in nibble `NIBBLE_OF_OUTPUT[r]`.
const NIBBLE_OF_OUTPUT: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// The 4-bit value of output `o` in a row of AWQ-packed words.
fn awq_nibble(row: &[i32], o: usize) -> u32 {
    (row[o / 8] as u32 >> (4 * NIBBLE_OF_OUTPUT[o % 8])) & 0xF
}

/// One row of AWQ-packed words from the 4-bit `values` of outputs `0..out_features`.
fn awq_pack_row(values: impl Fn(usize) -> u32, out_features: usize) -> Vec<i32> {
    (0..out_features / 8)
        .map(|c| AWQ_ORDER.iter().enumerate().fold(0u32, |acc, (k, &o)| acc | (values(8 * c + o) & 0xF) << (4 * k)) as i32)
        .collect()
}

/// One 4-bit linear in AutoAWQ's GEMM layout, as a checkpoint stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedLinear {
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
    /// `[in, out / 8]`
    pub qweight: Vec<i32>,
    /// `[in / g, out / 8]`
    pub qzeros: Vec<i32>,
    /// `[in / g, out]`
    pub scales: Vec<f16>,
}

impl PackedLinear {
    /// Packs `code(o, i)` (0..16), `zero(o, group)` (0..16) and `scale(o, group)`.
    /// `out_features` must be a multiple of 8 and `group_size` must divide `in_features`.
    pub fn from_fn(
        out_features: usize,
        in_features: usize,
        group_size: usize,
        code: impl Fn(usize, usize) -> u32 + Sync,
        zero: impl Fn(usize, usize) -> u32 + Sync,
        scale: impl Fn(usize, usize) -> f16 + Sync,
    ) -> PackedLinear {
        assert!(out_features.is_multiple_of(8) && group_size > 0 && in_features.is_multiple_of(group_size), "checked by callers");
        let groups = in_features / group_size;
        let qweight = (0..in_features).into_par_iter().flat_map_iter(|i| awq_pack_row(|o| code(o, i), out_features)).collect();
        let qzeros = (0..groups).flat_map(|j| awq_pack_row(|o| zero(o, j), out_features)).collect();
        let scales = (0..groups).flat_map(|j| (0..out_features).map(move |o| (j, o))).map(|(j, o)| scale(o, j)).collect();
        PackedLinear { in_features, out_features, group_size, qweight, qzeros, scales }
    }

    /// Packs quantized groups (`quantize_groups`' output for `spec`, 4 bits). Symmetric codes are
    /// signed; they are shifted into `0..16`, with the shift (8) as every group's zero point, which
    /// is how AutoAWQ stores them.
    pub fn from_groups(q: &QuantizedGroups, spec: QuantSpec) -> PackedLinear {
        let (out_f, in_f, g) = (q.out_features, q.in_features, spec.group_size.get());
        let n_groups = in_f / g;
        let shift = awq_code_shift(spec) as i32;
        PackedLinear::from_fn(
            out_f,
            in_f,
            g,
            |o, i| (q.codes[o * in_f + i] as i32 + shift) as u32,
            |o, j| (q.zeros[o * n_groups + j] as i32 + shift) as u32,
            |o, j| f16::from_f32(q.scales[o * n_groups + j]),
        )
    }

    /// Random codes and zero points with scales drawn uniformly from `[scale_min, scale_max]`: the
    /// test and benchmark weight (a trained layer's scales sit around 1e-3..1e-2).
    pub fn random(
        rng: &mut SplitMix64,
        out_features: usize,
        in_features: usize,
        group_size: usize,
        (scale_min, scale_max): (f32, f32),
    ) -> PackedLinear {
        let groups = in_features / group_size;
        let words = |rng: &mut SplitMix64, n: usize| (0..n).map(|_| rng.next_u64() as i32).collect::<Vec<_>>();
        let qweight = words(rng, in_features * out_features / 8);
        let qzeros = words(rng, groups * out_features / 8);
        let scales = (0..groups * out_features).map(|_| f16::from_f32(rng.uniform(scale_min, scale_max))).collect();
        PackedLinear { in_features, out_features, group_size, qweight, qzeros, scales }
    }

    /// Code of output `o`, input `i`.
    pub fn code(&self, o: usize, i: usize) -> u32 {
        let w = self.out_features / 8;
        awq_nibble(&self.qweight[i * w..(i + 1) * w], o)
    }

    /// Zero point of output `o` in group `j`.
    pub fn zero(&self, o: usize, j: usize) -> u32 {
        let w = self.out_features / 8;
        awq_nibble(&self.qzeros[j * w..(j + 1) * w], o)
    }

    /// The dequantized weight `[out, in]` in f16, as AWQ's GEMM loaders compute it.
    pub fn dequantize(&self) -> Tensor {
        let (out_f, in_f, g) = (self.out_features, self.in_features, self.group_size);
        let mut w = vec![0.0f32; out_f * in_f];
        w.par_chunks_mut(in_f).enumerate().for_each(|(o, row)| {
            for (i, v) in row.iter_mut().enumerate() {
                let j = i / g;
                *v = (self.code(o, i) as f32 - self.zero(o, j) as f32) * self.scales[j * out_f + o].to_f32();
            }
        });
        Tensor::from_f32_as(&[out_f, in_f], w, DType::F16).expect("shape matches data")
    }
}

/// How [`w4a16_linear_with`] computes on CUDA. On the CPU every path is the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum W4A16Path {
    /// By the batch and the weight's size (the crossovers measured on an H100, BENCHMARKS.md):
    /// [`W4A16Path::Decode`] up to [`DECODE_MAX_ROWS`] activation rows when the weight is large
    /// enough ([`decode_pays`]), [`W4A16Path::Fused`] where it pays ([`fused_pays`]),
    /// [`W4A16Path::Stream`] otherwise up to [`STREAM_MAX_ROWS`], [`W4A16Path::DequantizeGemm`]
    /// above.
    Auto,
    /// Up to [`DECODE_MAX_ROWS`] rows (more fall back to [`W4A16Path::Stream`]): persistent blocks,
    /// one per multiprocessor, each streaming an equal share of the packed weight through a ring of
    /// TMA bulk copies into shared memory (sm_90 and later; older GPUs take `Stream`), multiplied
    /// on the tensor cores: bound by memory bandwidth on large weights, by its fixed cost per call
    /// (~8 us, see [`decode_pays`]) on small ones.
    Decode,
    /// The packed weight streamed once per 64 activation rows by blocks of 128 output rows and a
    /// range of K (split-K, so that even small layers fill the GPU), multiplied on the tensor cores
    /// (mma.sync m16n8k16): little fixed cost, so the faster one for small weights.
    Stream,
    /// Dequantize to a 16-bit `[out, in]` workspace, then cuBLAS: bound by the tensor cores at
    /// prefill sizes, at the cost of writing and reading the workspace once.
    DequantizeGemm,
    /// The prefill kernel (sm_90a; other GPUs take [`W4A16Path::Stream`] up to
    /// [`STREAM_MAX_ROWS`] rows, [`W4A16Path::DequantizeGemm`] above): warpgroup
    /// tensor-core MMAs (wgmma) with the weight dequantized in registers, so it crosses memory
    /// once, as 4 bits, and no dense copy is written.
    Fused,
}

/// The most activation rows the decode kernel takes (two 8-row MMA tiles).
pub const DECODE_MAX_ROWS: usize = 16;

/// The most activation rows [`W4A16Path::Auto`] sends to a streaming kernel (the crossover
/// measured on an H100, BENCHMARKS.md).
pub const STREAM_MAX_ROWS: usize = 64;

/// Whether the decode kernel beats the streaming one for `rows` activation rows and an `out x in`
/// weight: its fixed cost per call (on an H100 ~8 us beyond the bandwidth's share, where an empty
/// kernel costs ~2 us, with consecutive calls overlapping) pays off from 24 Mi weights (12 MiB
/// packed) at up to 4 rows, 48 Mi at up to 8 and 64 Mi at up to 16: the crossovers measured on an
/// H100 (BENCHMARKS.md). For Llama-3-8B at one token: every projection but the 4096 x 4096 ones.
pub fn decode_pays(rows: usize, out_features: usize, in_features: usize) -> bool {
    let weights = out_features * in_features;
    match rows {
        0..=4 => weights >= 24 << 20,
        5..=8 => weights >= 48 << 20,
        9..=DECODE_MAX_ROWS => weights >= 64 << 20,
        _ => false,
    }
}

/// The most activation rows [`W4A16Path::Auto`] sends to the prefill kernel.
pub const FUSED_MAX_ROWS: usize = 256;

/// Whether the prefill kernel beats the others for `rows` activation rows and an `out x in` weight,
/// by the crossovers measured on an H100 (BENCHMARKS.md). Against the streaming kernel: from 33
/// rows always, at 17 to 32 where the weight is wider than it is long (otherwise the split-K
/// stream kernel, reading less per output, is as fast or faster). Against dequantize + cuBLAS,
/// whose workspace costs 2.5 bytes per weight whatever the batch: up to [`FUSED_MAX_ROWS`] rows
/// from 32 Mi weights (Llama-3-8B's MLP and 70B's layers); above that cuBLAS's mainloop wins.
pub fn fused_pays(rows: usize, out_features: usize, in_features: usize) -> bool {
    match rows {
        0..=DECODE_MAX_ROWS => false,
        17..=32 => in_features < out_features,
        33..=STREAM_MAX_ROWS => true,
        65..=FUSED_MAX_ROWS => out_features * in_features >= 32 << 20,
        _ => false,
    }
}

impl W4A16Path {
    /// The path `self` means for `rows` activation rows and an `out x in` weight.
    pub fn resolve(self, rows: usize, out_features: usize, in_features: usize) -> W4A16Path {
        match self {
            W4A16Path::Auto if decode_pays(rows, out_features, in_features) => W4A16Path::Decode,
            W4A16Path::Auto if fused_pays(rows, out_features, in_features) => W4A16Path::Fused,
            W4A16Path::Auto if rows <= STREAM_MAX_ROWS => W4A16Path::Stream,
            W4A16Path::Auto => W4A16Path::DequantizeGemm,
            W4A16Path::Decode if rows > DECODE_MAX_ROWS => W4A16Path::Stream,
            other => other,
        }
    }
}

/// Values added to a zero point so that a nibble OR-ed into the mantissa of this constant reads as
/// `MAGIC + nibble` (w4a16.cu): 1024 in f16, 128 in bf16.
fn magic(dtype: DType) -> f32 {
    if dtype == DType::BF16 {
        128.0
    } else {
        1024.0
    }
}

fn bits16(value: f32, dtype: DType) -> u16 {
    match dtype {
        DType::BF16 => bf16::from_f32(value).to_bits(),
        _ => f16::from_f32(value).to_bits(),
    }
}

fn from_bits16(bits: u16, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_bits(bits).to_f32(),
        _ => f16::from_bits(bits).to_f32(),
    }
}

/// Output rows per tile, input columns per chunk: a piece (tile x chunk) is one warp's 512 bytes.
const TILE_ROWS: usize = 16;
const TILE_COLS: usize = 64;

/// Pieces in the layout: 8 x 8 per group (8 tiles, 8 chunks), groups of tiles fastest.
fn padded_pieces(tiles: usize, chunks: usize) -> usize {
    tiles.div_ceil(8) * chunks.div_ceil(8) * 64
}

/// Where piece (tile, chunk) sits in the layout, in pieces: `[chunk / 8][tile / 8][tile % 8][chunk % 8]`,
/// so one streaming block's 8 x 8 pieces are contiguous and blocks read the weight front to back
/// (w4a16.cu, piece_index).
fn piece_index(tile: usize, chunk: usize, tiles: usize) -> usize {
    (((chunk / 8) * tiles.div_ceil(8) + tile / 8) * 8 + tile % 8) * 8 + chunk % 8
}

/// Where tile-local position `(lane, word j, nibble p)` sits in the 16 x 64 tile: `(row, column)`.
/// The MMA's A-operand layout (PTX ISA, "mma.m16n8k16", 16-bit A): lane `gid * 4 + tig` holds rows
/// `gid` and `gid + 8` and, of each 16-column step, the MMA's k indices `2 tig, 2 tig + 1` and
/// `2 tig + 8, 2 tig + 9`, as four registers; register `r` comes from nibbles `r` (low half) and
/// `r + 4` (high half). The k indices are a permutation of the step's columns, the same for the
/// weight and the activations: they are columns `4 tig .. 4 tig + 3`, so that a lane reads its
/// activations for one step with one 8-byte load (w4a16.cu).
fn tile_position(lane: usize, j: usize, p: usize) -> (usize, usize) {
    let (gid, tig) = (lane / 4, lane % 4);
    let (reg, high) = (p & 3, p >> 2);
    (gid + 8 * (reg & 1), j * 16 + 4 * tig + 2 * (reg >> 1) + high)
}

/// How the streaming kernel splits K: `(ranges, slices per range)` for `slices` K slices and
/// `blocks` blocks per K range, `slots` blocks resident on the whole GPU at once. Picks the split
/// whose blocks fill the waves best (a last wave a quarter full wastes three quarters of it), and
/// among equals the fewest ranges (each range beyond the first costs a workspace round trip).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn split_k(slices: usize, blocks: usize, slots: usize) -> (usize, usize) {
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

/// The packed words and the group parameters, on the host.
type HostInt4 = (Arc<Vec<u32>>, Arc<Vec<u16>>);

enum Int4Storage {
    Cpu { words: Arc<Vec<u32>>, params: Arc<Vec<u16>> },
    #[cfg(feature = "cuda")]
    Cuda(cuda::DeviceInt4),
}

/// A 4-bit weight in the kernels' layout (see the module docs), on one device. Clones share the
/// buffers; the weight is immutable.
pub struct Int4Weight {
    in_features: usize,
    out_features: usize,
    group_size: usize,
    dtype: DType,
    storage: Int4Storage,
}

impl Clone for Int4Weight {
    fn clone(&self) -> Self {
        let storage = match &self.storage {
            Int4Storage::Cpu { words, params } => Int4Storage::Cpu { words: words.clone(), params: params.clone() },
            #[cfg(feature = "cuda")]
            Int4Storage::Cuda(d) => Int4Storage::Cuda(d.clone()),
        };
        Int4Weight { storage, ..*self }
    }
}

impl std::fmt::Debug for Int4Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Int4Weight([{}, {}], g{}, {}, {})",
            self.out_features,
            self.in_features,
            self.group_size,
            self.dtype,
            self.device()
        )
    }
}

impl Int4Weight {
    /// Repacks `packed` for activations of `dtype` (f16 or bf16; bf16 rounds the f16 scales to
    /// bf16), on the CPU. Refuses shapes the kernels do not take, saying which rule failed.
    pub fn from_awq(packed: &PackedLinear, dtype: DType) -> Result<Int4Weight> {
        let (n, k, g) = (packed.out_features, packed.in_features, packed.group_size);
        let shape_error = |detail: String| Error::Shape { op: "w4a16", detail };
        if !matches!(dtype, DType::F16 | DType::BF16) {
            return Err(Error::DType { op: "w4a16 (activations must be f16 or bf16)", dtype });
        }
        if n == 0 || n % TILE_ROWS != 0 {
            return Err(shape_error(format!("out_features {n} must be a positive multiple of {TILE_ROWS}")));
        }
        if k == 0 || k % TILE_COLS != 0 {
            return Err(shape_error(format!("in_features {k} must be a positive multiple of {TILE_COLS}")));
        }
        if g == 0 || g % 16 != 0 || k % g != 0 {
            return Err(shape_error(format!("group size {g} must be a multiple of 16 that divides in_features {k}")));
        }
        let groups = k / g;
        let lens = [(packed.qweight.len(), k * n / 8, "qweight"), (packed.qzeros.len(), groups * n / 8, "qzeros")];
        for (got, want, name) in lens.into_iter().chain([(packed.scales.len(), groups * n, "scales")]) {
            if got != want {
                return Err(shape_error(format!("{name} has {got} elements, [{n}, {k}] with group size {g} needs {want}")));
            }
        }
        let (tiles, chunks) = (n / TILE_ROWS, k / TILE_COLS);
        // Tile by tile (in parallel), each piece written where the layout puts it.
        let per_tile: Vec<Vec<u32>> = (0..tiles)
            .into_par_iter()
            .map(|tile| {
                let mut out = vec![0u32; chunks * 128];
                for chunk in 0..chunks {
                    for lane in 0..32 {
                        for j in 0..4 {
                            let mut word = 0u32;
                            for p in 0..8 {
                                let (row, col) = tile_position(lane, j, p);
                                word |= packed.code(tile * TILE_ROWS + row, chunk * TILE_COLS + col) << (4 * p);
                            }
                            out[(chunk * 32 + lane) * 4 + j] = word;
                        }
                    }
                }
                out
            })
            .collect();
        let mut words = vec![0u32; padded_pieces(tiles, chunks) * 128];
        for (tile, pieces) in per_tile.iter().enumerate() {
            for (chunk, piece) in pieces.chunks_exact(128).enumerate() {
                let at = piece_index(tile, chunk, tiles) * 128;
                words[at..at + 128].copy_from_slice(piece);
            }
        }
        // Per (tile, group, r < 8): MAGIC + zero of rows r and r + 8, then their scales.
        let mut params = vec![0u16; tiles * groups * 32];
        let m = magic(dtype);
        for (idx, quad) in params.chunks_exact_mut(4).enumerate() {
            let (tile, group, r) = (idx / (groups * 8), idx / 8 % groups, idx % 8);
            let (lo, hi) = (tile * TILE_ROWS + r, tile * TILE_ROWS + r + 8);
            quad[0] = bits16(m + packed.zero(lo, group) as f32, dtype);
            quad[1] = bits16(m + packed.zero(hi, group) as f32, dtype);
            quad[2] = bits16(packed.scales[group * n + lo].to_f32(), dtype);
            quad[3] = bits16(packed.scales[group * n + hi].to_f32(), dtype);
        }
        Ok(Int4Weight {
            in_features: k,
            out_features: n,
            group_size: g,
            dtype,
            storage: Int4Storage::Cpu { words: Arc::new(words), params: Arc::new(params) },
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn group_size(&self) -> usize {
        self.group_size
    }

    /// The activation dtype the weight was packed for.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Int4Storage::Cpu { .. } => Device::Cpu,
            #[cfg(feature = "cuda")]
            Int4Storage::Cuda(d) => d.device(),
        }
    }

    /// Bytes the kernels read for the weight: packed codes plus zero points and scales.
    pub fn size_bytes(&self) -> usize {
        self.out_features * self.in_features / 2 + self.out_features * (self.in_features / self.group_size) * 4
    }

    /// A copy on `device` (a clone when it is already there).
    pub fn to_device(&self, device: Device) -> Result<Int4Weight> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let (words, params) = self.host_buffers()?;
        let storage = match device {
            Device::Cpu => Int4Storage::Cpu { words, params },
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => Int4Storage::Cuda(cuda::DeviceInt4::upload(ordinal, &words, &params)?),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => return Err(super::built_without_cuda(ordinal)),
        };
        Ok(Int4Weight { storage, ..*self })
    }

    fn host_buffers(&self) -> Result<HostInt4> {
        match &self.storage {
            Int4Storage::Cpu { words, params } => Ok((words.clone(), params.clone())),
            #[cfg(feature = "cuda")]
            Int4Storage::Cuda(d) => {
                let (w, p) = d.download()?;
                Ok((Arc::new(w), Arc::new(p)))
            }
        }
    }

    /// `(q - z) * s` for every weight, `[out, in]` row-major, in f32 (exact), read back from the
    /// kernels' layout: the CPU reference of everything the kernels compute.
    fn dequantize_f32(&self) -> Result<Vec<f32>> {
        let (words, params) = self.host_buffers()?;
        let (n, k, g) = (self.out_features, self.in_features, self.group_size);
        let (chunks, groups, m) = (k / TILE_COLS, k / g, magic(self.dtype));
        let mut w = vec![0.0f32; n * k];
        w.par_chunks_mut(TILE_ROWS * k).enumerate().for_each(|(tile, rows)| {
            for chunk in 0..chunks {
                for lane in 0..32 {
                    for j in 0..4 {
                        let word = words[(piece_index(tile, chunk, n / TILE_ROWS) * 32 + lane) * 4 + j];
                        for p in 0..8 {
                            let (row, col) = tile_position(lane, j, p);
                            let col = chunk * TILE_COLS + col;
                            let quad = ((tile * groups + col / g) * 8 + row % 8) * 4;
                            let (zero, scale) = (params[quad + row / 8], params[quad + 2 + row / 8]);
                            let q = ((word >> (4 * p)) & 0xF) as f32;
                            rows[row * k + col] = (q - (from_bits16(zero, self.dtype) - m)) * from_bits16(scale, self.dtype);
                        }
                    }
                }
            }
        });
        Ok(w)
    }

    /// The dense weight `[out, in]` in the weight's dtype, on its device (each value `(q - z) * s`
    /// rounded once, as AWQ's own dequantization does).
    pub fn dequantize(&self) -> Result<Tensor> {
        match &self.storage {
            Int4Storage::Cpu { .. } => {
                Tensor::from_f32_as(&[self.out_features, self.in_features], self.dequantize_f32()?, self.dtype)
            }
            #[cfg(feature = "cuda")]
            Int4Storage::Cuda(d) => cuda::dequantize(self, d),
        }
    }
}

/// `y[M, out] = x[M, in] · W^T (+ bias[out])` for a 4-bit `W`, output in `x`'s dtype, which must
/// be the dtype the weight was packed for. See [`W4A16Path`] for how CUDA computes it.
pub fn w4a16_linear(x: &Tensor, w: &Int4Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    w4a16_linear_with(x, w, bias, W4A16Path::Auto)
}

/// [`w4a16_linear`] on a chosen path (benchmarks and tests; [`W4A16Path::Auto`] is the one to use).
pub fn w4a16_linear_with(x: &Tensor, w: &Int4Weight, bias: Option<&Tensor>, path: W4A16Path) -> Result<Tensor> {
    let (m, k) = x.dims2("w4a16")?;
    let n = w.out_features;
    if k != w.in_features {
        return Err(Error::Shape { op: "w4a16", detail: format!("input has {k} features, weight [{n}, {}] expects {}", w.in_features, w.in_features) });
    }
    if x.dtype() != w.dtype {
        return Err(Error::Shape {
            op: "w4a16",
            detail: format!("activations are {} but the weight was packed for {}", x.dtype(), w.dtype),
        });
    }
    if let Some(b) = bias {
        if b.shape() != [n] {
            return Err(Error::Shape { op: "w4a16", detail: format!("bias has shape {:?}, weight has {n} outputs", b.shape()) });
        }
    }
    match (&w.storage, operands_and("w4a16", [x], bias)?) {
        (Int4Storage::Cpu { .. }, Operands::Cpu) => {
            let _ = path; // every path is the reference on the CPU
            let wv = w.dequantize_f32()?;
            let mut out = match bias {
                Some(b) => b.f32_values().repeat(m),
                None => vec![0.0f32; m * n],
            };
            let xv = x.f32_values();
            let lhs = StridedMatrix { data: &xv, row_stride: k as isize, col_stride: 1 };
            let rhs = StridedMatrix { data: &wv, row_stride: 1, col_stride: k as isize };
            matmul_f32(m, n, k, lhs, rhs, &mut out, n, bias.is_some(), true);
            Tensor::from_f32_as(&[m, n], out, x.dtype())
        }
        #[cfg(feature = "cuda")]
        (Int4Storage::Cuda(d), Operands::Cuda([sx], sb)) if d.device() == x.device() => match path.resolve(m, n, k) {
            W4A16Path::Fused if d.has_wgmma() => cuda::fused(sx, sb, w, d, m, k),
            W4A16Path::Fused if m <= STREAM_MAX_ROWS => cuda::stream(sx, sb, w, d, m, k),
            W4A16Path::Fused | W4A16Path::DequantizeGemm => super::linear(x, &cuda::dequantize(w, d)?, bias),
            W4A16Path::Decode if d.has_bulk_copies() => cuda::decode(sx, sb, w, d, m, k),
            _ => cuda::stream(sx, sb, w, d, m, k),
        },
        // The weight on another device than the activations (and the bias, checked above).
        #[cfg(feature = "cuda")]
        _ => Err(Error::DeviceMismatch { op: "w4a16", first: x.device(), other: w.device() }),
    }
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/w4a16.cu",
    code: include_str!("w4a16.cu"),
    kernels: &[
        "w4a16_stream_f16_t1",
        "w4a16_stream_f16_t2",
        "w4a16_stream_f16_t4",
        "w4a16_stream_f16_t8",
        "w4a16_stream_bf16_t1",
        "w4a16_stream_bf16_t2",
        "w4a16_stream_bf16_t4",
        "w4a16_stream_bf16_t8",
        "w4a16_gemv_f16_t1",
        "w4a16_gemv_f16_t2",
        "w4a16_gemv_bf16_t1",
        "w4a16_gemv_bf16_t2",
        "w4a16_dequantize_f16",
        "w4a16_dequantize_bf16",
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

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

    use super::{Int4Weight, CUDA_SOURCE, TILE_COLS, TILE_ROWS};
    use crate::cuda::{kernel_dim, CudaBuf, CudaDevice, CudaStorage};
    use crate::{Device, Error, Result, Tensor};

    /// Threads per block of both kernels (8 warps; w4a16.cu's STREAM_WARPS and DEQUANT_WARPS).
    const BLOCK: u32 = 256;
    const STREAM_WARPS: usize = 8;
    /// Streaming blocks resident per multiprocessor (registers: ~120 per thread, 256 threads).
    const BLOCKS_PER_SM: usize = 2;

    /// The packed words and group parameters on a device.
    #[derive(Clone)]
    pub(super) struct DeviceInt4 {
        dev: Arc<CudaDevice>,
        words: Arc<CudaSlice<u32>>,
        params: Arc<CudaSlice<u16>>,
    }

    impl DeviceInt4 {
        pub(super) fn upload(ordinal: usize, words: &[u32], params: &[u16]) -> Result<DeviceInt4> {
            let dev = CudaDevice::get(ordinal)?;
            let (w, p) = (dev.upload(words)?, dev.upload(params)?);
            Ok(DeviceInt4 { dev, words: Arc::new(w), params: Arc::new(p) })
        }

        pub(super) fn download(&self) -> Result<(Vec<u32>, Vec<u16>)> {
            Ok((self.dev.download(&self.words)?, self.dev.download(&self.params)?))
        }

        pub(super) fn device(&self) -> Device {
            self.dev.device()
        }

        /// Whether the GPU has the TMA bulk copies the decode kernel is built on (sm_90 and later).
        pub(super) fn has_bulk_copies(&self) -> bool {
            self.dev.compute_major() >= 9
        }

        /// Whether the GPU has the warpgroup MMAs the prefill kernel is built on (sm_90a: wgmma is
        /// Hopper's alone; Blackwell has other instructions).
        pub(super) fn has_wgmma(&self) -> bool {
            self.dev.arch() == "sm_90a"
        }
    }

    /// The buffers where a split-K kernel's blocks meet: f32 partial sums and arrival counters.
    struct SplitK<'a> {
        partial: &'a CudaSlice<f32>,
        arrivals: &'a CudaSlice<u32>,
    }

    /// Launches `name`, one of the kernels whose parameters are (words, params, x, bias, y,
    /// partial, arrivals, m, n, k, group_size, ...`extra`, has_bias): the streaming and decode
    /// kernels of w4a16.cu, for activations `sx` (`[m, k]`) and an optional bias `sb`. Through
    /// [`CudaDevice::launch_with`], overlapping (the kernels wait for the kernel before them where
    /// they must, see w4a16.cu), unless `AWQ_W4A16_SERIAL_LAUNCH=1` (a benchmark knob:
    /// BENCHMARKS.md times both); cudarc's builder cannot set that launch attribute, so the
    /// arguments are written out as parameter values.
    #[allow(clippy::too_many_arguments)]
    fn launch_split_k(
        d: &DeviceInt4,
        w: &Int4Weight,
        name: &str,
        cfg: LaunchConfig,
        (sx, sb): (&CudaStorage, Option<&CudaStorage>),
        (m, k): (usize, usize),
        y: &mut CudaBuf,
        split_k: SplitK<'_>,
        extra: &[i32],
    ) -> Result<()> {
        use cudarc::driver::DevicePtr;
        use std::ffi::c_void;
        let stream = d.dev.stream();
        let (words, _words) = d.words.device_ptr(stream);
        let (params, _params) = d.params.device_ptr(stream);
        let (x_ptr, _x) = sx.buf().device_ptr(stream);
        // Without a bias the kernels never read this pointer; x is any valid one.
        let (bias_ptr, _bias) = sb.unwrap_or(sx).buf().device_ptr(stream);
        let (y_ptr, _y) = y.device_ptr(stream);
        let (partial, _partial) = split_k.partial.device_ptr(stream);
        let (arrivals, _arrivals) = split_k.arrivals.device_ptr(stream);
        let pointers = [words, params, x_ptr, bias_ptr, y_ptr, partial, arrivals];
        let mut ints = vec![kernel_dim("w4a16", m)? as i32, w.out_features as i32, k as i32, w.group_size as i32];
        ints.extend_from_slice(extra);
        ints.push(sb.is_some() as i32);
        let mut values: Vec<*mut c_void> = pointers.iter().map(|p| p as *const _ as *mut c_void).collect();
        values.extend(ints.iter().map(|v| v as *const i32 as *mut c_void));
        // SAFETY: the values follow the kernels' parameter list (above); the buffers are sized by
        // the callers and live, with their guards, until the launch is queued, which copies the
        // values.
        unsafe { d.dev.launch_with(&CUDA_SOURCE, name, cfg, !serial_launches(), &mut values) }
    }

    /// `AWQ_W4A16_SERIAL_LAUNCH=1`: no overlap between a split-K kernel and the kernel before it.
    fn serial_launches() -> bool {
        static SERIAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SERIAL.get_or_init(|| std::env::var("AWQ_W4A16_SERIAL_LAUNCH").is_ok_and(|v| v == "1"))
    }

    /// Threads per decode block: 16 consumer warps and one producer (w4a16.cu, GEMV_THREADS).
    const DECODE_BLOCK: u32 = 17 * 32;
    /// Bytes of one decode stage besides the group parameters: 32 KB of words and 8 * tiles
    /// activation rows of 528 halves (w4a16.cu, GemvStage).
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

    /// The decode kernel (w4a16.cu, w4a16_gemv): one persistent block per multiprocessor, each
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
            return stream(sx, sb, w, d, m, k);
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
            launch_split_k(d, w, &name, cfg, (sx, sb), (m, k), &mut y, split_k, &[stages as i32, pg as i32])?;
        }
        Ok(Tensor::from_cuda(&[m, n], CudaStorage::new(d.dev.clone(), y)))
    }

    /// The streaming kernel (w4a16.cu): one block per (8 * tiles activation rows, 128 output rows,
    /// range of K slices); with several ranges, an f32 workspace for their partial sums.
    pub(super) fn stream(
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
            // covers shrinks as they grow (w4a16.cu, StreamSlice).
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
            launch_split_k(d, w, &name, cfg, (sx, sb), (m, k), &mut y, split_k, &[slices_per_block as i32])?;
        }
        Ok(Tensor::from_cuda(&[m, n], CudaStorage::new(d.dev.clone(), y)))
    }

    /// Threads per prefill block: two warpgroups (w4a16.cu, FUSED_THREADS).
    const FUSED_BLOCK: u32 = 8 * 32;
    /// The most stages in the prefill kernel's ring (w4a16.cu, FUSED_MAX_STAGES), and the dynamic
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

    /// The prefill kernel (w4a16.cu, w4a16_fused): `x` is first rewritten into the swizzled,
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

    /// The dense `[out, in]` weight, one warp per 16 x 64 tile.
    pub(super) fn dequantize(w: &Int4Weight, d: &DeviceInt4) -> Result<Tensor> {
        let (n, k) = (w.out_features, w.in_features);
        let mut out = d.dev.alloc_buf(w.dtype, n * k)?;
        let pieces = super::padded_pieces(n / TILE_ROWS, k / TILE_COLS);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::rel;

    fn reference(x: &[f32], w: &PackedLinear, bias: Option<&[f32]>, m: usize) -> Vec<f64> {
        let (n, k, g) = (w.out_features, w.in_features, w.group_size);
        let mut out = vec![0.0f64; m * n];
        for o in 0..n {
            // Independent of the repacking: straight from the AWQ layout's definition.
            let row: Vec<f64> = (0..k)
                .map(|i| (w.code(o, i) as f64 - w.zero(o, i / g) as f64) * w.scales[(i / g) * n + o].to_f64())
                .collect();
            for r in 0..m {
                let dot: f64 = row.iter().zip(&x[r * k..(r + 1) * k]).map(|(a, b)| a * *b as f64).sum();
                out[r * n + o] = dot + bias.map_or(0.0, |b| b[o] as f64);
            }
        }
        out
    }

    #[test]
    fn auto_picks_the_kernel_by_batch_and_weight_size() {
        let auto = |m, n, k| W4A16Path::Auto.resolve(m, n, k);
        // Llama-3-8B at one token: the MLP's projections and q/k/v decode, o (4096 x 4096) streams.
        assert_eq!(auto(1, 28672, 4096), W4A16Path::Decode);
        assert_eq!(auto(8, 4096, 14336), W4A16Path::Decode);
        assert_eq!(auto(1, 6144, 4096), W4A16Path::Decode);
        assert_eq!(auto(8, 6144, 4096), W4A16Path::Stream);
        assert_eq!(auto(1, 4096, 4096), W4A16Path::Stream);
        // 9..16 rows need a larger weight; 17 and up never decode.
        assert_eq!(auto(16, 4096, 14336), W4A16Path::Stream);
        assert_eq!(auto(16, 8192, 8192), W4A16Path::Decode);
        // 17..64: the prefill kernel, but for 17..32 rows of a weight no wider than it is long.
        assert_eq!(auto(17, 8192, 28672), W4A16Path::Stream);
        assert_eq!(auto(32, 8192, 8192), W4A16Path::Stream);
        assert_eq!(auto(17, 57344, 8192), W4A16Path::Fused);
        assert_eq!(auto(32, 6144, 4096), W4A16Path::Fused);
        assert_eq!(auto(64, 4096, 14336), W4A16Path::Fused);
        // 65..256: the prefill kernel on weights large enough, dequantize + cuBLAS on small ones.
        assert_eq!(auto(65, 57344, 8192), W4A16Path::Fused);
        assert_eq!(auto(256, 4096, 14336), W4A16Path::Fused);
        assert_eq!(auto(128, 6144, 4096), W4A16Path::DequantizeGemm);
        // Above: cuBLAS's mainloop wins.
        assert_eq!(auto(1024, 57344, 8192), W4A16Path::DequantizeGemm);
        // An explicit Decode with too many rows streams; the other choices are kept.
        assert_eq!(W4A16Path::Decode.resolve(17, 8192, 8192), W4A16Path::Stream);
        assert_eq!(W4A16Path::Stream.resolve(1, 57344, 8192), W4A16Path::Stream);
    }

    #[test]
    fn nibble_order_is_autoawq_s() {
        // Outputs 0..8 with codes 1..=8: nibble k holds output ORDER[k], so the int32 reads
        // 0x8642_7531 from the top nibble down (outputs 7,5,3,1,6,4,2,0 -> codes 8,6,4,2,7,5,3,1).
        let row = awq_pack_row(|o| o as u32 + 1, 8);
        assert_eq!(row, vec![0x8642_7531u32 as i32]);
        for o in 0..8 {
            assert_eq!(awq_nibble(&row, o), o as u32 + 1);
        }
    }

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

    #[test]
    fn tile_positions_cover_the_tile_once() {
        let mut seen = vec![false; TILE_ROWS * TILE_COLS];
        for chunk_step in 0..4 {
            for lane in 0..32 {
                for p in 0..8 {
                    let (r, c) = tile_position(lane, chunk_step, p);
                    assert!(!std::mem::replace(&mut seen[r * TILE_COLS + c], true), "({r}, {c}) twice");
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn repacked_weight_dequantizes_to_the_awq_values() {
        let mut rng = SplitMix64::new(5);
        for (n, k, g) in [(16, 64, 64), (48, 192, 32), (32, 128, 128), (16, 256, 16)] {
            let packed = PackedLinear::random(&mut rng, n, k, g, (1e-3, 1e-2));
            let want = packed.dequantize();
            let w = Int4Weight::from_awq(&packed, DType::F16).unwrap();
            // Both round (q - z) * s once to f16.
            assert_eq!(w.dequantize().unwrap(), want, "[{n}, {k}] g{g}");
            let bf = Int4Weight::from_awq(&packed, DType::BF16).unwrap().dequantize().unwrap();
            let e = crate::ops::relative_error(&bf.into_dtype(DType::F32), &want.into_dtype(DType::F32)).unwrap();
            assert!(e < 8e-3, "bf16 [{n}, {k}] g{g}: {e}");
        }
    }

    #[test]
    fn cpu_path_matches_f64_reference() {
        let mut rng = SplitMix64::new(11);
        for (m, n, k, g) in [(1, 16, 64, 64), (3, 32, 128, 32), (17, 48, 256, 128)] {
            let packed = PackedLinear::random(&mut rng, n, k, g, (1e-3, 1e-2));
            for dtype in [DType::F16, DType::BF16] {
                let w = Int4Weight::from_awq(&packed, dtype).unwrap();
                let x = Tensor::from_f32_as(&[m, k], rng.normal_vec(m * k, 1.0), dtype).unwrap();
                let b = Tensor::from_f32_as(&[n], rng.normal_vec(n, 0.1), dtype).unwrap();
                for bias in [None, Some(&b)] {
                    let y = w4a16_linear(&x, &w, bias).unwrap();
                    assert_eq!((y.shape(), y.dtype()), (&[m, n][..], dtype));
                    let bv = bias.map(|b| b.to_f32_vec());
                    // The reference reads f16 scales; bf16 weights hold them rounded to bf16.
                    let tol = if dtype == DType::F16 { 1e-3 } else { 1e-2 };
                    let e = rel(&y.to_f32_vec(), &reference(&x.to_f32_vec(), &packed, bv.as_deref(), m));
                    assert!(e < tol, "{m}x{n}x{k} g{g} {dtype}: {e}");
                }
            }
        }
    }

    #[test]
    fn unsupported_shapes_and_operands_are_refused_clearly() {
        let mut rng = SplitMix64::new(3);
        let packed = PackedLinear::random(&mut rng, 24, 64, 64, (1e-3, 1e-2));
        let e = Int4Weight::from_awq(&packed, DType::F16).unwrap_err().to_string();
        assert!(e.contains("out_features 24 must be a positive multiple of 16"), "{e}");
        let packed = PackedLinear::random(&mut rng, 16, 96, 32, (1e-3, 1e-2));
        let e = Int4Weight::from_awq(&packed, DType::F16).unwrap_err().to_string();
        assert!(e.contains("in_features 96"), "{e}");
        let mut packed = PackedLinear::random(&mut rng, 16, 128, 64, (1e-3, 1e-2));
        assert!(Int4Weight::from_awq(&packed, DType::F32).is_err());
        packed.scales.pop();
        let e = Int4Weight::from_awq(&packed, DType::F16).unwrap_err().to_string();
        assert!(e.contains("scales has 31 elements"), "{e}");
        packed.scales.push(f16::ONE);
        let w = Int4Weight::from_awq(&packed, DType::F16).unwrap();
        let x = Tensor::zeros(&[2, 64], DType::F16);
        assert!(w4a16_linear(&x, &w, None).unwrap_err().to_string().contains("input has 64 features"));
        let x = Tensor::zeros(&[2, 128], DType::BF16);
        assert!(w4a16_linear(&x, &w, None).unwrap_err().to_string().contains("packed for f16"));
    }
}
