//! A Hugging Face checkpoint directory: config.json plus one or many safetensors files.
//!
//! [`Checkpoint::open`] reads config.json, picks the architecture descriptor, maps every weight file
//! (through model.safetensors.index.json when there is one) and checks, from headers alone, that
//! every tensor the architecture needs is present with the shape and dtype config.json implies.
//! After that, weights are copied out one block at a time ([`Checkpoint::load_block`]): a worker
//! that owns blocks 16..24 never reads the rest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use awq_kernels::{HostStaging, Tensor};
use serde_json::Value;

use crate::arch::{descriptor_for, ArchDescriptor, LinearRole, NormRole};
use crate::awq_format::{read_quantization_config, PackedLinear};
use awq_kernels::ops::QuantSpec;
use crate::manifest::{block_tensors, checkpoint_tensors, TensorRole};
use crate::safetensors::{RawTensor, SafetensorsFile, StDtype};
use crate::{Error, ModelConfig, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One linear layer's weights.
#[derive(Clone, Debug)]
pub struct LinearWeights {
    /// `[out, in]`
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// The weights of one decoder block, by role.
#[derive(Clone, Debug)]
pub struct BlockWeights {
    pub block_idx: usize,
    linears: Vec<LinearWeights>,
    /// By `NormRole::index()`; `None` for a norm the architecture does not have.
    norms: Vec<Option<Tensor>>,
}

impl BlockWeights {
    pub fn linear(&self, role: LinearRole) -> &LinearWeights {
        &self.linears[role.index()]
    }

    /// # Panics
    /// When the architecture has no such norm (`ArchDescriptor::has_norm`; every one has `Attn` and `Mlp`).
    pub fn norm(&self, role: NormRole) -> &Tensor {
        self.norms[role.index()].as_ref().unwrap_or_else(|| panic!("block {} has no {role:?} norm", self.block_idx))
    }

    /// The norms this block has, in role order.
    pub fn norms(&self) -> impl Iterator<Item = (NormRole, &Tensor)> {
        NormRole::ALL.into_iter().zip(&self.norms).filter_map(|(role, n)| n.as_ref().map(|n| (role, n)))
    }

    pub fn linear_mut(&mut self, role: LinearRole) -> &mut LinearWeights {
        &mut self.linears[role.index()]
    }

    /// # Panics
    /// As [`BlockWeights::norm`].
    pub fn norm_mut(&mut self, role: NormRole) -> &mut Tensor {
        let block_idx = self.block_idx;
        self.norms[role.index()].as_mut().unwrap_or_else(|| panic!("block {block_idx} has no {role:?} norm"))
    }

    /// Converts every tensor to `dtype` (the CPU forward pass keeps weights in f32 so that matmuls
    /// read them without converting per call).
    /// A copy with every tensor on `device` (the AWQ engine computes where its weights are).
    pub fn to_device(&self, device: awq_kernels::Device) -> awq_kernels::Result<BlockWeights> {
        let linears = self
            .linears
            .iter()
            .map(|l| {
                let bias = l.bias.as_ref().map(|b| b.to_device(device)).transpose()?;
                Ok(LinearWeights { weight: l.weight.to_device(device)?, bias })
            })
            .collect::<awq_kernels::Result<_>>()?;
        let norms = self
            .norms
            .iter()
            .map(|n| n.as_ref().map(|n| n.to_device(device)).transpose())
            .collect::<awq_kernels::Result<_>>()?;
        Ok(BlockWeights { block_idx: self.block_idx, linears, norms })
    }

    /// `self` with every tensor on `device`: moved where it is there already, copied otherwise
    /// (what a loader thread hands the engine).
    pub fn into_device(self, device: awq_kernels::Device) -> awq_kernels::Result<BlockWeights> {
        let moved = |t: Tensor| if t.device() == device { Ok(t) } else { t.to_device(device) };
        let linears = self
            .linears
            .into_iter()
            .map(|l| Ok(LinearWeights { weight: moved(l.weight)?, bias: l.bias.map(moved).transpose()? }))
            .collect::<awq_kernels::Result<_>>()?;
        let norms = self.norms.into_iter().map(|n| n.map(moved).transpose()).collect::<awq_kernels::Result<_>>()?;
        Ok(BlockWeights { block_idx: self.block_idx, linears, norms })
    }

    pub fn into_dtype(self, dtype: awq_kernels::DType) -> BlockWeights {
        BlockWeights {
            block_idx: self.block_idx,
            linears: self
                .linears
                .into_iter()
                .map(|l| LinearWeights { weight: l.weight.into_dtype(dtype), bias: l.bias.map(|b| b.into_dtype(dtype)) })
                .collect(),
            norms: self.norms.into_iter().map(|n| n.map(|n| n.into_dtype(dtype))).collect(),
        }
    }
}

/// An opened, checked checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    arch: &'static ArchDescriptor,
    /// Set for AWQ checkpoints: linears are stored packed (qweight, qzeros, scales).
    awq: Option<QuantSpec>,
    files: Vec<SafetensorsFile>,
    /// Tensor name -> index into `files`.
    location: BTreeMap<String, usize>,
}

/// What the checker expects of one tensor.
pub(crate) struct Expected {
    pub name: String,
    pub shape: Vec<usize>,
    dtype: ExpectedDType,
}

enum ExpectedDType {
    /// Any float type (norms, biases).
    AnyFloat,
    /// config.json's torch_dtype (linears, embeddings).
    Model,
    /// Exactly this one (packed AWQ tensors).
    Exact(StDtype),
}

impl Checkpoint {
    /// Opens and checks `dir`; see the module docs.
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let dir = dir.as_ref().to_path_buf();
        let config = ModelConfig::from_dir(&dir)?;
        let arch = descriptor_for(&config.model_type, &config.path)?;
        let awq = match config.raw.get("quantization_config") {
            None | Some(Value::Null) => None,
            Some(v) => Some(read_quantization_config(v).map_err(|(field, detail)| Error::ConfigField {
                path: config.path.clone(),
                field,
                detail,
            })?),
        };
        let (files, location) = open_files(&dir)?;
        let checkpoint = Checkpoint { dir, config, arch, awq, files, location };
        checkpoint.check_tensors()?;
        Ok(checkpoint)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The checkpoint with the tensors of `kept` (safetensors files held in memory: a worker's
    /// blocks of the job that wrote this checkpoint) read from there instead of from `dir`; returns
    /// how many tensors moved. Each must be in the checkpoint with the same dtype and shape, or the
    /// error names it and nothing moves.
    pub fn with_kept(mut self, kept: Vec<SafetensorsFile>) -> Result<(Checkpoint, usize)> {
        for file in &kept {
            for (name, info) in file.tensors() {
                let mismatch = |detail: String| Error::BadTensor { path: file.path().into(), tensor: name.clone(), detail };
                let on_disk = self.file_of(name).map_err(|_| mismatch(format!("is not in {}", self.dir.display())))?;
                let disk = on_disk.info(name).expect("location only lists tensors present in their file");
                if (disk.dtype, &disk.shape) != (info.dtype, &info.shape) {
                    return Err(mismatch(format!(
                        "is {} {:?} in memory but {} {:?} in {}",
                        info.dtype.name(),
                        info.shape,
                        disk.dtype.name(),
                        disk.shape,
                        on_disk.path().display()
                    )));
                }
            }
        }
        let mut moved = 0;
        for file in kept {
            let index = self.files.len();
            for name in file.tensors().keys() {
                self.location.insert(name.clone(), index);
                moved += 1;
            }
            self.files.push(file);
        }
        Ok((self, moved))
    }


    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn arch(&self) -> &'static ArchDescriptor {
        self.arch
    }

    /// The quantization of an AWQ checkpoint; `None` for a full-precision one.
    pub fn awq(&self) -> Option<QuantSpec> {
        self.awq
    }

    pub fn n_blocks(&self) -> usize {
        self.config.n_blocks
    }

    fn expected_tensors(&self) -> Vec<Expected> {
        expected_tensors(self.arch, &self.config, self.awq)
    }

    fn check_tensors(&self) -> Result<()> {
        // The expected tensors are listed from config.json: a block count that lies must not make
        // that list gigabytes long. Every block has tensors of its own, so there are at most as
        // many blocks as tensors in the files.
        if self.config.n_blocks > self.location.len() {
            return Err(Error::ConfigField {
                path: self.config.path.clone(),
                field: "num_hidden_layers".into(),
                detail: format!(
                    "{} blocks, but the checkpoint holds {} tensors in all",
                    self.config.n_blocks,
                    self.location.len()
                ),
            });
        }
        if self.awq.is_some() {
            self.check_packed_outputs()?;
        }
        for e in self.expected_tensors() {
            let file = self.file_of(&e.name)?;
            let info = file.info(&e.name).expect("location only lists tensors present in their file");
            let path = file.path().to_path_buf();
            let mismatch = |expected: String| Error::DTypeMismatch {
                path: path.clone(),
                tensor: e.name.clone(),
                expected,
                got: info.dtype.name().into(),
            };
            match (&e.dtype, info.dtype.float(), self.config.dtype) {
                (ExpectedDType::Exact(want), _, _) if *want != info.dtype => return Err(mismatch(want.name().into())),
                (ExpectedDType::Exact(_), _, _) => {}
                (_, None, _) => return Err(mismatch("a float type (F16, BF16, F32)".into())),
                (ExpectedDType::Model, Some(got), Some(want)) if got != want => {
                    return Err(mismatch(format!("{} (config.json torch_dtype)", want.safetensors_name())))
                }
                _ => {}
            }
            if info.shape != e.shape {
                return Err(Error::ShapeMismatch { path, tensor: e.name, expected: e.shape, got: info.shape.clone() });
            }
        }
        Ok(())
    }

    /// An AWQ `qweight` packs 8 outputs per int32 column, so each linear's outputs, and each part's
    /// of a fused one (whose columns are cut between parts), must be a multiple of 8. The error names
    /// block 0's `qweight` that stores the linear.
    fn check_packed_outputs(&self) -> Result<()> {
        let (a, c) = (self.arch, &self.config);
        for role in LinearRole::ALL {
            let [out, _] = a.linear_shape(role, c);
            if out.is_multiple_of(8) {
                continue;
            }
            let tensor = a.packed_name(0, role, "qweight");
            let path = self.file_of(&tensor)?.path().to_path_buf();
            let what = match a.stored_parts(role) {
                [_] => format!("{out} outputs"),
                parts => {
                    format!("its {role:?} part (of {parts:?}) has {out} outputs (rows {:?})", a.stored_rows(role, c))
                }
            };
            let detail = format!(
                "{what}, not a multiple of 8: one int32 column packs 8 outputs, and a fused tensor is cut between \
                 parts at whole columns (config.json sets the sizes)"
            );
            return Err(Error::BadTensor { path, tensor, detail });
        }
        Ok(())
    }

    fn file_of(&self, name: &str) -> Result<&SafetensorsFile> {
        match self.location.get(name) {
            Some(&i) => Ok(&self.files[i]),
            None => {
                let (path, hint) = if self.dir.join(INDEX_FILE).exists() {
                    (self.dir.join(INDEX_FILE), " from the weight_map")
                } else {
                    (self.dir.join(SINGLE_FILE), "")
                };
                Err(Error::MissingTensor { path, tensor: name.into(), hint: hint.into() })
            }
        }
    }

    /// A float tensor by name, copied out in its stored dtype; NaN or infinite values are an error.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let file = self.file_of(name)?;
        let t = file.tensor(name)?;
        if !t.all_finite()? {
            return Err(Error::non_finite(file.path(), name));
        }
        Ok(t)
    }

    /// How many values one block's weights hold (linears, biases, norms): with a dtype's size, what
    /// a block takes in memory once loaded.
    pub fn block_elements(&self) -> usize {
        let (a, c) = (self.arch, &self.config);
        let linears: usize = LinearRole::ALL
            .iter()
            .map(|&role| {
                let [o, i] = a.linear_shape(role, c);
                o * i + if a.has_bias(role, c) { o } else { 0 }
            })
            .sum();
        linears + a.norms.iter().map(|n| n.dim.resolve(c)).sum::<usize>()
    }

    /// The weights of block `block_idx`, on the host.
    pub fn load_block(&self, block_idx: usize) -> Result<BlockWeights> {
        self.load_block_with(block_idx, &mut |name| self.tensor(name))
    }

    /// The weights of block `block_idx`, read through `staging` onto its device (see
    /// [`HostStaging`]): what a loader thread with a buffer of its own calls for every block. The
    /// dequantized linears of an AWQ checkpoint stay on the host.
    pub fn load_block_staged(&self, block_idx: usize, staging: &mut HostStaging) -> Result<BlockWeights> {
        self.load_block_with(block_idx, &mut |name| self.file_of(name)?.tensor_staged(name, staging))
    }

    /// The largest stored float tensor of block `block_idx`, in bytes: what a staging buffer needs
    /// to read the block one tensor at a time (packed AWQ linears, dequantized on the host, are not
    /// counted).
    pub fn largest_block_tensor_bytes(&self, block_idx: usize) -> usize {
        block_tensors(self.arch, &self.config, self.awq, block_idx)
            .into_iter()
            .filter(|t| matches!(t.role, TensorRole::Norm | TensorRole::LinearWeight | TensorRole::Bias))
            .filter_map(|t| self.location.get(&t.name).and_then(|&f| self.files[f].info(&t.name)).map(|info| info.byte_len()))
            .max()
            .unwrap_or(0)
    }

    /// Block `block_idx` with each stored float tensor (by name) read by `read`. A fused tensor
    /// (Phi-3's qkv_proj) is read once and cut into its parts' rows.
    fn load_block_with(&self, block_idx: usize, read: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<BlockWeights> {
        let (a, c) = (self.arch, &self.config);
        let mut linears: Vec<Option<LinearWeights>> = vec![None; LinearRole::ALL.len()];
        for parts in a.stored_linears() {
            let first = parts[0];
            let bias = if a.has_bias(first, c) { Some(read(&a.bias_name(block_idx, first))?) } else { None };
            let bias_of = |role| bias.as_ref().map(|b| part_of(b, parts, a.stored_rows(role, c))).transpose();
            match self.awq {
                None => {
                    let weight = read(&a.linear_name(block_idx, first))?;
                    for &role in parts {
                        let weight = part_of(&weight, parts, a.stored_rows(role, c))?;
                        linears[role.index()] = Some(LinearWeights { weight, bias: bias_of(role)? });
                    }
                }
                Some(q) => {
                    let stored = self.stored_packed(block_idx, first, q)?;
                    for &role in parts {
                        let weight = match parts.len() {
                            1 => stored.dequantize(),
                            _ => stored.slice_outputs(a.stored_rows(role, c))?.dequantize(),
                        };
                        linears[role.index()] = Some(LinearWeights { weight, bias: bias_of(role)? });
                    }
                }
            }
        }
        let linears = linears.into_iter().map(|l| l.expect("the stored linears hold every role once")).collect();
        let mut norms = vec![None; NormRole::ALL.len()];
        for n in a.norms {
            norms[n.role.index()] = Some(read(&a.norm_name(block_idx, n.role))?);
        }
        Ok(BlockWeights { block_idx, linears, norms })
    }

    /// A linear of an AWQ checkpoint, packed as on disk: for a fused role, its outputs (columns) of
    /// the stored tensors.
    pub fn packed_linear(&self, block_idx: usize, role: LinearRole, q: QuantSpec) -> Result<PackedLinear> {
        let stored = self.stored_packed(block_idx, role, q)?;
        match self.arch.stored_parts(role).len() {
            1 => Ok(stored),
            // Whole 8-output words: `check_tensors` refused a part that is not.
            _ => Ok(stored.slice_outputs(self.arch.stored_rows(role, &self.config))?),
        }
    }

    /// The bias of linear `role` of block `block_idx` (its rows of the stored bias), or `None` where
    /// the architecture gives it none.
    pub fn linear_bias(&self, block_idx: usize, role: LinearRole) -> Result<Option<Tensor>> {
        let (a, c) = (self.arch, &self.config);
        if !a.has_bias(role, c) {
            return Ok(None);
        }
        let stored = self.tensor(&a.bias_name(block_idx, role))?;
        Ok(Some(part_of(&stored, a.stored_parts(role), a.stored_rows(role, c))?))
    }

    /// The packed tensors that store `role` (all parts of a fused linear), as on disk.
    fn stored_packed(&self, block_idx: usize, role: LinearRole, q: QuantSpec) -> Result<PackedLinear> {
        let a = self.arch;
        let [out_features, in_features] = a.stored_shape(role, &self.config);
        let i32s = |part: &str| {
            let name = a.packed_name(block_idx, role, part);
            self.file_of(&name)?.i32_values(&name)
        };
        let scales_name = a.packed_name(block_idx, role, "scales");
        let scales = self.file_of(&scales_name)?.tensor(&scales_name)?;
        Ok(PackedLinear {
            in_features,
            out_features,
            group_size: q.group_size.get(),
            qweight: i32s("qweight")?,
            qzeros: i32s("qzeros")?,
            scales: scales.f32_values()?.iter().map(|&v| awq_kernels::f16::from_f32(v)).collect(),
        })
    }

    /// Rows `ids` of the token embedding table, `[ids.len(), hidden]` in the stored dtype, copied
    /// straight from the file: a calibration pass needs tens of thousands of rows, not the whole
    /// table (a gigabyte for a 128k vocabulary). An id outside the vocabulary, or a NaN or
    /// infinite value in a row read, is an error naming the tensor.
    pub fn embedding_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let name = self.arch.embed_tokens;
        let file = self.file_of(name)?;
        let bad = |detail: String| Error::BadTensor { path: file.path().into(), tensor: name.into(), detail };
        let info = file.info(name).expect("file_of found the tensor in this file");
        let (&[vocab, hidden], Some(dtype)) = (info.shape.as_slice(), info.dtype.float()) else {
            return Err(bad(format!("expected a 2-D float table, found {} of shape {:?}", info.dtype.name(), info.shape)));
        };
        let bytes = file.bytes(name)?;
        let row_bytes = hidden * dtype.size_bytes();
        let mut gathered = Vec::with_capacity(ids.len() * row_bytes);
        for &id in ids {
            let id = id as usize;
            if id >= vocab {
                return Err(bad(format!("token id {id} is outside the vocabulary of {vocab}")));
            }
            gathered.extend_from_slice(&bytes[id * row_bytes..(id + 1) * row_bytes]);
        }
        let rows = Tensor::from_le_bytes(dtype, &[ids.len(), hidden], &gathered)?;
        if !rows.all_finite()? {
            return Err(Error::non_finite(file.path(), name));
        }
        Ok(rows)
    }

    /// A float tensor as an f16 [`RawTensor`] under its own name, for an output file: its bytes
    /// copied straight from the file when it is stored as F16 (an f16 model's embeddings and head
    /// are gigabytes, and decoding and re-encoding them took seconds), converted otherwise. NaN or
    /// infinite values are an error naming the tensor.
    pub fn tensor_as_f16(&self, name: &str) -> Result<RawTensor> {
        let file = self.file_of(name)?;
        match file.info(name) {
            Some(info) if info.dtype == StDtype::F16 => {
                let bytes = file.bytes(name)?;
                if !crate::safetensors::all_finite_le(awq_kernels::DType::F16, bytes) {
                    return Err(Error::non_finite(file.path(), name));
                }
                Ok(RawTensor { name: name.into(), dtype: StDtype::F16, shape: info.shape.clone(), data: bytes.to_vec() })
            }
            _ => RawTensor::from_tensor(name, &self.tensor(name)?.into_dtype(awq_kernels::DType::F16)),
        }
    }

    /// The token embedding table `[vocab, hidden]`.
    pub fn embed_tokens(&self) -> Result<Tensor> {
        self.tensor(self.arch.embed_tokens)
    }

    /// The output projection `[vocab, hidden]`: the embedding table when embeddings are tied.
    pub fn lm_head(&self) -> Result<Tensor> {
        if self.config.tie_word_embeddings {
            self.embed_tokens()
        } else {
            self.tensor(self.arch.lm_head)
        }
    }

    pub fn final_norm(&self) -> Result<Tensor> {
        self.tensor(self.arch.final_norm)
    }
}

