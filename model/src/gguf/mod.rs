//! GGUF, llama.cpp's model file: reading it, dequantizing its tensors, importing it as a Hugging
//! Face checkpoint (`awq import gguf`).
//!
//! A GGUF file is little-endian: the magic `GGUF`, a version (2 or 3; version 1 used 32-bit counts
//! and is refused), the tensor and metadata counts, the metadata (a key, a value type, a value;
//! arrays hold values of one type), the tensor infos (name, dims innermost first, GGML type,
//! offset into the data section) and, at the next multiple of `general.alignment` (32 unless the
//! metadata says otherwise), the data section. [`GgufFile::open`] maps the file and checks every
//! count, length and offset against it before anything else reads it: a truncated file, a wrong
//! magic, an unsupported version, an unknown tensor type, a row length that is not a whole number of
//! blocks or tensor data past the end of the file is an error naming the file and the metadata key
//! or tensor. Tensor bytes are then borrowed from the mapping; nothing is copied until asked for.
//!
//! - [`dequant`]: every block format we import (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
//!   Q3_K, Q4_K, Q5_K, Q6_K) to f32, with the formulas of llama.cpp's `ggml-quants.c`.
//! - `convert`: metadata to config.json, GGUF tensor names to Hugging Face names through the
//!   architecture descriptors, the inverse of llama.cpp's Q/K row permutation and of its offset on
//!   Gemma's norms; [`import`] writes the checkpoint. `gemma3`: the `gemma3_text` config fields
//!   that llama.cpp fixes in code rather than storing.
//! - `tokenizer`: tokenizer.json, tokenizer_config.json and generation_config.json from the
//!   `tokenizer.ggml.*` keys: byte-level BPE (`gpt2`) and, through `spm`, SentencePiece-style
//!   vocabularies (`llama`: Gemma's), whose merges it rebuilds from the tokens' scores.
//!
//! The layout follows llama.cpp's `ggml/src/gguf.cpp`; the import is tested against the reference
//! converter `../shared/assets/gguf2hf.py` and the Python `gguf` package. Big-endian GGUF files and
//! arrays of arrays (which llama.cpp does not read either) are refused.

mod convert;
pub mod dequant;
#[cfg(test)]
pub(crate) mod fixture;
mod gemma3;
mod spm;
mod tokenizer;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{Error, Result};

pub use convert::{import, ImportOptions, ImportReport};

/// The magic bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// `general.alignment` when the metadata does not set it.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A GGML tensor type: how elements are stored, one block at a time.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// `(type, id, elements per block, bytes per block)`, as `ggml.h` and `ggml.c`'s type traits define
/// them. Knowing the size of every type lets the reader check the whole file even when a tensor's
/// type is one we cannot dequantize.
const GGML_TYPES: &[(GgmlType, u32, usize, usize)] = {
    use GgmlType::*;
    &[
        (F32, 0, 1, 4),
        (F16, 1, 1, 2),
        (Q4_0, 2, 32, 18),
        (Q4_1, 3, 32, 20),
        (Q5_0, 6, 32, 22),
        (Q5_1, 7, 32, 24),
        (Q8_0, 8, 32, 34),
        (Q8_1, 9, 32, 36),
        (Q2_K, 10, 256, 84),
        (Q3_K, 11, 256, 110),
        (Q4_K, 12, 256, 144),
        (Q5_K, 13, 256, 176),
        (Q6_K, 14, 256, 210),
        (Q8_K, 15, 256, 292),
        (IQ2_XXS, 16, 256, 66),
        (IQ2_XS, 17, 256, 74),
        (IQ3_XXS, 18, 256, 98),
        (IQ1_S, 19, 256, 50),
        (IQ4_NL, 20, 32, 18),
        (IQ3_S, 21, 256, 110),
        (IQ2_S, 22, 256, 82),
        (IQ4_XS, 23, 256, 136),
        (I8, 24, 1, 1),
        (I16, 25, 1, 2),
        (I32, 26, 1, 4),
        (I64, 27, 1, 8),
        (F64, 28, 1, 8),
        (IQ1_M, 29, 256, 56),
        (BF16, 30, 1, 2),
        (TQ1_0, 34, 256, 54),
        (TQ2_0, 35, 256, 66),
        (MXFP4, 39, 32, 17),
    ]
};

