//! The tensor type: a shape, a dtype and row-major storage on a device.
//!
//! Storage is host memory (a `Vec` of the dtype) or, with the `cuda` feature, a buffer on a CUDA
//! device (`cuda::CudaStorage`). [`Tensor::to_device`] moves data between them; ops run
//! where their operands are. The host accessors (`f32_values`, `to_f32_vec`, `to_le_bytes`,
//! `all_finite`) also work on a CUDA tensor by copying it to the host first, so they return a
//! `Result`: the copy's error (a lost device) is theirs. On a host tensor they cannot fail.

use std::borrow::Cow;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::{DType, Device, Error, Result};

/// A dense row-major tensor.
///
/// Storage keeps the dtype it was created with (a checkpoint's fp16 weights stay fp16 until an op
/// reads them); ops read any dtype, compute in f32 and write their output in the dtype the caller
/// asks for. Cloning copies host data; a clone of a CUDA tensor shares the device buffer until one
/// of them is written in place (`add_assign` copies a shared buffer first), so a clone never sees
/// the other's changes either way.
///
/// Equality compares shape, dtype, device and values (CUDA values are copied to the host to be
/// compared; a failed copy compares unequal).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

#[derive(Clone, Debug)]
enum Storage {
    Host(Host),
    #[cfg(feature = "cuda")]
    Cuda(CudaStorage),
}

/// Values in host memory, in one of the storage dtypes (also what a device buffer copies back to).
#[derive(Clone, Debug, PartialEq)]
enum Host {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl PartialEq for Storage {
    fn eq(&self, other: &Storage) -> bool {
        match (self, other) {
            (Storage::Host(a), Storage::Host(b)) => a == b,
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => {
                a.same_buffer(b)
                    || (a.dev().device() == b.dev().device()
                        && matches!((download(a), download(b)), (Ok(x), Ok(y)) if x == y))
            }
            #[cfg(feature = "cuda")]
            _ => false,
        }
    }
}

impl Host {
    fn dtype(&self) -> DType {
        match self {
            Host::F32(_) => DType::F32,
            Host::F16(_) => DType::F16,
            Host::BF16(_) => DType::BF16,
        }
    }

    /// The values as f32: borrowed when they are f32, converted otherwise.
    fn f32_values(&self) -> Cow<'_, [f32]> {
        match self {
            Host::F32(v) => Cow::Borrowed(v),
            Host::F16(v) => {
                let mut out = vec![0.0f32; v.len()];
                v.convert_to_f32_slice(&mut out);
                Cow::Owned(out)
            }
            Host::BF16(v) => {
                let mut out = vec![0.0f32; v.len()];
                v.convert_to_f32_slice(&mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Little-endian bytes in the values' own dtype.
    fn le_bytes(&self) -> Vec<u8> {
        match self {
            Host::F32(v) => le_bytes(v, |x| x.to_le_bytes()),
            Host::F16(v) => le_bytes(v, |x| x.to_bits().to_le_bytes()),
            Host::BF16(v) => le_bytes(v, |x| x.to_bits().to_le_bytes()),
        }
    }

    fn all_finite(&self) -> bool {
        match self {
            Host::F32(v) => v.par_iter().with_min_len(1 << 16).all(|x| x.is_finite()),
            Host::F16(v) => v.par_iter().with_min_len(1 << 16).all(|x| x.is_finite()),
            Host::BF16(v) => v.par_iter().with_min_len(1 << 16).all(|x| x.is_finite()),
        }
    }
}

#[cfg(feature = "cuda")]
use crate::cuda::{CudaBuf, CudaDevice, CudaStorage};

/// The host copy of a CUDA tensor's data.
#[cfg(feature = "cuda")]
fn download(c: &CudaStorage) -> Result<Host> {
    let dev = c.dev();
    Ok(match c.buf() {
        CudaBuf::F32(s) => Host::F32(dev.download(s)?),
        CudaBuf::F16(s) => Host::F16(dev.download(s)?),
        CudaBuf::BF16(s) => Host::BF16(dev.download(s)?),
    })
}

fn check_len(shape: &[usize], got: usize) -> Result<()> {
    let expected = shape.iter().product::<usize>();
    if expected != got {
        return Err(Error::ElementCount { shape: shape.to_vec(), expected, got });
    }
    Ok(())
}

impl Tensor {
    /// An f32 tensor over `data` (row-major); fails if `data` has the wrong length for `shape`.
    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Host(Host::F32(data)) })
    }