/// `rows` of `stored` (a weight `[out, in]` or a bias `[out]`) when it holds several `parts`; a copy
/// of all of it otherwise.
fn part_of(stored: &Tensor, parts: &[LinearRole], rows: std::ops::Range<usize>) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(stored.clone());
    }
    Ok(match *stored.shape() {
        [n] => stored.clone().reshape(&[n, 1])?.rows(rows.start, rows.end)?.reshape(&[rows.len()])?,
        _ => stored.rows(rows.start, rows.end)?,
    })
}

/// Every tensor `a` needs under config `c` (packed linears when `awq` is set), with its shape and
/// the dtype this reader accepts (the names and shapes come from [`checkpoint_tensors`]).
pub(crate) fn expected_tensors(a: &ArchDescriptor, c: &ModelConfig, awq: Option<QuantSpec>) -> Vec<Expected> {
    checkpoint_tensors(a, c, awq)
        .into_iter()
        .map(|t| {
            let dtype = match t.role {
                TensorRole::Embedding | TensorRole::LinearWeight => ExpectedDType::Model,
                TensorRole::Norm | TensorRole::Bias => ExpectedDType::AnyFloat,
                TensorRole::QWeight | TensorRole::QZeros => ExpectedDType::Exact(StDtype::I32),
                TensorRole::Scales => ExpectedDType::Exact(StDtype::F16),
            };
            Expected { name: t.name, shape: t.shape, dtype }
        })
        .collect()
}