impl GgmlType {
    /// Every type this reader knows the layout of.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        GGML_TYPES.iter().map(|t| t.0)
    }

    pub fn from_id(id: u32) -> Option<GgmlType> {
        GGML_TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }

    fn row(self) -> &'static (GgmlType, u32, usize, usize) {
        GGML_TYPES.iter().find(|t| t.0 == self).expect("every GgmlType has a row in GGML_TYPES")
    }

    /// The type id in GGUF tensor infos (`enum ggml_type`).
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        self.row().2
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.row().3
    }

    /// llama.cpp's name (`Q4_K`, `BF16`, ...).
    pub fn name(self) -> String {
        format!("{self:?}")
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    /// Values of one scalar type (arrays of arrays are refused at open).
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "uint8",
            MetaValue::I8(_) => "int8",
            MetaValue::U16(_) => "uint16",
            MetaValue::I16(_) => "int16",
            MetaValue::U32(_) => "uint32",
            MetaValue::I32(_) => "int32",
            MetaValue::U64(_) => "uint64",
            MetaValue::I64(_) => "int64",
            MetaValue::F32(_) => "float32",
            MetaValue::F64(_) => "float64",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }

    /// An integer of any width and signedness.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }
}

/// One tensor's info, checked against the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensor {
    pub name: String,
    /// Dimensions as stored: innermost (contiguous) first, so a `[out, in]` weight has
    /// `dims = [in, out]`.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte range of the data in the file.
    begin: usize,
    end: usize,
}

impl GgufTensor {
    /// The shape in row-major order (outermost first), as safetensors and PyTorch write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    pub fn n_bytes(&self) -> usize {
        self.end - self.begin
    }
}

/// A memory-mapped GGUF file whose header, metadata and tensor infos have been checked.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<GgufTensor>,
}

/// Versions whose layout this reader knows (3 added big-endian files, which are refused).
const SUPPORTED_VERSIONS: [u32; 2] = [2, 3];

impl GgufFile {
    /// Maps `path` and checks it; see the module docs for what is checked.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(Error::io(&path))?;
        // SAFETY: the mapping is read-only; if another process truncates the file while it is
        // mapped, reads fault (SIGBUS), the documented hazard of every memory-mapped model loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(Error::io(&path))?;
        let (version, metadata, tensors) = parse(&path, &mmap)?;
        Ok(GgufFile { path, mmap, version, metadata, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Every metadata key and value, in key order.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The stored bytes of `tensor` (one of [`Self::tensors`]), borrowed from the mapping.
    pub fn tensor_data(&self, tensor: &GgufTensor) -> &[u8] {
        &self.mmap[tensor.begin..tensor.end]
    }

    fn key_error(&self, key: &str, detail: String) -> Error {
        Error::GgufKey { path: self.path.clone(), key: key.into(), detail }
    }

    fn typed<'a, T>(&'a self, key: &str, want: &str, get: impl FnOnce(&'a MetaValue) -> Option<T>) -> Result<Option<T>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => match get(v) {
                Some(t) => Ok(Some(t)),
                None => Err(self.key_error(key, format!("expected {want}, found {}", describe(v)))),
            },
        }
    }

    /// A string value; `None` when the key is absent, an error when it holds something else.
    pub fn str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", |v| match v {
            MetaValue::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// A non-negative integer of any width (writers differ: llama.cpp writes uint32, others
    /// int32 or uint64).
    pub fn uint(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", |v| v.as_i128().and_then(|i| u64::try_from(i).ok()))
    }

