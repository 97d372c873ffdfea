//! The safetensors format: reading (memory-mapped, checked) and writing.
//!
//! A file is an 8-byte little-endian header length `N`, `N` bytes of JSON mapping each tensor name
//! to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the end of the header), and
//! the data. [`SafetensorsFile::open`] checks every claim of the header against the file before any
//! tensor is read: a truncated file, a header longer than the file, offsets past the end or a byte
//! count that disagrees with dtype x shape are errors naming the file and the tensor. Tensor bytes
//! are then borrowed straight from the mapping; nothing is read until asked for.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use awq_kernels::{DType, HostStaging, Tensor};
use rayon::prelude::*;
use memmap2::Mmap;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Element types a safetensors file may hold. Float types become [`Tensor`]s; integer types are
/// read as raw bytes (packed AWQ weights are I32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StDtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StDtype {
    fn parse(s: &str) -> Option<StDtype> {
        Some(match s {
            "F32" => StDtype::F32,
            "F16" => StDtype::F16,
            "BF16" => StDtype::BF16,
            "F64" => StDtype::F64,
            "I64" => StDtype::I64,
            "I32" => StDtype::I32,
            "I16" => StDtype::I16,
            "I8" => StDtype::I8,
            "U8" => StDtype::U8,
            "BOOL" => StDtype::Bool,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            StDtype::F32 => "F32",
            StDtype::F16 => "F16",
            StDtype::BF16 => "BF16",
            StDtype::F64 => "F64",
            StDtype::I64 => "I64",
            StDtype::I32 => "I32",
            StDtype::I16 => "I16",
            StDtype::I8 => "I8",
            StDtype::U8 => "U8",
            StDtype::Bool => "BOOL",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            StDtype::F64 | StDtype::I64 => 8,
            StDtype::F32 | StDtype::I32 => 4,
            StDtype::F16 | StDtype::BF16 | StDtype::I16 => 2,
            StDtype::I8 | StDtype::U8 | StDtype::Bool => 1,
        }
    }

    /// The tensor dtype for float types; `None` for the rest.
    pub fn float(self) -> Option<DType> {
        match self {
            StDtype::F32 => Some(DType::F32),
            StDtype::F16 => Some(DType::F16),
            StDtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

impl From<DType> for StDtype {
    fn from(d: DType) -> StDtype {
        match d {
            DType::F32 => StDtype::F32,
            DType::F16 => StDtype::F16,
            DType::BF16 => StDtype::BF16,
        }
    }
}

/// One tensor's header entry, checked against the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    begin: usize,
    end: usize,
}

/// Whether every value of little-endian `bytes` of `dtype` is finite: the exponent bits are not all
/// ones. In parallel pieces: this runs over every weight a stage loads.
pub(crate) fn all_finite_le(dtype: DType, bytes: &[u8]) -> bool {
    let (size, exponent): (usize, u32) = match dtype {
        DType::F32 => (4, 0x7f80_0000),
        DType::F16 => (2, 0x7c00),
        DType::BF16 => (2, 0x7f80),
    };
    bytes.par_chunks(1 << 20).all(|piece| {
        piece.chunks_exact(size).all(|v| {
            let bits = if size == 4 { u32::from_le_bytes([v[0], v[1], v[2], v[3]]) } else { u16::from_le_bytes([v[0], v[1]]) as u32 };
            bits & exponent != exponent
        })
    })
}

impl TensorInfo {
    /// The tensor's size in the file, in bytes.
    pub fn byte_len(&self) -> usize {
        self.end - self.begin
    }
}

/// Refuse headers beyond this size: real ones are kilobytes to a few megabytes, and a lying length
/// must not make us allocate gigabytes.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// A safetensors file (memory-mapped, or a buffer received over the network) whose header has
/// been checked.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    data: Backing,
    /// The open file behind a mapping: [`SafetensorsFile::tensor_staged`] reads with `pread`.
    file: Option<File>,
    tensors: BTreeMap<String, TensorInfo>,
}

#[derive(Debug)]
enum Backing {
    Mapped(Mmap),
    Owned(Vec<u8>),
    /// Bytes another owner keeps too (a worker's kept blocks, `SafetensorsFile::from_shared`).
    Shared(Arc<Vec<u8>>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
            Backing::Shared(v) => v,
        }
    }
}

