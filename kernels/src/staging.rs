//! Host staging buffers: how tensor bytes read from a file reach a device.
//!
//! A loader reads a tensor's little-endian bytes into [`HostStaging::buffer`], then
//! [`HostStaging::upload`] makes a tensor of them on the staging's device. For a CUDA device the
//! buffer is page-locked host memory, allocated once and reused: reading a file into it faults no
//! pages, and the copy to the device is one DMA. (Decoding each tensor into a fresh `Vec` and
//! letting the driver copy it through its own bounce buffers took about 0.9 s per block of
//! Llama-3-8B with four GPUs loading at once: longer than the reading itself.) For the CPU the
//! buffer is an ordinary one, decoded as [`Tensor::from_le_bytes`] does.
//!
//! One staging buffer serves one loader thread; uploads from it run in the order they were made,
//! and [`HostStaging::buffer`] waits until the last one has read the buffer before handing it out
//! again.

use crate::{DType, Device, Result, Tensor};

/// A reusable host buffer in front of one device; see the module docs.
pub struct HostStaging {
    device: Device,
    /// The CPU's buffer.
    host: Vec<u8>,
    #[cfg(feature = "cuda")]
    pinned: Option<crate::cuda::PinnedStaging>,
}

impl HostStaging {
    /// A staging buffer for `device`; nothing is allocated until the first [`HostStaging::buffer`].
    pub fn new(device: Device) -> HostStaging {
        HostStaging {
            device,
            host: Vec::new(),
            #[cfg(feature = "cuda")]
            pinned: None,
        }
    }

    /// Makes room for `len` bytes now (page-locking memory takes a while, and growing the buffer
    /// later would wait for the uploads from it first).
    pub fn reserve(&mut self, len: usize) -> Result<()> {
        self.buffer(len).map(|_| ())
    }

    /// `len` bytes to fill (their contents are left from earlier use), grown as needed; on CUDA,
    /// once the previous upload has finished reading them.
    pub fn buffer(&mut self, len: usize) -> Result<&mut [u8]> {
        match self.device {
            Device::Cpu => {
                self.host.resize(len, 0);
                Ok(&mut self.host[..len])
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                if self.pinned.is_none() {
                    self.pinned = Some(crate::cuda::PinnedStaging::new(crate::cuda::CudaDevice::get(ordinal)?)?);
                }
                self.pinned.as_mut().expect("set above").buffer(len)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => Err(crate::Error::CudaUnavailable { ordinal, reason: crate::device::NO_CUDA_FEATURE }),
        }
    }

    /// A tensor of `dtype` and `shape` on the device, from the first bytes of the buffer (as many as
    /// the shape needs; [`HostStaging::buffer`] must have been asked for at least that many). On
    /// CUDA the copy is queued on the device's stream, in order with its other work.
    pub fn upload(&mut self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let len = shape.iter().product::<usize>() * dtype.size_bytes();
        match self.device {
            Device::Cpu => {
                let bytes = self.host.get(..len).ok_or_else(|| too_short(len, self.host.len()))?;
                Tensor::from_le_bytes(dtype, shape, bytes)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                let pinned = self.pinned.as_mut().ok_or_else(|| too_short(len, 0))?;
                if pinned.len() < len {
                    return Err(too_short(len, pinned.len()));
                }
                let storage = pinned.upload(dtype, len / dtype.size_bytes())?;
                Ok(Tensor::from_cuda(shape, storage))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => Err(crate::Error::CudaUnavailable { ordinal, reason: crate::device::NO_CUDA_FEATURE }),
        }
    }
}

fn too_short(needed: usize, have: usize) -> crate::Error {
    crate::Error::StagingTooShort { needed, have }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_staging_decodes_what_was_written_and_reuses_its_buffer() {
        let mut staging = HostStaging::new(Device::Cpu);
        let t = Tensor::from_f32(&[2, 3], vec![1.0, -2.5, 3.25, 0.0, 7.0, -0.125]).unwrap().into_dtype(DType::F16);
        let bytes = t.to_le_bytes().unwrap();
        staging.buffer(bytes.len()).unwrap().copy_from_slice(&bytes);
        assert_eq!(staging.upload(DType::F16, &[2, 3]).unwrap(), t);
        // A smaller tensor next: only its bytes count.
        staging.buffer(4).unwrap().copy_from_slice(&1.5f32.to_le_bytes());
        assert_eq!(staging.upload(DType::F32, &[1]).unwrap().to_f32_vec().unwrap(), vec![1.5]);
        assert!(staging.upload(DType::F32, &[4]).is_err(), "more than the buffer holds");
    }
}