    /// An f16 tensor over `data`.
    pub fn from_f16(shape: &[usize], data: Vec<f16>) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Host(Host::F16(data)) })
    }

    /// A bf16 tensor over `data`.
    pub fn from_bf16(shape: &[usize], data: Vec<bf16>) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Host(Host::BF16(data)) })
    }

    /// Decodes little-endian bytes (the safetensors layout) of the given dtype.
    pub fn from_le_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
        let n = bytes.len() / dtype.size_bytes();
        check_len(shape, n)?;
        if bytes.len() != n * dtype.size_bytes() {
            return Err(Error::ElementCount { shape: shape.to_vec(), expected: n, got: bytes.len() });
        }
        // In parallel: a block of a large model is hundreds of MB read from a memory map, and this
        // decode is on the path of every block a stage loads.
        const MIN_LEN: usize = 1 << 16;
        let host = match dtype {
            DType::F32 => Host::F32(
                bytes.par_chunks_exact(4).with_min_len(MIN_LEN).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            ),
            DType::F16 => Host::F16(
                bytes.par_chunks_exact(2).with_min_len(MIN_LEN).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect(),
            ),
            DType::BF16 => Host::BF16(
                bytes.par_chunks_exact(2).with_min_len(MIN_LEN).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect(),
            ),
        };
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Host(host) })
    }

    /// The data as little-endian bytes in the tensor's own dtype (the safetensors layout).
    ///
    /// Errors: for a CUDA tensor, the copy to the host's (see the module docs).
    pub fn to_le_bytes(&self) -> Result<Vec<u8>> {
        match &self.storage {
            Storage::Host(h) => Ok(h.le_bytes()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => Ok(download(c)?.le_bytes()),
        }
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        let host = match dtype {
            DType::F32 => Host::F32(vec![0.0; n]),
            DType::F16 => Host::F16(vec![f16::ZERO; n]),
            DType::BF16 => Host::BF16(vec![bf16::ZERO; n]),
        };
        Tensor { shape: shape.to_vec(), storage: Storage::Host(host) }
    }

    /// A zero tensor on `device` (on a CUDA device zeroed there, nothing copied from the host).
    ///
    /// Errors: what opening the device or allocating reports.
    pub fn zeros_on(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Ok(Tensor::zeros(shape, dtype)),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let dev = CudaDevice::get(n)?;
                let buf = dev.zeros_buf(dtype, shape.iter().product())?;
                Ok(Tensor::from_cuda(shape, CudaStorage::new(dev, buf)))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => device.check_available().map(|_| Tensor::zeros(shape, dtype)),
        }
    }

    /// Builds a tensor of `dtype` from f32 values, rounding to nearest even where narrowing.
    pub fn from_f32_as(shape: &[usize], data: Vec<f32>, dtype: DType) -> Result<Tensor> {
        Tensor::from_f32(shape, data).map(|t| t.into_dtype(dtype))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Host(h) => h.dtype(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => c.buf().dtype(),
        }
    }

    /// The device the data lives on.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Host(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => c.dev().device(),
        }
    }

    /// A copy of this tensor on `device` (host <-> device, or device to device); a clone when it is
    /// already there.
    ///
    /// Errors: [`Error::CudaUnavailable`] in a build without the `cuda` feature; with it, whatever
    /// opening the device or the copy reports ([`Error::CudaLibraryNotFound`],
    /// [`Error::NoSuchCudaDevice`], `Error::CudaDriver`).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        #[cfg(not(feature = "cuda"))]
        {
            // Every tensor of this build is on the CPU, so `device` is a CUDA device.
            device.check_available()?;
            Ok(self.clone())
        }
        #[cfg(feature = "cuda")]
        {
            let storage = match (&self.storage, device) {
                (Storage::Cuda(c), Device::Cpu) => Storage::Host(download(c)?),
                (Storage::Cuda(c), Device::Cuda(n)) => {
                    let dev = CudaDevice::get(n)?;
                    let buf = dev.copy_buf(c.buf())?;
                    Storage::Cuda(CudaStorage::new(dev, buf))
                }
                (Storage::Host(host), Device::Cuda(n)) => {
                    let dev = CudaDevice::get(n)?;
                    let buf = match host {
                        Host::F32(v) => CudaBuf::F32(dev.upload(v)?),
                        Host::F16(v) => CudaBuf::F16(dev.upload(v)?),
                        Host::BF16(v) => CudaBuf::BF16(dev.upload(v)?),
                    };
                    Storage::Cuda(CudaStorage::new(dev, buf))
                }
                // Returned above (already there).
                (Storage::Host(_), Device::Cpu) => self.storage.clone(),
            };
            Ok(Tensor { shape: self.shape.clone(), storage })
        }
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// The two dimensions of a matrix, or a shape error naming `op`.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(Error::Shape { op, detail: format!("expected a matrix, got shape {:?}", self.shape) }),
        }
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(self, shape: &[usize]) -> Result<Tensor> {
        check_len(shape, self.elem_count())?;
        Ok(Tensor { shape: shape.to_vec(), storage: self.storage })
    }

    /// Converts to another dtype (a no-op when it already has it), on the tensor's device.
    ///
    /// # Panics
    /// For a CUDA tensor, if the conversion kernel fails; [`crate::ops::cast`] returns that error.
    #[cfg_attr(not(feature = "cuda"), allow(clippy::infallible_destructuring_match))]
    pub fn into_dtype(self, dtype: DType) -> Tensor {
        if self.dtype() == dtype {
            return self;
        }
        let host = match &self.storage {
            Storage::Host(host) => host,
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {
                return crate::ops::cast(&self, dtype)
                    .unwrap_or_else(|e| panic!("converting a tensor to {dtype} on {} failed: {e}", self.device()))
            }
        };
        let values = host.f32_values().into_owned();
        let host = match dtype {
            DType::F32 => Host::F32(values),
            DType::F16 => {
                let mut out = vec![f16::ZERO; values.len()];
                out.convert_from_f32_slice(&values);
                Host::F16(out)
            }
            DType::BF16 => {
                let mut out = vec![bf16::ZERO; values.len()];
                out.convert_from_f32_slice(&values);
                Host::BF16(out)
            }
        };
        Tensor { shape: self.shape, storage: Storage::Host(host) }
    }

    /// The values as f32: borrowed when stored as f32 on the host, converted (and copied from the
    /// device) otherwise.
    ///
    /// Errors: for a CUDA tensor, the copy to the host's (see the module docs).
    pub fn f32_values(&self) -> Result<Cow<'_, [f32]>> {
        match &self.storage {
            Storage::Host(h) => Ok(h.f32_values()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => Ok(Cow::Owned(download(c)?.f32_values().into_owned())),
        }
    }

    /// The values as a new f32 vector (copied from the device for a CUDA tensor; errors as
    /// [`Tensor::f32_values`]).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        self.f32_values().map(Cow::into_owned)
    }

    /// Mutable access to f32 host storage, for ops that work in place; `None` for other dtypes and
    /// for tensors on a CUDA device.
    pub(crate) fn f32_values_mut(&mut self) -> Option<&mut [f32]> {
        match &mut self.storage {
            Storage::Host(Host::F32(v)) => Some(v),
            _ => None,
        }
    }

    /// Rows `start..end` of a matrix, copied.
    pub fn rows(&self, start: usize, end: usize) -> Result<Tensor> {
        let (r, c) = self.dims2("rows")?;
        if start > end || end > r {
            return Err(Error::Index { op: "rows", index: end, len: r });
        }
        let shape = [end - start, c];
        let (a, b) = (start * c, end * c);
        let storage = match &self.storage {
            Storage::Host(Host::F32(v)) => Storage::Host(Host::F32(v[a..b].to_vec())),
            Storage::Host(Host::F16(v)) => Storage::Host(Host::F16(v[a..b].to_vec())),
            Storage::Host(Host::BF16(v)) => Storage::Host(Host::BF16(v[a..b].to_vec())),
            #[cfg(feature = "cuda")]
            Storage::Cuda(cs) => {
                let dev = cs.dev();
                let (stream, copy_error) = (dev.stream(), dev.driver_error("cuMemcpyDtoD"));
                let buf = if a == b {
                    dev.alloc_buf(self.dtype(), 0)?
                } else {
                    match cs.buf() {
                        CudaBuf::F32(s) => CudaBuf::F32(stream.clone_dtod(&s.slice(a..b)).map_err(copy_error)?),
                        CudaBuf::F16(s) => CudaBuf::F16(stream.clone_dtod(&s.slice(a..b)).map_err(copy_error)?),
                        CudaBuf::BF16(s) => CudaBuf::BF16(stream.clone_dtod(&s.slice(a..b)).map_err(copy_error)?),
                    }
                };
                Storage::Cuda(CudaStorage::new(dev.clone(), buf))
            }
        };
        Ok(Tensor { shape: shape.to_vec(), storage })
    }

    /// Writes `src`'s rows over rows `start..start + src rows` of this matrix, in place (same
    /// columns, dtype and device; on a device the copy is queued on its stream). A buffer shared with
    /// a clone is copied first, as for every in-place write.
    ///
    /// Errors: [`Error::Shape`], [`Error::DType`], [`Error::DeviceMismatch`] when they differ;
    /// [`Error::Index`] when the rows run past the end.
    pub fn write_rows(&mut self, start: usize, src: &Tensor) -> Result<()> {
        let ((r, c), (n, src_c)) = (self.dims2("write_rows")?, src.dims2("write_rows")?);
        if c != src_c {
            return Err(Error::Shape { op: "write_rows", detail: format!("{n}x{src_c} rows into a {r}x{c} matrix") });
        }
        if src.dtype() != self.dtype() {
            return Err(Error::DType { op: "write_rows", dtype: src.dtype() });
        }
        if start + n > r {
            return Err(Error::Index { op: "write_rows", index: start + n, len: r });
        }
        let (a, b) = (start * c, (start + n) * c);
        match (&mut self.storage, &src.storage) {
            (Storage::Host(Host::F32(d)), Storage::Host(Host::F32(s))) => d[a..b].copy_from_slice(s),
            (Storage::Host(Host::F16(d)), Storage::Host(Host::F16(s))) => d[a..b].copy_from_slice(s),
            (Storage::Host(Host::BF16(d)), Storage::Host(Host::BF16(s))) => d[a..b].copy_from_slice(s),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(dst), Storage::Cuda(s)) if dst.dev().device() == s.dev().device() => {
                if a == b {
                    return Ok(());
                }
                let dev = dst.dev().clone();
                let (stream, copy_error) = (dev.stream(), dev.driver_error("cuMemcpyDtoD"));
                match (dst.buf_mut()?, s.buf()) {
                    (CudaBuf::F32(d), CudaBuf::F32(s)) => stream.memcpy_dtod(s, &mut d.slice_mut(a..b)),
                    (CudaBuf::F16(d), CudaBuf::F16(s)) => stream.memcpy_dtod(s, &mut d.slice_mut(a..b)),
                    (CudaBuf::BF16(d), CudaBuf::BF16(s)) => stream.memcpy_dtod(s, &mut d.slice_mut(a..b)),
                    _ => return Err(Error::DType { op: "write_rows", dtype: src.dtype() }),
                }
                .map_err(copy_error)?;
            }
            _ => return Err(Error::DeviceMismatch { op: "write_rows", first: self.device(), other: src.device() }),
        }
        Ok(())
    }

    /// Whether every value is finite (no NaN, no infinity).
    ///
    /// Errors: for a CUDA tensor, the copy to the host's (see the module docs).
    pub fn all_finite(&self) -> Result<bool> {
        match &self.storage {
            Storage::Host(h) => Ok(h.all_finite()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => Ok(download(c)?.all_finite()),
        }
    }
}