impl SafetensorsFile {
    /// Maps `path` and checks its header; see the module docs for what is checked.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(Error::io(&path))?;
        // SAFETY: the mapping is read-only; if another process truncates the file while it is
        // mapped, reads fault (SIGBUS), which is the documented hazard of memory-mapped checkpoints
        // in every loader of this format.
        let mmap = unsafe { Mmap::map(&file) }.map_err(Error::io(&path))?;
        let tensors = parse_header(&path, &mmap)?;
        Ok(SafetensorsFile { path, data: Backing::Mapped(mmap), file: Some(file), tensors })
    }

    /// Checks a safetensors file held in memory; `name` stands for its path in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<SafetensorsFile> {
        let path = name.into();
        let tensors = parse_header(&path, &bytes)?;
        Ok(SafetensorsFile { path, data: Backing::Owned(bytes), file: None, tensors })
    }

    /// [`SafetensorsFile::from_bytes`] of bytes shared with another owner, not copied.
    pub fn from_shared(name: impl Into<PathBuf>, bytes: Arc<Vec<u8>>) -> Result<SafetensorsFile> {
        let path = name.into();
        let tensors = parse_header(&path, &bytes)?;
        Ok(SafetensorsFile { path, data: Backing::Shared(bytes), file: None, tensors })
    }

    /// Every tensor, copied out as [`RawTensor`]s in name order.
    pub fn raw_tensors(&self) -> Vec<RawTensor> {
        self.tensors
            .iter()
            .map(|(name, info)| RawTensor {
                name: name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                data: self.data[info.begin..info.end].to_vec(),
            })
            .collect()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file, header and data, as mapped or held.
    pub fn contents(&self) -> &[u8] {
        &self.data
    }

    /// Tensor names and their checked header entries, in name order.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The raw little-endian bytes of a tensor, borrowed from the mapping.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            hint: String::new(),
        })?;
        Ok(&self.data[info.begin..info.end])
    }

    /// A float tensor's header entry and dtype; a missing or non-float tensor is an error naming it.
    fn float_info(&self, name: &str) -> Result<(&TensorInfo, DType)> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            hint: String::new(),
        })?;
        let dtype = info.dtype.float().ok_or_else(|| Error::DTypeMismatch {
            path: self.path.clone(),
            tensor: name.to_string(),
            expected: "a float type (F16, BF16, F32)".into(),
            got: info.dtype.name().into(),
        })?;
        Ok((info, dtype))
    }

    /// A float tensor, copied out of the mapping in its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let (info, dtype) = self.float_info(name)?;
        Ok(Tensor::from_le_bytes(dtype, &info.shape, &self.data[info.begin..info.end])?)
    }

    /// A float tensor on `staging`'s device, in its stored dtype, read into the staging buffer
    /// (with `pread` in parallel pieces: no page faults on the mapping, no fresh host buffer) and
    /// checked there: NaN or infinite values are an error naming the tensor.
    pub fn tensor_staged(&self, name: &str, staging: &mut HostStaging) -> Result<Tensor> {
        let (info, dtype) = self.float_info(name)?;
        let buf = staging.buffer(info.end - info.begin)?;
        const PIECE: usize = 8 << 20;
        match &self.file {
            Some(file) => {
                use std::os::unix::fs::FileExt;
                buf.par_chunks_mut(PIECE)
                    .enumerate()
                    .try_for_each(|(k, piece)| file.read_exact_at(piece, (info.begin + k * PIECE) as u64))
                    .map_err(Error::io(&self.path))?;
            }
            None => buf.copy_from_slice(&self.data[info.begin..info.end]),
        }
        if !all_finite_le(dtype, buf) {
            return Err(Error::non_finite(&self.path, name));
        }
        Ok(staging.upload(dtype, &info.shape)?)
    }

    /// An I32 tensor's values (packed quantized weights).
    pub fn i32_values(&self, name: &str) -> Result<Vec<i32>> {
        let bytes = self.bytes(name)?;
        let info = &self.tensors[name];
        if info.dtype != StDtype::I32 {
            return Err(Error::DTypeMismatch {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: "I32".into(),
                got: info.dtype.name().into(),
            });
        }
        Ok(bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }
}

