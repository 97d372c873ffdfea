//! Where a computation runs.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// Why a build without the `cuda` feature refuses CUDA devices.
#[cfg_attr(feature = "cuda", allow(dead_code))]
pub(crate) const NO_CUDA_FEATURE: &str = "this binary was built without the `cuda` feature";

/// A compute device. Ops take tensors on one device and return results on the same device.
///
/// `Cuda(n)` can always be named (so configs and command lines stay the same across builds); a build
/// without the `cuda` feature refuses it in [`Device::check_available`], and a build with it checks
/// that the driver loads and the device exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Fails with a clear error when this device cannot be used by this build on this machine.
    ///
    /// With the `cuda` feature, a CUDA device is really probed: libcuda is loaded, the driver
    /// initialised, the ordinal checked against the device count and the device's context created
    /// (and kept for later use). Errors: [`Error::CudaLibraryNotFound`] (no driver),
    /// [`Error::NoSuchCudaDevice`], `Error::CudaDriver`.
    pub fn check_available(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => crate::cuda::CudaDevice::get(ordinal).map(|_| ()),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => Err(Error::CudaUnavailable { ordinal, reason: NO_CUDA_FEATURE }),
        }
    }

    /// Gets the device ready for a long job: on CUDA, compiles and loads every kernel now (in
    /// parallel) instead of at each op's first use; nothing on the CPU.
    pub fn prepare(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => crate::cuda::CudaDevice::get(ordinal)?.precompile(crate::ops::CUDA_SOURCES),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => Err(Error::CudaUnavailable { ordinal, reason: NO_CUDA_FEATURE }),
        }
    }

    /// Bytes of memory free on the device now, for sizing what may stay resident there; `None`
    /// for the CPU, whose memory is the host's (and the page cache's) to manage.
    pub fn free_memory(self) -> Result<Option<u64>> {
        match self {
            Device::Cpu => Ok(None),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => crate::cuda::CudaDevice::get(ordinal)?.free_memory().map(Some),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => Err(Error::CudaUnavailable { ordinal, reason: NO_CUDA_FEATURE }),
        }
    }

    /// Bytes of memory the device has in all; `None` for the CPU.
    pub fn total_memory(self) -> Result<Option<u64>> {
        match self {
            Device::Cpu => Ok(None),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => crate::cuda::CudaDevice::get(ordinal)?.total_memory().map(Some),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => Err(Error::CudaUnavailable { ordinal, reason: NO_CUDA_FEATURE }),
        }
    }

    /// Waits until all work queued on this device has finished (a no-op on the CPU, whose ops
    /// return finished): what a wall-clock measurement of device work must call before reading
    /// the clock.
    pub fn synchronize(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => crate::cuda::CudaDevice::get(ordinal)?.synchronize(),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => Err(Error::CudaUnavailable { ordinal, reason: NO_CUDA_FEATURE }),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ if s == "cuda" => Ok(Device::Cuda(0)),
            _ => Err(Error::BadDevice(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert!(matches!("gpu".parse::<Device>(), Err(Error::BadDevice(s)) if s == "gpu"));
        assert!(Device::Cpu.check_available().is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_is_refused_without_the_feature() {
        let err = Device::Cuda(0).check_available().unwrap_err();
        assert!(matches!(err, Error::CudaUnavailable { ordinal: 0, .. }), "{err}");
        assert!(err.to_string().contains("built without the `cuda` feature"), "{err}");
    }
}
