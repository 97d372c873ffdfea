//! [`Indices`]: a list of `u32` indices (positions, cache slots, block tables) kept on the host and,
//! for ops on a CUDA device, uploaded once to that device.
//!
//! Why a type of its own: the serving engine computes a step's indices once and every layer's ops
//! read them; uploading them again inside each op would copy the same bytes once per layer. The
//! host copy stays for the CPU reference and for the ops' bounds checks, which read it before any
//! kernel indexes with the device copy.
//!
//! [`Indices::overwrite`] rewrites the values in place (the device buffer stays where it is: a
//! recorded [`crate::Graph`] reads it at every replay). An op may also write indices on the device
//! (`ops::argmax_rows_into`); the host copy is then stale until [`Indices::read_back`].

use crate::{Device, Result};

/// `u32` indices on the host, and on one CUDA device when built for one.
pub struct Indices {
    values: Vec<u32>,
    #[cfg(feature = "cuda")]
    on_cuda: Option<(std::sync::Arc<crate::cuda::CudaDevice>, cudarc::driver::CudaSlice<u32>)>,
}

impl std::fmt::Debug for Indices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Indices({} on {}: {:?})", self.values.len(), self.device(), &self.values[..self.values.len().min(8)])
    }
}

impl Indices {
    /// `values` for ops on `device` (uploaded now when it is a CUDA device).
    ///
    /// Errors: what opening the device or the copy reports ([`crate::Error::CudaUnavailable`] in a
    /// build without the `cuda` feature).
    pub fn new(values: Vec<u32>, device: Device) -> Result<Indices> {
        match device {
            Device::Cpu => Ok(Indices {
                values,
                #[cfg(feature = "cuda")]
                on_cuda: None,
            }),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => {
                Err(crate::Error::CudaUnavailable { ordinal, reason: crate::device::NO_CUDA_FEATURE })
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let dev = crate::cuda::CudaDevice::get(n)?;
                let buf = dev.upload(&values)?;
                Ok(Indices { values, on_cuda: Some((dev, buf)) })
            }
        }
    }

    /// `len` zeros for ops on `device` (zeroed on the device, no upload).
    pub fn zeros(len: usize, device: Device) -> Result<Indices> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let dev = crate::cuda::CudaDevice::get(n)?;
                let buf = dev.zeros_u32(len)?;
                Ok(Indices { values: vec![0; len], on_cuda: Some((dev, buf)) })
            }
            _ => Indices::new(vec![0; len], device),
        }
    }

    /// Replaces the values with `values`, as many as there are, on the host and in the device
    /// copy's buffer, which stays where it is (see the module docs). The copy is queued on the
    /// device's stream: ops queued before it read the old values, ops queued after it the new.
    ///
    /// Errors: [`crate::Error::Shape`] for another length; the copy's.
    pub fn overwrite(&mut self, values: &[u32]) -> Result<()> {
        if values.len() != self.values.len() {
            return Err(crate::Error::Shape {
                op: "Indices::overwrite",
                detail: format!("{} values for {} indices", values.len(), self.values.len()),
            });
        }
        self.values.copy_from_slice(values);
        #[cfg(feature = "cuda")]
        if let Some((dev, buf)) = &mut self.on_cuda {
            dev.write_u32(values, buf)?;
        }
        Ok(())
    }

    /// The values after an op wrote them on the device (see the module docs): the device copy is
    /// downloaded into the host copy (waiting for that op) and returned. On the CPU, the values.
    pub fn read_back(&mut self) -> Result<&[u32]> {
        #[cfg(feature = "cuda")]
        if let Some((dev, buf)) = &self.on_cuda {
            self.values = dev.download(buf)?;
        }
        Ok(&self.values)
    }

    /// Indices on the CPU.
    pub fn host(values: Vec<u32>) -> Indices {
        Indices {
            values,
            #[cfg(feature = "cuda")]
            on_cuda: None,
        }
    }

    pub fn values(&self) -> &[u32] {
        &self.values
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Where the indices are for ops: the CPU, or the CUDA device they were uploaded to.
    pub fn device(&self) -> Device {
        #[cfg(feature = "cuda")]
        if let Some((dev, _)) = &self.on_cuda {
            return dev.device();
        }
        Device::Cpu
    }

    /// The device copy (for a launcher; the op has checked the device).
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> Option<&cudarc::driver::CudaSlice<u32>> {
        self.on_cuda.as_ref().map(|(_, buf)| buf)
    }

    /// The device copy, for a launcher whose kernel writes it (the host copy goes stale).
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_mut(&mut self) -> Option<&mut cudarc::driver::CudaSlice<u32>> {
        self.on_cuda.as_mut().map(|(_, buf)| buf)
    }

    /// The host values, for an op that computes them on the CPU.
    pub(crate) fn values_mut(&mut self) -> &mut [u32] {
        &mut self.values
    }
}