    /// A float (float32 or float64). A float32 comes back as the f64 nearest to its shortest
    /// decimal form (`1e-5`, not `9.999999747378752e-6`): the value someone wrote in config.json
    /// before llama.cpp's converter narrowed it.
    pub fn float(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a float", |v| match *v {
            MetaValue::F32(x) => Some(f32_decimal(x)),
            MetaValue::F64(x) => Some(x),
            _ => None,
        })
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", |v| match *v {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        })
    }

    /// An array of strings.
    pub fn str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.typed(key, "an array of strings", |v| match v {
            MetaValue::Array(items) => items
                .iter()
                .map(|i| match i {
                    MetaValue::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => None,
        })
    }

    /// An array of integers of any width.
    pub fn int_array(&self, key: &str) -> Result<Option<Vec<i128>>> {
        self.typed(key, "an array of integers", |v| match v {
            MetaValue::Array(items) => items.iter().map(MetaValue::as_i128).collect(),
            _ => None,
        })
    }

    /// An array of float32 values (SentencePiece scores), exactly as stored.
    pub fn f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.typed(key, "an array of float32", |v| match v {
            MetaValue::Array(items) => items
                .iter()
                .map(|i| match *i {
                    MetaValue::F32(x) => Some(x),
                    _ => None,
                })
                .collect(),
            _ => None,
        })
    }

    /// `Some(value)` or an error saying the key is missing.
    pub fn required<T>(&self, key: &str, value: Option<T>) -> Result<T> {
        value.ok_or_else(|| self.key_error(key, "required key is missing".into()))
    }
}

/// `x` as the f64 nearest to its shortest round-trip decimal form.
pub(crate) fn f32_decimal(x: f32) -> f64 {
    if !x.is_finite() {
        return x as f64;
    }
    format!("{x}").parse().expect("Rust prints finite f32 values as parseable decimals")
}

/// A value in an error message: its type, and the value itself when it is short.
fn describe(v: &MetaValue) -> String {
    match v {
        MetaValue::Array(items) => format!("an array of {} items", items.len()),
        MetaValue::String(s) if s.chars().count() > 40 => format!("a string of {} bytes", s.len()),
        MetaValue::String(s) => format!("string {s:?}"),
        MetaValue::Bool(b) => format!("bool {b}"),
        MetaValue::F32(x) => format!("float32 {x}"),
        MetaValue::F64(x) => format!("float64 {x}"),
        other => format!("{} {}", other.type_name(), other.as_i128().expect("the rest are integers")),
    }
}

/// A read position in the file, with what is being read for error messages.
struct Cursor<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
    /// What is being read, e.g. "metadata key `general.name`" (set by the caller per item).
    what: String,
}

impl<'a> Cursor<'a> {
    fn truncated(&self, need: u64) -> Error {
        Error::Truncated {
            path: self.path.into(),
            detail: format!(
                "{}: needs {need} bytes at offset {}, but the file has {} bytes",
                self.what,
                self.pos,
                self.data.len()
            ),
        }
    }

    fn malformed(&self, detail: impl fmt::Display) -> Error {
        Error::BadHeader { path: self.path.into(), detail: format!("{}: {detail}", self.what) }
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        if n > self.remaining() as u64 {
            return Err(self.truncated(n));
        }
        let bytes = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N as u64)?.try_into().expect("take returns exactly N bytes"))
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A GGUF string: a u64 byte count and UTF-8 bytes.
    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.malformed(format!("string is not UTF-8 ({e})")))
    }

    /// A value of GGUF value type `ty`.
    fn value(&mut self, ty: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.u8()?),
            1 => MetaValue::I8(i8::from_le_bytes(self.array()?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => MetaValue::Bool(self.u8()? != 0),
            8 => MetaValue::String(self.string()?),
            9 => {
                let item_ty = self.u32()?;
                let count = self.u64()?;
                let item_bytes: u64 = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => 8, // at least the length of each string
                    9 => return Err(self.malformed("arrays of arrays are not supported")),
                    other => return Err(self.malformed(format!("array of unknown value type {other}"))),
                };
                // Check the count against the bytes left before allocating for it.
                if count.checked_mul(item_bytes).is_none_or(|n| n > self.remaining() as u64) {
                    return Err(self.truncated(count.saturating_mul(item_bytes)));
                }
                let items = (0..count).map(|_| self.value(item_ty)).collect::<Result<Vec<_>>>()?;
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.malformed(format!("unknown value type {other}"))),
        })
    }
}