fn parse_header(path: &Path, data: &[u8]) -> Result<BTreeMap<String, TensorInfo>> {
    let file_len = data.len() as u64;
    let Some(len_bytes) = data.get(..8) else {
        return Err(Error::Truncated {
            path: path.into(),
            detail: format!("{file_len} bytes, less than the 8-byte header length"),
        });
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("slice of 8 bytes"));
    if header_len > MAX_HEADER_BYTES {
        return Err(Error::BadHeader {
            path: path.into(),
            detail: format!("header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"),
        });
    }
    if 8 + header_len > file_len {
        return Err(Error::Truncated {
            path: path.into(),
            detail: format!("header length {header_len} reaches past the end of the file ({file_len} bytes)"),
        });
    }
    let data_start = 8 + header_len as usize;
    let header: Map<String, Value> = serde_json::from_slice(&data[8..data_start])
        .map_err(|e| Error::BadHeader { path: path.into(), detail: format!("not a JSON object: {e}") })?;

    let mut tensors = BTreeMap::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |detail: String| Error::BadTensor { path: path.into(), tensor: name.clone(), detail };
        let dtype_name = entry.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("no dtype".into()))?;
        let dtype = StDtype::parse(dtype_name).ok_or_else(|| bad(format!("unknown dtype {dtype_name}")))?;
        let shape = entry
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|dims| dims.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad("shape is not a list of non-negative integers".into()))?;
        let offsets = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|o| match o[..] {
                [ref b, ref e] => Some((b.as_u64()?, e.as_u64()?)),
                _ => None,
            })
            .ok_or_else(|| bad("data_offsets is not a pair of integers".into()))?;
        let n_bytes = shape
            .iter()
            .try_fold(dtype.size_bytes() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        let (begin, end) = offsets;
        if end < begin || end - begin != n_bytes {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] hold {} bytes, but {dtype_name} x {shape:?} needs {n_bytes}",
                end.saturating_sub(begin)
            )));
        }
        let abs_end = (data_start as u64).checked_add(end).filter(|&e| e <= file_len).ok_or_else(|| Error::Truncated {
            path: path.into(),
            detail: format!(
                "tensor {name}: data ends at byte {} but the file has {file_len} bytes",
                data_start as u128 + end as u128
            ),
        })?;
        tensors.insert(name, TensorInfo { dtype, shape, begin: data_start + begin as usize, end: abs_end as usize });
    }
    Ok(tensors)
}

/// A tensor to be written: name, dtype, shape and little-endian bytes.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// A float tensor in its own dtype (errors: copying a device tensor's bytes to the host).
    pub fn from_tensor(name: impl Into<String>, t: &Tensor) -> Result<RawTensor> {
        Ok(RawTensor { name: name.into(), dtype: t.dtype().into(), shape: t.shape().to_vec(), data: t.to_le_bytes()? })
    }

    /// An I32 tensor (packed quantized weights).
    pub fn from_i32(name: impl Into<String>, shape: &[usize], values: &[i32]) -> RawTensor {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        RawTensor { name: name.into(), dtype: StDtype::I32, shape: shape.to_vec(), data }
    }
}

/// What a header says of one tensor: its name, dtype and shape (the byte count follows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// dtype x shape, in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size_bytes() as u64
    }

    /// `F16 [4096, 128]`, for messages.
    pub fn describe(&self) -> String {
        format!("{} {:?}", self.dtype.name(), self.shape)
    }
}

impl RawTensor {
    /// Its name, dtype and shape.
    pub fn spec(&self) -> TensorSpec {
        TensorSpec { name: self.name.clone(), dtype: self.dtype, shape: self.shape.clone() }
    }
}

/// The bytes of a file before its tensor data: the 8-byte little-endian header length, then the
/// JSON header for `tensors` stored back to back in the order given, padded with spaces to a
/// multiple of 8 bytes as the reference implementation does, so tensor data stays aligned. The one
/// encoding of a header: [`serialize`], [`write`] and the checkpoint writer's shards use it.
pub(crate) fn header_bytes<'a>(tensors: impl IntoIterator<Item = &'a TensorSpec>, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("string map serialises"));
    }
    let mut offset = 0u64;
    for t in tensors {
        let len = t.len_bytes();
        header.insert(t.name.clone(), serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + len]}));
        offset += len;
    }
    let mut json = serde_json::to_vec(&header).expect("JSON map serialises");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + json.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    bytes
}

