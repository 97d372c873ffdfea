//! The two layouts of a 4-bit weight: AutoAWQ's GEMM packing, as checkpoints store it
//! ([`PackedLinear`]), and the kernels' ([`Int4Weight`]), repacked once at load time: 16 output
//! rows x 64 input columns per 512-byte piece, each lane's 16 bytes already in the register order
//! of a tensor-core MMA operand (`w4a16.cuh` explains it), plus the group zero points and scales
//! interleaved per tile. On a CUDA device the weight's buffers are a `DeviceInt4`.
//!
//! The CPU reference of everything the kernels compute reads this layout back
//! (`Int4Weight::dequantize_f32`); the tests below hold the two layouts together.

use std::ops::Range;
use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::ops::quantize::{awq_code_shift, QuantSpec, QuantizedGroups};
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
    pub(crate) fn from_fn(
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

    /// The linears `parts` stacked along their outputs (q|k|v, gate|up: one matrix product instead
    /// of several): the packed words of each input row, the zeros and the scales are concatenated
    /// row by row, which AutoAWQ's layout allows because every part's outputs are a whole number
    /// of 8-output words. Errors: [`Error::Shape`] when the parts differ in inputs or group size.
    pub fn concat_outputs(parts: &[&PackedLinear]) -> Result<PackedLinear> {
        let Some(first) = parts.first() else {
            return Err(Error::Shape { op: "concat_outputs", detail: "no linears to concatenate".into() });
        };
        let (k, g) = (first.in_features, first.group_size);
        if let Some(p) = parts.iter().find(|p| p.in_features != k || p.group_size != g || p.out_features % 8 != 0) {
            return Err(Error::Shape {
                op: "concat_outputs",
                detail: format!("[{}, {}] g{} next to [{}, {k}] g{g}", p.out_features, p.in_features, p.group_size, first.out_features),
            });
        }
        let words = |p: &PackedLinear| p.out_features / 8;
        let groups = k / g;
        let mut qweight = Vec::with_capacity(parts.iter().map(|p| p.qweight.len()).sum());
        for i in 0..k {
            for p in parts {
                qweight.extend_from_slice(&p.qweight[i * words(p)..(i + 1) * words(p)]);
            }
        }
        let (mut qzeros, mut scales) = (Vec::new(), Vec::new());
        for j in 0..groups {
            for p in parts {
                qzeros.extend_from_slice(&p.qzeros[j * words(p)..(j + 1) * words(p)]);
                scales.extend_from_slice(&p.scales[j * p.out_features..(j + 1) * p.out_features]);
            }
        }
        let out_features = parts.iter().map(|p| p.out_features).sum();
        Ok(PackedLinear { in_features: k, out_features, group_size: g, qweight, qzeros, scales })
    }

    /// Outputs `range` alone: a column-parallel rank's share (tensor parallelism). Both ends must be
    /// multiples of 8 (whole packed words). Errors: [`Error::Shape`] otherwise.
    pub fn slice_outputs(&self, range: Range<usize>) -> Result<PackedLinear> {
        if !(range.start.is_multiple_of(8) && range.end.is_multiple_of(8) && range.start < range.end && range.end <= self.out_features) {
            return Err(Error::Shape {
                op: "slice_outputs",
                detail: format!("outputs {range:?} of {}: whole 8-output words of the linear", self.out_features),
            });
        }
        let (words, cut) = (self.out_features / 8, range.start / 8..range.end / 8);
        let rows = |packed: &[i32], n_rows: usize| -> Vec<i32> {
            (0..n_rows).flat_map(|r| packed[r * words + cut.start..r * words + cut.end].iter().copied()).collect()
        };
        let scales = (0..self.in_features / self.group_size)
            .flat_map(|j| self.scales[j * self.out_features + range.start..j * self.out_features + range.end].iter().copied())
            .collect();
        Ok(PackedLinear {
            in_features: self.in_features,
            out_features: range.len(),
            group_size: self.group_size,
            qweight: rows(&self.qweight, self.in_features),
            qzeros: rows(&self.qzeros, self.in_features / self.group_size),
            scales,
        })
    }

    /// Inputs `range` alone: a row-parallel rank's share (tensor parallelism). Both ends must fall
    /// on group boundaries. Errors: [`Error::Shape`] otherwise.
    pub fn slice_inputs(&self, range: Range<usize>) -> Result<PackedLinear> {
        let g = self.group_size;
        if !(range.start.is_multiple_of(g) && range.end.is_multiple_of(g) && range.start < range.end && range.end <= self.in_features) {
            return Err(Error::Shape {
                op: "slice_inputs",
                detail: format!("inputs {range:?} of {}: whole groups of {g}", self.in_features),
            });
        }
        let (words, groups) = (self.out_features / 8, range.start / g..range.end / g);
        Ok(PackedLinear {
            in_features: range.len(),
            out_features: self.out_features,
            group_size: g,
            qweight: self.qweight[range.start * words..range.end * words].to_vec(),
            qzeros: self.qzeros[groups.start * words..groups.end * words].to_vec(),
            scales: self.scales[groups.start * self.out_features..groups.end * self.out_features].to_vec(),
        })
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

/// Values added to a zero point so that a nibble OR-ed into the mantissa of this constant reads as
/// `MAGIC + nibble` (w4a16.cuh): 1024 in f16, 128 in bf16.
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
pub(super) const TILE_ROWS: usize = 16;
pub(super) const TILE_COLS: usize = 64;

/// Pieces in the layout: 8 x 8 per group (8 tiles, 8 chunks), groups of tiles fastest.
pub(super) fn padded_pieces(tiles: usize, chunks: usize) -> usize {
    tiles.div_ceil(8) * chunks.div_ceil(8) * 64
}

/// Where piece (tile, chunk) sits in the layout, in pieces: `[chunk / 8][tile / 8][tile % 8][chunk % 8]`,
/// so one streaming block's 8 x 8 pieces are contiguous and blocks read the weight front to back
/// (w4a16.cuh, piece_index).
fn piece_index(tile: usize, chunk: usize, tiles: usize) -> usize {
    (((chunk / 8) * tiles.div_ceil(8) + tile / 8) * 8 + tile % 8) * 8 + chunk % 8
}

/// Where tile-local position `(lane, word j, nibble p)` sits in the 16 x 64 tile: `(row, column)`.
/// The MMA's A-operand layout (PTX ISA, "mma.m16n8k16", 16-bit A): lane `gid * 4 + tig` holds rows
/// `gid` and `gid + 8` and, of each 16-column step, the MMA's k indices `2 tig, 2 tig + 1` and
/// `2 tig + 8, 2 tig + 9`, as four registers; register `r` comes from nibbles `r` (low half) and
/// `r + 4` (high half). The k indices are a permutation of the step's columns, the same for the
/// weight and the activations: they are columns `4 tig .. 4 tig + 3`, so that a lane reads its
/// activations for one step with one 8-byte load (w4a16.cuh).
fn tile_position(lane: usize, j: usize, p: usize) -> (usize, usize) {
    let (gid, tig) = (lane / 4, lane % 4);
    let (reg, high) = (p & 3, p >> 2);
    (gid + 8 * (reg & 1), j * 16 + 4 * tig + 2 * (reg >> 1) + high)
}

/// The packed words and the group parameters, on the host.
type HostInt4 = (Arc<Vec<u32>>, Arc<Vec<u16>>);

pub(super) enum Int4Storage {
    Cpu { words: Arc<Vec<u32>>, params: Arc<Vec<u16>> },
    #[cfg(feature = "cuda")]
    Cuda(cuda::DeviceInt4),
}

/// A 4-bit weight in the kernels' layout (see the module docs), on one device. Clones share the
/// buffers; the weight is immutable.
pub struct Int4Weight {
    pub(super) in_features: usize,
    pub(super) out_features: usize,
    pub(super) group_size: usize,
    pub(super) dtype: DType,
    pub(super) storage: Int4Storage,
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
            Device::Cuda(ordinal) => return Err(crate::ops::built_without_cuda(ordinal)),
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
    pub(super) fn dequantize_f32(&self) -> Result<Vec<f32>> {
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
            Int4Storage::Cuda(d) => super::dequantize::dequantize(self, d),
        }
    }
}

#[cfg(feature = "cuda")]
pub(super) use cuda::DeviceInt4;

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use cudarc::driver::CudaSlice;

    use crate::cuda::CudaDevice;
    use crate::{Device, Result};

    /// The packed words and group parameters on a device.
    #[derive(Clone)]
    pub(crate) struct DeviceInt4 {
        pub(crate) dev: Arc<CudaDevice>,
        pub(crate) words: Arc<CudaSlice<u32>>,
        pub(crate) params: Arc<CudaSlice<u16>>,
    }

    impl DeviceInt4 {
        pub(crate) fn upload(ordinal: usize, words: &[u32], params: &[u16]) -> Result<DeviceInt4> {
            let dev = CudaDevice::get(ordinal)?;
            let (w, p) = (dev.upload(words)?, dev.upload(params)?);
            Ok(DeviceInt4 { dev, words: Arc::new(w), params: Arc::new(p) })
        }

        pub(crate) fn download(&self) -> Result<(Vec<u32>, Vec<u16>)> {
            Ok((self.dev.download(&self.words)?, self.dev.download(&self.params)?))
        }

        pub(crate) fn device(&self) -> Device {
            self.dev.device()
        }

        /// Whether the GPU has the TMA bulk copies the decode kernel is built on (sm_90 and later).
        pub(crate) fn has_bulk_copies(&self) -> bool {
            self.dev.compute_major() >= 9
        }

        /// Whether the GPU has the warpgroup MMAs the prefill kernel is built on (sm_90a: wgmma is
        /// Hopper's alone; Blackwell has other instructions).
        pub(crate) fn has_wgmma(&self) -> bool {
            self.dev.arch() == "sm_90a"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn concatenated_outputs_dequantize_to_the_stacked_weights() {
        let mut rng = SplitMix64::new(4);
        let parts = [
            PackedLinear::random(&mut rng, 32, 128, 64, (1e-3, 8e-3)),
            PackedLinear::random(&mut rng, 16, 128, 64, (1e-3, 8e-3)),
            PackedLinear::random(&mut rng, 8, 128, 64, (1e-3, 8e-3)),
        ];
        let joined = PackedLinear::concat_outputs(&parts.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!((joined.out_features, joined.in_features), (56, 128));
        let mut want = Vec::new();
        for p in &parts {
            want.extend(p.dequantize().to_f32_vec().unwrap());
        }
        assert_eq!(joined.dequantize().to_f32_vec().unwrap(), want);
        let other = PackedLinear::random(&mut rng, 8, 64, 64, (1e-3, 8e-3));
        assert!(matches!(PackedLinear::concat_outputs(&[&parts[0], &other]), Err(Error::Shape { .. })));
    }

    #[test]
    fn sliced_outputs_and_inputs_dequantize_to_the_sliced_weights() {
        let mut rng = SplitMix64::new(5);
        let (out_f, in_f, g) = (48, 256, 64);
        let whole = PackedLinear::random(&mut rng, out_f, in_f, g, (1e-3, 8e-3));
        let w = whole.dequantize().to_f32_vec().unwrap();
        let cols = whole.slice_outputs(16..40).unwrap();
        let want: Vec<f32> = w[16 * in_f..40 * in_f].to_vec();
        assert_eq!(cols.dequantize().to_f32_vec().unwrap(), want);
        let rows = whole.slice_inputs(64..192).unwrap();
        let want: Vec<f32> = (0..out_f).flat_map(|o| w[o * in_f + 64..o * in_f + 192].to_vec()).collect();
        assert_eq!(rows.dequantize().to_f32_vec().unwrap(), want);
        // Cuts inside a packed word or a group are refused.
        for bad in [whole.slice_outputs(4..16), whole.slice_outputs(8..56), whole.slice_inputs(32..128)] {
            assert!(matches!(bad, Err(Error::Shape { .. })), "{bad:?}");
        }
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
}
