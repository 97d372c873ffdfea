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

use crate::arch::{descriptor_for, ArchDescriptor, LinearId, LinearRole, NormRole, EXPERT_ROLES};
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

/// The weights of one decoder block, by linear ([`LinearId`]) and norm role; a sparse block's
/// router and its experts' linears instead of the dense MLP's.
#[derive(Clone, Debug)]
pub struct BlockWeights {
    pub block_idx: usize,
    /// By [`slot`]: the seven roles (gate, up and down `None` in a sparse block), then each
    /// expert's gate, up and down.
    linears: Vec<Option<LinearWeights>>,
    /// By `NormRole::index()`; `None` for a norm the architecture does not have.
    norms: Vec<Option<Tensor>>,
    /// A sparse block's router `[n_experts, hidden]`.
    router: Option<Tensor>,
}

/// Where linear `id` sits in [`BlockWeights`]' list.
fn slot(id: LinearId) -> usize {
    match id.expert {
        None => id.role.index(),
        Some(e) => LinearRole::ALL.len() + EXPERT_ROLES.len() * e + (id.role.index() - LinearRole::Gate.index()),
    }
}

impl BlockWeights {
    /// A block of the given linears (every one the block has, in any order), norms and router.
    ///
    /// # Panics
    /// When a linear is given twice.
    pub fn new(
        block_idx: usize,
        linears: impl IntoIterator<Item = (LinearId, LinearWeights)>,
        norms: impl IntoIterator<Item = (NormRole, Tensor)>,
        router: Option<Tensor>,
    ) -> BlockWeights {
        let mut slots: Vec<Option<LinearWeights>> = vec![None; LinearRole::ALL.len()];
        for (id, l) in linears {
            let i = slot(id);
            if slots.len() <= i {
                slots.resize(i + 1, None);
            }
            assert!(slots[i].replace(l).is_none(), "block {block_idx}: linear {id} given twice");
        }
        let mut norm_slots = vec![None; NormRole::ALL.len()];
        for (role, n) in norms {
            norm_slots[role.index()] = Some(n);
        }
        BlockWeights { block_idx, linears: slots, norms: norm_slots, router }
    }

    /// # Panics
    /// When the block has no such linear (a dense role of a sparse block, an expert of a dense one).
    pub fn linear(&self, id: impl Into<LinearId>) -> &LinearWeights {
        let id = id.into();
        let found = self.linears.get(slot(id)).and_then(Option::as_ref);
        found.unwrap_or_else(|| panic!("block {} has no {id} linear", self.block_idx))
    }

    /// # Panics
    /// As [`BlockWeights::linear`].
    pub fn linear_mut(&mut self, id: impl Into<LinearId>) -> &mut LinearWeights {
        let (id, block_idx) = (id.into(), self.block_idx);
        let found = self.linears.get_mut(slot(id)).and_then(Option::as_mut);
        found.unwrap_or_else(|| panic!("block {block_idx} has no {id} linear"))
    }

    /// Every linear of the block, in block order: q, k, v, o, then the dense MLP's or each
    /// expert's gate, up and down (`ArchDescriptor::block_linears`' order).
    pub fn linears(&self) -> impl Iterator<Item = (LinearId, &LinearWeights)> {
        self.linears.iter().enumerate().filter_map(|(i, l)| {
            let id = match i.checked_sub(LinearRole::ALL.len()) {
                None => LinearId::from(LinearRole::ALL[i]),
                Some(j) => LinearId::expert(j / EXPERT_ROLES.len(), EXPERT_ROLES[j % EXPERT_ROLES.len()]),
            };
            l.as_ref().map(|l| (id, l))
        })
    }

    /// A sparse block's router `[n_experts, hidden]`; `None` in a dense block.
    pub fn router(&self) -> Option<&Tensor> {
        self.router.as_ref()
    }