/// `values` encoded by `encode` one after another, in parallel pieces (a model's embedding table is
/// a gigabyte, and whole checkpoints pass through here when they are written).
fn le_bytes<T: Sync, const N: usize>(values: &[T], encode: impl Fn(&T) -> [u8; N] + Sync) -> Vec<u8> {
    const PIECE: usize = 1 << 16;
    let mut out = vec![0u8; values.len() * N];
    out.par_chunks_mut(PIECE * N).zip(values.par_chunks(PIECE)).for_each(|(bytes, piece)| {
        for (b, v) in bytes.chunks_exact_mut(N).zip(piece) {
            b.copy_from_slice(&encode(v));
        }
    });
    out
}

/// What the CUDA launchers of the ops need from a tensor.
#[cfg(feature = "cuda")]
impl Tensor {
    /// A tensor over device data; `storage` must hold exactly `shape`'s element count.
    pub(crate) fn from_cuda(shape: &[usize], storage: CudaStorage) -> Tensor {
        debug_assert_eq!(storage.buf().len(), shape.iter().product::<usize>(), "device buffer length vs shape");
        Tensor { shape: shape.to_vec(), storage: Storage::Cuda(storage) }
    }

    /// The device data, for a tensor on a CUDA device.
    pub(crate) fn cuda_storage(&self) -> Option<&CudaStorage> {
        match &self.storage {
            Storage::Cuda(c) => Some(c),
            _ => None,
        }
    }