/// Opens the weight files of `dir` and maps every tensor name to its file.
fn open_files(dir: &Path) -> Result<(Vec<SafetensorsFile>, BTreeMap<String, usize>)> {
    let index_path = dir.join(INDEX_FILE);
    if !index_path.exists() {
        let file = SafetensorsFile::open(dir.join(SINGLE_FILE))?;
        let location = file.tensors().keys().map(|k| (k.clone(), 0)).collect();
        return Ok((vec![file], location));
    }
    let text = std::fs::read_to_string(&index_path).map_err(Error::io(&index_path))?;
    let bad = |detail: String| Error::BadHeader { path: index_path.clone(), detail };
    let index: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let weight_map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut file_names: Vec<&str> = Vec::new();
    let mut by_name = BTreeMap::new();
    for (tensor, file) in weight_map {
        let file = file.as_str().ok_or_else(|| bad(format!("weight_map entry for {tensor} is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!("weight_map entry for {tensor} names `{file}`, which is not a file in this directory")));
        }
        if !file_names.contains(&file) {
            file_names.push(file);
        }
        by_name.insert(tensor.clone(), file);
    }
    file_names.sort_unstable();
    let files = file_names.iter().map(|f| SafetensorsFile::open(dir.join(f))).collect::<Result<Vec<_>>>()?;
    let mut location = BTreeMap::new();
    for (tensor, file) in by_name {
        let i = file_names.binary_search(&file).expect("every file name was collected");
        if files[i].info(&tensor).is_none() {
            return Err(Error::MissingTensor {
                path: files[i].path().into(),
                tensor,
                hint: format!(" (the index {INDEX_FILE} says it is in this file)"),
            });
        }
        location.insert(tensor, i);
    }
    Ok((files, location))
}