    /// The experts of a sparse block (0 in a dense one).
    pub fn n_experts(&self) -> usize {
        self.linears.len().saturating_sub(LinearRole::ALL.len()) / EXPERT_ROLES.len()
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

    /// # Panics
    /// As [`BlockWeights::norm`].
    pub fn norm_mut(&mut self, role: NormRole) -> &mut Tensor {
        let block_idx = self.block_idx;
        self.norms[role.index()].as_mut().unwrap_or_else(|| panic!("block {block_idx} has no {role:?} norm"))
    }

    /// `self` with every tensor passed through `f` (linears' weights and biases, norms, router).
    fn try_map(self, mut f: impl FnMut(Tensor) -> awq_kernels::Result<Tensor>) -> awq_kernels::Result<BlockWeights> {
        let mut linear = |l: LinearWeights| -> awq_kernels::Result<LinearWeights> {
            Ok(LinearWeights { weight: f(l.weight)?, bias: l.bias.map(&mut f).transpose()? })
        };
        let linears =
            self.linears.into_iter().map(|l| l.map(&mut linear).transpose()).collect::<awq_kernels::Result<_>>()?;
        let norms = self.norms.into_iter().map(|n| n.map(&mut f).transpose()).collect::<awq_kernels::Result<_>>()?;
        let router = self.router.map(&mut f).transpose()?;
        Ok(BlockWeights { block_idx: self.block_idx, linears, norms, router })
    }

    /// A copy with every tensor on `device` (the AWQ engine computes where its weights are).
    pub fn to_device(&self, device: awq_kernels::Device) -> awq_kernels::Result<BlockWeights> {
        self.clone().try_map(|t| t.to_device(device))
    }

    /// `self` with every tensor on `device`: moved where it is there already, copied otherwise
    /// (what a loader thread hands the engine).
    pub fn into_device(self, device: awq_kernels::Device) -> awq_kernels::Result<BlockWeights> {
        self.try_map(|t| if t.device() == device { Ok(t) } else { t.to_device(device) })
    }

    /// Converts every tensor to `dtype` (the CPU forward pass keeps weights in f32 so that matmuls
    /// read them without converting per call).
    pub fn into_dtype(self, dtype: awq_kernels::DType) -> BlockWeights {
        self.try_map(|t| Ok(t.into_dtype(dtype))).expect("a dtype conversion does not fail")
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
        // Likewise the experts: each has three tensors of its own.
        if let Some(moe) = &self.config.moe {
            if moe.n_experts.saturating_mul(3) > self.location.len() {
                return Err(Error::ConfigField {
                    path: self.config.path.clone(),
                    field: moe.n_experts_field.into(),
                    detail: format!(
                        "{} experts, but the checkpoint holds {} tensors in all",
                        moe.n_experts,
                        self.location.len()
                    ),
                });
            }
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
        // Each kind of linear once: the block's own roles, and one expert's where the model has them.
        let mut ids: Vec<(usize, LinearId)> = LinearRole::ALL.iter().map(|&r| (0, LinearId::from(r))).collect();
        if let Some(b) = (0..c.n_blocks).find(|&b| a.is_sparse(c, b)) {
            ids.retain(|(_, id)| !EXPERT_ROLES.contains(&id.role));
            ids.extend(EXPERT_ROLES.map(|r| (b, LinearId::expert(0, r))));
            if let Some(dense) = (0..c.n_blocks).find(|&b| !a.is_sparse(c, b)) {
                ids.extend(EXPERT_ROLES.map(|r| (dense, LinearId::from(r))));
            }
        }
        for (block_idx, id) in ids {
            let [out, _] = a.linear_shape(id, c);
            if out.is_multiple_of(8) {
                continue;
            }
            let tensor = a.packed_name(block_idx, id, "qweight");
            let path = self.file_of(&tensor)?.path().to_path_buf();
            let parts = if id.expert.is_some() { &[][..] } else { a.stored_parts(id.role) };
            let what = match parts {
                [_, _, ..] => {
                    format!("its {id} part (of {parts:?}) has {out} outputs (rows {:?})", a.stored_rows(id, c))
                }
                _ => format!("{out} outputs"),
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

    /// How many values the largest block's weights hold (linears, biases, norms, router): with a
    /// dtype's size, what a block takes in memory once loaded.
    pub fn block_elements(&self) -> usize {
        // Blocks differ only in their MLP (dense or sparse): one of each kind is enough.
        let sparse = (0..self.config.n_blocks).find(|&b| self.arch.is_sparse(&self.config, b));
        let dense = (0..self.config.n_blocks).find(|&b| !self.arch.is_sparse(&self.config, b));
        sparse.into_iter().chain(dense).map(|b| self.block_elements_of(b)).max().unwrap_or(0)
    }

    /// How many values block `block_idx`'s weights hold.
    pub fn block_elements_of(&self, block_idx: usize) -> usize {
        let (a, c) = (self.arch, &self.config);
        let linears: usize = a
            .block_linears(c, block_idx)
            .into_iter()
            .map(|id| {
                let [o, i] = a.linear_shape(id, c);
                o * i + if a.has_bias(id, c) { o } else { 0 }
            })
            .sum();
        let router = match (a.is_sparse(c, block_idx), &c.moe) {
            (true, Some(moe)) => moe.n_experts * c.hidden_size,
            _ => 0,
        };
        linears + router + a.norms.iter().map(|n| n.dim.resolve(c)).sum::<usize>()
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
            .filter(|t| {
                matches!(t.role, TensorRole::Norm | TensorRole::LinearWeight | TensorRole::Router | TensorRole::Bias)
            })
            .filter_map(|t| self.location.get(&t.name).and_then(|&f| self.files[f].info(&t.name)).map(|info| info.byte_len()))
            .max()
            .unwrap_or(0)
    }

    /// Block `block_idx` with each stored float tensor (by name) read by `read`. A fused tensor
    /// (Phi-3's qkv_proj) is read once and cut into its parts' rows.
    fn load_block_with(&self, block_idx: usize, read: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<BlockWeights> {
        let (a, c) = (self.arch, &self.config);
        let mut linears: Vec<(LinearId, LinearWeights)> = Vec::new();
        for parts in a.block_stored(c, block_idx) {
            let first = parts[0];
            let roles: Vec<LinearRole> = parts.iter().map(|id| id.role).collect();
            let bias = if a.has_bias(first, c) { Some(read(&a.bias_name(block_idx, first))?) } else { None };
            let bias_of = |id: LinearId| bias.as_ref().map(|b| part_of(b, &roles, a.stored_rows(id, c))).transpose();
            match self.awq {
                None => {
                    let weight = read(&a.linear_name(block_idx, first))?;
                    for &id in &parts {
                        let weight = part_of(&weight, &roles, a.stored_rows(id, c))?;
                        linears.push((id, LinearWeights { weight, bias: bias_of(id)? }));
                    }
                }
                Some(q) => {
                    let stored = self.stored_packed(block_idx, first, q)?;
                    for &id in &parts {
                        let weight = match parts.len() {
                            1 => stored.dequantize(),
                            _ => stored.slice_outputs(a.stored_rows(id, c))?.dequantize(),
                        };
                        linears.push((id, LinearWeights { weight, bias: bias_of(id)? }));
                    }
                }
            }
        }
        let mut norms = Vec::new();
        for n in a.norms {
            norms.push((n.role, read(&a.norm_name(block_idx, n.role))?));
        }
        let router = match a.is_sparse(c, block_idx) {
            true => Some(read(&a.router_name(block_idx))?),
            false => None,
        };
        Ok(BlockWeights::new(block_idx, linears, norms, router))
    }

    /// A linear of an AWQ checkpoint, packed as on disk: for a fused role, its outputs (columns) of
    /// the stored tensors.
    pub fn packed_linear(&self, block_idx: usize, id: impl Into<LinearId>, q: QuantSpec) -> Result<PackedLinear> {
        let id = id.into();
        let stored = self.stored_packed(block_idx, id, q)?;
        match id.expert.is_none() && self.arch.stored_parts(id.role).len() > 1 {
            false => Ok(stored),
            // Whole 8-output words: `check_tensors` refused a part that is not.
            true => Ok(stored.slice_outputs(self.arch.stored_rows(id, &self.config))?),
        }
    }

    /// The bias of linear `id` of block `block_idx` (its rows of the stored bias), or `None` where
    /// the architecture gives it none.
    pub fn linear_bias(&self, block_idx: usize, id: impl Into<LinearId>) -> Result<Option<Tensor>> {
        let (a, c, id) = (self.arch, &self.config, id.into());
        if !a.has_bias(id, c) {
            return Ok(None);
        }
        let stored = self.tensor(&a.bias_name(block_idx, id))?;
        let parts = if id.expert.is_some() { &[id.role][..] } else { a.stored_parts(id.role) };
        Ok(Some(part_of(&stored, parts, a.stored_rows(id, c))?))
    }

    /// A sparse block's router weight `[n_experts, hidden]` as stored.
    pub fn router(&self, block_idx: usize) -> Result<Tensor> {
        self.tensor(&self.arch.router_name(block_idx))
    }

    /// The packed tensors that store `id` (all parts of a fused linear), as on disk.
    fn stored_packed(&self, block_idx: usize, id: LinearId, q: QuantSpec) -> Result<PackedLinear> {
        let a = self.arch;
        let [out_features, in_features] = a.stored_shape(id, &self.config);
        let i32s = |part: &str| {
            let name = a.packed_name(block_idx, id, part);
            self.file_of(&name)?.i32_values(&name)
        };
        let scales_name = a.packed_name(block_idx, id, "scales");
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
                TensorRole::Embedding | TensorRole::LinearWeight | TensorRole::Router => ExpectedDType::Model,
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