type Parsed = (u32, BTreeMap<String, MetaValue>, Vec<GgufTensor>);

fn parse(path: &Path, data: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { path, data, pos: 0, what: "magic".into() };
    let magic = c.array::<4>()?;
    if &magic != MAGIC {
        return Err(c.malformed(format!("not a GGUF file: the file starts with {magic:02x?}, not \"GGUF\"")));
    }
    c.what = "version".into();
    let version = c.u32()?;
    if !SUPPORTED_VERSIONS.contains(&version) {
        let detail = if SUPPORTED_VERSIONS.contains(&version.swap_bytes()) {
            "the file is big-endian, which is not supported".to_string()
        } else {
            format!("GGUF version {version} is not supported (supported: 2, 3)")
        };
        return Err(c.malformed(detail));
    }
    c.what = "tensor count".into();
    let n_tensors = c.u64()?;
    c.what = "metadata count".into();
    let n_keys = c.u64()?;

    let mut metadata = BTreeMap::new();
    for k in 0..n_keys {
        c.what = format!("metadata key #{k}");
        let key = c.string()?;
        c.what = format!("metadata key `{key}`");
        let ty = c.u32()?;
        let value = c.value(ty)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(c.malformed("the key appears twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_i128().and_then(|a| u64::try_from(a).ok()) {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(Error::GgufKey {
                    path: path.into(),
                    key: "general.alignment".into(),
                    detail: format!("expected a power of two, found {}", describe(v)),
                })
            }
        },
    };

    // Offsets are relative to the data section, whose start is only known after the last info.
    let mut infos = Vec::new();
    for t in 0..n_tensors {
        c.what = format!("tensor info #{t}");
        let name = c.string()?;
        c.what = format!("tensor info `{name}`");
        let n_dims = c.u32()?;
        if !(1..=4).contains(&n_dims) {
            return Err(c.malformed(format!("{n_dims} dimensions (GGML tensors have 1 to 4)")));
        }
        let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
        let type_id = c.u32()?;
        let offset = c.u64()?;
        infos.push((name, dims, type_id, offset));
    }
    let data_start = (c.pos as u64).next_multiple_of(alignment);
    let file_len = data.len() as u64;

    let mut tensors: Vec<GgufTensor> = Vec::with_capacity(infos.len());
    let mut names = std::collections::BTreeSet::new();
    for (name, dims, type_id, offset) in infos {
        let bad = |detail: String| Error::BadTensor { path: path.into(), tensor: name.clone(), detail };
        if !names.insert(name.clone()) {
            return Err(bad("the name appears twice in the tensor infos".into()));
        }
        let ty = GgmlType::from_id(type_id).ok_or_else(|| bad(format!("unknown GGML type id {type_id}")))?;
        let n_elements =
            dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).ok_or_else(|| bad(format!("dims {dims:?} overflow")))?;
        if dims[0] % ty.block_len() as u64 != 0 {
            return Err(bad(format!(
                "rows of {} elements are not a whole number of {ty} blocks ({} elements each)",
                dims[0],
                ty.block_len()
            )));
        }
        let n_bytes = (n_elements / ty.block_len() as u64)
            .checked_mul(ty.block_bytes() as u64)
            .ok_or_else(|| bad(format!("dims {dims:?} of {ty} overflow a byte count")))?;
        if offset % alignment != 0 {
            return Err(bad(format!("data offset {offset} is not a multiple of the alignment {alignment}")));
        }
        let begin = data_start.checked_add(offset);
        let end = begin.and_then(|b| b.checked_add(n_bytes));
        let (begin, end) = match (begin, end) {
            (Some(b), Some(e)) if e <= file_len => (b as usize, e as usize),
            _ => {
                return Err(Error::Truncated {
                    path: path.into(),
                    detail: format!(
                        "tensor {name}: {ty} data of {n_bytes} bytes at offset {offset} of the data section \
                         (which starts at byte {data_start}) ends at byte {}, but the file has {file_len} bytes",
                        data_start as u128 + offset as u128 + n_bytes as u128
                    ),
                })
            }
        };
        tensors.push(GgufTensor { name, dims, ty, begin, end });
    }

    // Two tensors must not share bytes (llama.cpp lays them out one after another).
    let mut by_offset: Vec<&GgufTensor> = tensors.iter().collect();
    by_offset.sort_by_key(|t| (t.begin, t.end));
    for pair in by_offset.windows(2) {
        if pair[1].begin < pair[0].end {
            return Err(Error::BadTensor {
                path: path.into(),
                tensor: pair[1].name.clone(),
                detail: format!("its data overlaps the data of tensor {}", pair[0].name),
            });
        }
    }
    Ok((version, metadata, tensors))
}