    pub(crate) fn cuda_storage_mut(&mut self) -> Option<&mut CudaStorage> {
        match &mut self.storage {
            Storage::Cuda(c) => Some(c),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_round_trip_keeps_bits() {
        let vals = vec![1.5f32, -0.0, 65504.0, 1e-7, -3.25, 0.1];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = Tensor::from_f32_as(&[2, 3], vals.clone(), dtype).unwrap();
            let back = Tensor::from_le_bytes(dtype, &[2, 3], &t.to_le_bytes().unwrap()).unwrap();
            assert_eq!(t, back, "{dtype}");
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        assert!(matches!(
            Tensor::from_f32(&[2, 3], vec![0.0; 5]),
            Err(Error::ElementCount { expected: 6, got: 5, .. })
        ));
        assert!(Tensor::from_le_bytes(DType::F16, &[3], &[0u8; 5]).is_err());
        let t = Tensor::zeros(&[4, 2], DType::F32);
        assert!(t.rows(3, 5).is_err());
        assert_eq!(t.rows(1, 3).unwrap().shape(), &[2, 2]);
    }

    #[test]
    fn write_rows_overwrites_only_its_rows() {
        let mut t = Tensor::from_f32_as(&[4, 2], (0..8).map(|v| v as f32).collect(), DType::F16).unwrap();
        let src = Tensor::from_f32_as(&[2, 2], vec![-1.0, -2.0, -3.0, -4.0], DType::F16).unwrap();
        t.write_rows(1, &src).unwrap();
        assert_eq!(t.to_f32_vec().unwrap(), [0.0, 1.0, -1.0, -2.0, -3.0, -4.0, 6.0, 7.0]);
        assert!(matches!(t.write_rows(3, &src), Err(Error::Index { index: 5, len: 4, .. })));
        assert!(matches!(t.write_rows(0, &src.clone().into_dtype(DType::F32)), Err(Error::DType { .. })));
        assert!(matches!(t.write_rows(0, &Tensor::zeros(&[1, 3], DType::F16)), Err(Error::Shape { .. })));
    }

    #[test]
    fn tensors_move_between_threads() {
        // Workers hand tensors to rayon and tokio threads; device storage must not change that.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Tensor>();
    }

    #[test]
    fn to_device_cpu_is_a_clone() {
        let t = Tensor::from_f32(&[2, 2], vec![1.0, -2.0, 3.5, 0.25]).unwrap();
        let u = t.to_device(Device::Cpu).unwrap();
        assert_eq!(u, t);
        assert_eq!(u.device(), Device::Cpu);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn to_device_cuda_is_refused_without_the_feature() {
        let t = Tensor::zeros(&[2], DType::F32);
        assert!(matches!(t.to_device(Device::Cuda(0)), Err(Error::CudaUnavailable { ordinal: 0, .. })));
    }
}
