//! The tensor type: a shape, a dtype and row-major storage on a device.

use std::borrow::Cow;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::{DType, Device, Error, Result};

/// A dense row-major tensor.
///
/// Storage keeps the dtype it was created with (a checkpoint's fp16 weights stay fp16 until an op
/// reads them); ops read any dtype, compute in f32 and write their output in the dtype the caller
/// asks for. Cloning copies the data.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

#[derive(Clone, Debug, PartialEq)]
enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
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
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::F32(data) })
    }

    /// An f16 tensor over `data`.
    pub fn from_f16(shape: &[usize], data: Vec<f16>) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::F16(data) })
    }

    /// A bf16 tensor over `data`.
    pub fn from_bf16(shape: &[usize], data: Vec<bf16>) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::BF16(data) })
    }

    /// Decodes little-endian bytes (the safetensors layout) of the given dtype.
    pub fn from_le_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
        let n = bytes.len() / dtype.size_bytes();
        check_len(shape, n)?;
        if bytes.len() != n * dtype.size_bytes() {
            return Err(Error::ElementCount { shape: shape.to_vec(), expected: n, got: bytes.len() });
        }
        let storage = match dtype {
            DType::F32 => Storage::F32(
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            ),
            DType::F16 => Storage::F16(
                bytes.chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect(),
            ),
            DType::BF16 => Storage::BF16(
                bytes.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect(),
            ),
        };
        Ok(Tensor { shape: shape.to_vec(), storage })
    }

    /// The data as little-endian bytes in the tensor's own dtype (the safetensors layout).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &self.storage {
            Storage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Storage::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            Storage::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        }
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        let storage = match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::F16 => Storage::F16(vec![f16::ZERO; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
        };
        Tensor { shape: shape.to_vec(), storage }
    }

    /// Builds a tensor of `dtype` from f32 values, rounding to nearest even where narrowing.
    pub fn from_f32_as(shape: &[usize], data: Vec<f32>, dtype: DType) -> Result<Tensor> {
        Tensor::from_f32(shape, data).map(|t| t.into_dtype(dtype))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
        }
    }

    /// The device the data lives on (the CPU, until the CUDA path lands).
    pub fn device(&self) -> Device {
        Device::Cpu
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

    /// Converts to another dtype (a no-op when it already has it).
    pub fn into_dtype(self, dtype: DType) -> Tensor {
        if self.dtype() == dtype {
            return self;
        }
        let shape = self.shape.clone();
        let values = self.f32_values().into_owned();
        let storage = match dtype {
            DType::F32 => Storage::F32(values),
            DType::F16 => {
                let mut out = vec![f16::ZERO; values.len()];
                out.convert_from_f32_slice(&values);
                Storage::F16(out)
            }
            DType::BF16 => {
                let mut out = vec![bf16::ZERO; values.len()];
                out.convert_from_f32_slice(&values);
                Storage::BF16(out)
            }
        };
        Tensor { shape, storage }
    }

    /// The values as f32: borrowed when stored as f32, converted otherwise.
    pub fn f32_values(&self) -> Cow<'_, [f32]> {
        match &self.storage {
            Storage::F32(v) => Cow::Borrowed(v),
            Storage::F16(v) => {
                let mut out = vec![0.0f32; v.len()];
                v.convert_to_f32_slice(&mut out);
                Cow::Owned(out)
            }
            Storage::BF16(v) => {
                let mut out = vec![0.0f32; v.len()];
                v.convert_to_f32_slice(&mut out);
                Cow::Owned(out)
            }
        }
    }

    /// The values as a new f32 vector.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.f32_values().into_owned()
    }

    /// Mutable access to f32 storage, for ops that work in place; `None` for other dtypes.
    pub fn f32_values_mut(&mut self) -> Option<&mut [f32]> {
        match &mut self.storage {
            Storage::F32(v) => Some(v),
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
            Storage::F32(v) => Storage::F32(v[a..b].to_vec()),
            Storage::F16(v) => Storage::F16(v[a..b].to_vec()),
            Storage::BF16(v) => Storage::BF16(v[a..b].to_vec()),
        };
        Ok(Tensor { shape: shape.to_vec(), storage })
    }

    /// Whether every value is finite (no NaN, no infinity).
    pub fn all_finite(&self) -> bool {
        match &self.storage {
            Storage::F32(v) => v.iter().all(|x| x.is_finite()),
            Storage::F16(v) => v.iter().all(|x| x.is_finite()),
            Storage::BF16(v) => v.iter().all(|x| x.is_finite()),
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
            let back = Tensor::from_le_bytes(dtype, &[2, 3], &t.to_le_bytes()).unwrap();
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
}