#[cfg(test)]
mod tests {
    use super::fixture::{Gguf, Value};
    use super::*;

    fn open(bytes: &[u8]) -> (tempfile::TempDir, Result<GgufFile>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, bytes).unwrap();
        let r = GgufFile::open(&path);
        (dir, r)
    }

    fn sample() -> Gguf {
        let mut g = Gguf::new();
        g.kv("general.architecture", Value::Str("llama".into()));
        g.kv("general.name", Value::Str("tiny".into()));
        g.kv("llama.block_count", Value::U32(2));
        g.kv("llama.rope.freq_base", Value::F32(100000.0));
        g.kv("eps", Value::F32(1e-5));
        g.kv("wide", Value::U64(1 << 40));
        g.kv("negative", Value::I32(-3));
        g.kv("tokenizer.ggml.tokens", Value::StrArray(vec!["a".into(), "b".into(), "ab".into()]));
        g.kv("tokenizer.ggml.token_type", Value::I32Array(vec![1, 1, 3]));
        g.kv("tokenizer.ggml.scores", Value::F32Array(vec![-1.5, -0.0, f32::MIN_POSITIVE]));
        g.tensor_f32("a.weight", &[4, 3], &(0..12).map(|i| i as f32).collect::<Vec<_>>());
        g.tensor_raw("b.weight", &[32, 2], GgmlType::Q8_0, &[7u8; 68]);
        g
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let (_dir, f) = open(&sample().bytes());
        let f = f.unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.str("general.architecture").unwrap(), Some("llama"));
        assert_eq!(f.uint("llama.block_count").unwrap(), Some(2));
        assert_eq!(f.float("llama.rope.freq_base").unwrap(), Some(100000.0));
        assert_eq!(f.float("eps").unwrap(), Some(1e-5), "float32 1e-5 reads as the decimal 1e-5");
        assert_eq!(f.str_array("tokenizer.ggml.tokens").unwrap().unwrap(), vec!["a", "b", "ab"]);
        assert_eq!(f.int_array("tokenizer.ggml.token_type").unwrap().unwrap(), vec![1, 1, 3]);
        assert_eq!(f.f32_array("tokenizer.ggml.scores").unwrap().unwrap(), vec![-1.5, -0.0, f32::MIN_POSITIVE]);
        let err = f.f32_array("tokenizer.ggml.token_type").unwrap_err().to_string();
        assert!(err.ends_with("`tokenizer.ggml.token_type`: expected an array of float32, found an array of 3 items"), "{err}");
        assert_eq!(f.uint("absent").unwrap(), None);
        assert_eq!(f.uint("wide").unwrap(), Some(1 << 40));
        let err = f.uint("negative").unwrap_err().to_string();
        assert!(err.ends_with("expected a non-negative integer, found int32 -3"), "{err}");
        let a = f.tensor("a.weight").unwrap();
        assert_eq!((a.shape(), a.ty, a.n_elements()), (vec![3, 4], GgmlType::F32, 12));
        let a_data: Vec<f32> = f.tensor_data(a).chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(a_data, (0..12).map(|i| i as f32).collect::<Vec<_>>());
        let b = f.tensor("b.weight").unwrap();
        assert_eq!((b.shape(), b.ty, f.tensor_data(b)), (vec![2, 32], GgmlType::Q8_0, &[7u8; 68][..]));
        assert_eq!(f.tensor_data(b).as_ptr() as usize % 32, f.mmap.as_ptr() as usize % 32, "data is aligned");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let (_dir, f) = open(&sample().bytes());
        let f = f.unwrap();
        let err = f.uint("general.name").unwrap_err().to_string();
        assert!(err.ends_with("m.gguf: metadata key `general.name`: expected a non-negative integer, found string \"tiny\""), "{err}");
        let err = f.str_array("tokenizer.ggml.token_type").unwrap_err();
        assert!(matches!(err, Error::GgufKey { ref key, .. } if key == "tokenizer.ggml.token_type"), "{err}");
        let err = f.required("llama.context_length", f.uint("llama.context_length").unwrap()).unwrap_err().to_string();
        assert!(err.ends_with("metadata key `llama.context_length`: required key is missing"), "{err}");
    }

    #[test]
    fn every_truncation_is_an_error_naming_the_file() {
        let bytes = sample().bytes();
        for len in 0..bytes.len() {
            let (_dir, r) = open(&bytes[..len]);
            let err = r.expect_err("a truncated file must not open").to_string();
            assert!(err.contains("m.gguf: truncated:"), "cut at {len}: {err}");
        }
    }

    #[test]
    fn truncations_name_what_was_being_read() {
        let g = sample();
        let bytes = g.bytes();
        let key_at = find(&bytes, b"tokenizer.ggml.tokens");
        let (_dir, r) = open(&bytes[..key_at + 30]);
        let err = r.unwrap_err().to_string();
        assert!(err.contains("truncated: metadata key `tokenizer.ggml.tokens`: needs"), "{err}");
        let (_dir, r) = open(&bytes[..bytes.len() - 1]);
        let err = r.unwrap_err().to_string();
        assert!(err.contains("truncated: tensor b.weight: Q8_0 data of 68 bytes"), "{err}");
        assert!(err.contains(&format!("but the file has {} bytes", bytes.len() - 1)), "{err}");
    }

    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack.windows(needle.len()).position(|w| w == needle).expect("needle is in the file")
    }

    #[test]
    fn bad_magic_version_and_endianness_are_refused() {
        let mut bytes = sample().bytes();
        bytes[..4].copy_from_slice(b"GGML");
        let err = open(&bytes).1.unwrap_err().to_string();
        assert!(err.contains("m.gguf: malformed header: magic: not a GGUF file"), "{err}");
        let mut bytes = sample().bytes();
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        let err = open(&bytes).1.unwrap_err().to_string();
        assert!(err.ends_with("malformed header: version: GGUF version 1 is not supported (supported: 2, 3)"), "{err}");
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        let err = open(&bytes).1.unwrap_err().to_string();
        assert!(err.contains("big-endian"), "{err}");
        bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
        open(&bytes).1.expect("version 2 has the same layout");
    }

    #[test]
    fn unknown_types_bad_offsets_and_odd_rows_name_the_tensor() {
        let mut g = sample();
        g.tensors[1].type_id = 99;
        let err = open(&g.bytes()).1.unwrap_err().to_string();
        assert!(err.ends_with("m.gguf: tensor b.weight: unknown GGML type id 99"), "{err}");

        let mut g = sample();
        g.tensors[1].offset_override = Some(1 << 40);
        let err = open(&g.bytes()).1.unwrap_err().to_string();
        assert!(err.contains("truncated: tensor b.weight: Q8_0 data of 68 bytes at offset 1099511627776"), "{err}");

        let mut g = sample();
        g.tensors[1].offset_override = Some(u64::MAX - 31);
        assert!(open(&g.bytes()).1.unwrap_err().to_string().contains("tensor b.weight"));

        let mut g = sample();
        g.tensors[1].offset_override = Some(16);
        let err = open(&g.bytes()).1.unwrap_err().to_string();
        assert!(err.ends_with("tensor b.weight: data offset 16 is not a multiple of the alignment 32"), "{err}");

        let mut g = sample();
        g.tensors[1].offset_override = Some(0);
        let err = open(&g.bytes()).1.unwrap_err().to_string();
        assert!(err.contains("overlaps the data of tensor"), "{err}");

        let mut g = sample();
        g.tensors[1].dims = vec![16, 4];
        let err = open(&g.bytes()).1.unwrap_err().to_string();
        assert!(err.ends_with("tensor b.weight: rows of 16 elements are not a whole number of Q8_0 blocks (32 elements each)"), "{err}");
    }

    #[test]
    fn alignment_is_honoured_and_checked() {
        let mut g = sample();
        g.alignment = 64;
        g.kv("general.alignment", Value::U32(64));
        let (_dir, f) = open(&g.bytes());
        let f = f.unwrap();
        let b = f.tensor("b.weight").unwrap();
        assert_eq!(f.tensor_data(b), &[7u8; 68][..]);
        let mut g = sample();
        g.kv("general.alignment", Value::U32(48));
        let err = open(&g.bytes()).1.unwrap_err().to_string();
        assert!(err.ends_with("metadata key `general.alignment`: expected a power of two, found uint32 48"), "{err}");
    }

    #[test]
    fn lying_counts_do_not_allocate_and_are_errors() {
        let mut bytes = sample().bytes();
        // An array count of 2^60 strings in a file of a few hundred bytes.
        let at = find(&bytes, b"tokenizer.ggml.tokens") + "tokenizer.ggml.tokens".len() + 8;
        bytes[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let err = open(&bytes).1.unwrap_err().to_string();
        assert!(err.contains("truncated: metadata key `tokenizer.ggml.tokens`"), "{err}");
        let mut bytes = sample().bytes();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // metadata count
        assert!(open(&bytes).1.unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn duplicate_keys_and_tensors_are_refused() {
        let mut g = sample();
        g.kv("general.name", Value::Str("again".into()));
        let err = open(&g.bytes()).1.unwrap_err().to_string();
        assert!(err.ends_with("metadata key `general.name`: the key appears twice"), "{err}");
        let mut g = sample();
        g.tensor_f32("a.weight", &[4], &[0.0; 4]);
        let err = open(&g.bytes()).1.unwrap_err().to_string();
        assert!(err.ends_with("tensor a.weight: the name appears twice in the tensor infos"), "{err}");
    }

    #[test]
    fn type_table_matches_ggml() {
        assert_eq!(GgmlType::from_id(12), Some(GgmlType::Q4_K));
        assert_eq!(GgmlType::from_id(4), None, "ids 4 and 5 (Q4_2, Q4_3) were removed from ggml");
        for t in GgmlType::all() {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
        // Bytes per block from the block structs of ggml-common.h.
        assert_eq!(GgmlType::Q4_K.block_bytes(), 2 + 2 + 12 + 128);
        assert_eq!(GgmlType::Q5_K.block_bytes(), 2 + 2 + 12 + 32 + 128);
        assert_eq!(GgmlType::Q6_K.block_bytes(), 128 + 64 + 16 + 2);
        assert_eq!(GgmlType::Q3_K.block_bytes(), 32 + 64 + 12 + 2);
        assert_eq!(GgmlType::Q2_K.block_bytes(), 16 + 64 + 2 + 2);
    }
}