/// Checks that `len_bytes` is what `spec`'s dtype and shape need; `path` names the file in the
/// error.
pub(crate) fn check_len(path: &Path, spec: &TensorSpec, len_bytes: usize) -> Result<()> {
    if spec.len_bytes() != len_bytes as u64 {
        return Err(Error::BadTensor {
            path: path.into(),
            tensor: spec.name.clone(),
            detail: format!("{len_bytes} bytes given for {} ({} bytes)", spec.describe(), spec.len_bytes()),
        });
    }
    Ok(())
}

/// Writes `tensors` as one safetensors file to `out`, in the order given (callers sort, so output
/// bytes are deterministic); see [`header_bytes`] for the header. `path` only names the file in
/// errors.
fn serialize_into(out: &mut impl Write, path: &Path, tensors: &[RawTensor], metadata: &BTreeMap<String, String>) -> Result<()> {
    let specs: Vec<TensorSpec> = tensors.iter().map(RawTensor::spec).collect();
    for (spec, t) in specs.iter().zip(tensors) {
        check_len(path, spec, t.data.len())?;
    }
    let mut put = |bytes: &[u8]| out.write_all(bytes).map_err(Error::io(path));
    put(&header_bytes(&specs, metadata))?;
    for t in tensors {
        put(&t.data)?;
    }
    Ok(())
}

/// Serialises `tensors` as one safetensors file in memory (see [`write`] for the layout).
pub fn serialize(path: &Path, tensors: &[RawTensor], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(tensors.iter().map(|t| t.data.len()).sum::<usize>() + 4096);
    serialize_into(&mut out, path, tensors, metadata)?;
    Ok(out)
}

/// Writes `tensors` to `path` as one safetensors file, in the order given (callers sort, so output
/// bytes are deterministic), streaming to disk, and syncs it. The header is padded with spaces to
/// a multiple of 8 bytes, as the reference implementation does, so tensor data stays aligned.
pub fn write(path: &Path, tensors: &[RawTensor], metadata: &BTreeMap<String, String>) -> Result<()> {
    let file = File::create(path).map_err(Error::io(path))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    serialize_into(&mut w, path, tensors, metadata)?;
    let file = w.into_inner().map_err(|e| Error::io(path)(e.into_error()))?;
    file.sync_all().map_err(Error::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> PathBuf {
        let path = dir.join("a.safetensors");
        let t = Tensor::from_f32(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap().into_dtype(DType::F16);
        let tensors =
            vec![RawTensor::from_tensor("w", &t).unwrap(), RawTensor::from_i32("q", &[2], &[-1, 0x7654_3210])];
        write(&path, &tensors, &BTreeMap::from([("format".to_string(), "pt".to_string())])).unwrap();
        path
    }

    #[test]
    fn round_trips_float_and_int_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let f = SafetensorsFile::open(sample(dir.path())).unwrap();
        assert_eq!(f.tensor("w").unwrap().to_f32_vec().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(f.i32_values("q").unwrap(), vec![-1, 0x7654_3210]);
        assert!(matches!(f.tensor("q"), Err(Error::DTypeMismatch { .. })));
        assert!(matches!(f.tensor("nope"), Err(Error::MissingTensor { tensor, .. }) if tensor == "nope"));
    }

    /// Opens a corrupted copy of the sample file and returns the error message.
    fn corrupt(edit: impl FnOnce(&mut Vec<u8>)) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        edit(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let err = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("a.safetensors"), "error must name the file: {err}");
        err
    }

    #[test]
    fn truncated_data_names_the_tensor() {
        let err = corrupt(|b| b.truncate(b.len() - 3));
        assert!(err.contains("truncated") && err.contains("tensor q"), "{err}");
    }

    #[test]
    fn header_longer_than_file_is_refused() {
        let err = corrupt(|b| b[..8].copy_from_slice(&(1u64 << 20).to_le_bytes()));
        assert!(err.contains("header length 1048576 reaches past the end"), "{err}");
        let err = corrupt(|b| b.truncate(5));
        assert!(err.contains("less than the 8-byte header length"), "{err}");
    }

    #[test]
    fn lying_offsets_and_garbage_headers_are_refused() {
        let err = corrupt(|b| {
            let text = String::from_utf8_lossy(&b[8..]).into_owned();
            let i = text.find("[0,12]").expect("offsets of w");
            b[8 + i..8 + i + 6].copy_from_slice(b"[0,10]");
        });
        assert!(err.contains("tensor w") && err.contains("needs 12"), "{err}");
        let err = corrupt(|b| b[8] = b'x');
        assert!(err.contains("malformed header"), "{err}");
    }
}
