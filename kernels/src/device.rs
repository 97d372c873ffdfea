//! Where a computation runs.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// A compute device. Ops take tensors on one device and return results on the same device.
///
/// Only the CPU exists in this build; `Cuda(n)` can be named (so configs and command lines stay the
/// same across builds) and is refused by [`Device::check_available`] until the CUDA path lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Fails with a clear error when this device cannot be used by this build on this machine.
    pub fn check_available(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(ordinal) => Err(Error::CudaUnavailable {
                ordinal,
                reason: if cfg!(feature = "cuda") {
                    "the CUDA implementations of the ops are not part of this version yet"
                } else {
                    "this binary was built without the `cuda` feature"
                },
            }),
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
        assert!(matches!(Device::Cuda(0).check_available(), Err(Error::CudaUnavailable { .. })));
    }
}
