//! The error type of every kernel call.

use crate::{DType, Device};

/// What went wrong in a kernel call. Variants hold facts (op, shapes, dtypes, devices, files), not
/// formatted text.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two operands (or an operand and a parameter) disagree about a dimension.
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },

    /// A buffer's length does not match the number of elements its shape implies.
    #[error("tensor of shape {shape:?} needs {expected} elements, got {got}")]
    ElementCount { shape: Vec<usize>, expected: usize, got: usize },

    /// An upload asked a staging buffer for more bytes than were asked of it before.
    #[error("staging buffer holds {have} bytes, the upload needs {needed}: ask HostStaging::buffer for them first")]
    StagingTooShort { needed: usize, have: usize },

    /// An op was asked for a dtype it does not support.
    #[error("{op}: dtype {dtype} is not supported here")]
    DType { op: &'static str, dtype: DType },

    /// An index (token id, row) points outside its table.
    #[error("{op}: index {index} is out of range for {len} rows")]
    Index { op: &'static str, index: usize, len: usize },

    /// A CUDA device was requested from a build or machine that cannot provide one.
    #[error("CUDA device {ordinal} requested, but {reason}")]
    CudaUnavailable { ordinal: usize, reason: &'static str },

    /// `cuda:N` names a device this machine does not have.
    #[error("CUDA device {ordinal} requested, but this machine has {count} CUDA device(s)")]
    NoSuchCudaDevice { ordinal: usize, count: usize },

    /// A CUDA library could not be loaded at run time (the build loads CUDA dynamically).
    #[error("{what} not found: {library} could not be loaded (searched the system library path and LD_LIBRARY_PATH)")]
    CudaLibraryNotFound { what: &'static str, library: &'static str },

    /// The operands of one op live on different devices.
    #[error("{op}: operands are on different devices ({first} and {other}); move them with Tensor::to_device")]
    DeviceMismatch { op: &'static str, first: Device, other: Device },

    /// An op was given tensors on a CUDA device but has no CUDA implementation yet.
    #[error("op {op} has no CUDA implementation yet (operands on {device}); move them with Tensor::to_device(Device::Cpu)")]
    NoCudaImplementation { op: &'static str, device: Device },

    /// NVRTC could not compile one of our `.cu` files (or could not start on it).
    #[error(
        "{file}: NVRTC failed to compile it for {arch} ({status}); include path {include_dirs:?} \
         (set AWQ_CUDA_INCLUDE or --cuda-include, KernelSettings::cuda_include, to override):\n{log}"
    )]
    NvrtcCompile { file: String, arch: String, status: String, include_dirs: Vec<String>, log: String },

    /// A CUDA driver call failed.
    #[cfg(feature = "cuda")]
    #[error("{device}: {call} failed: {source}")]
    CudaDriver {
        device: Device,
        call: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },

    /// Loading or launching one kernel of one of our `.cu` files failed.
    #[cfg(feature = "cuda")]
    #[error("{device}: kernel {kernel} of {file}: {source}")]
    CudaKernel {
        device: Device,
        file: &'static str,
        kernel: String,
        #[source]
        source: cudarc::driver::DriverError,
    },

    /// A cuBLAS call failed.
    #[cfg(feature = "cuda")]
    #[error("{device}: cuBLAS {call} failed: {source}")]
    Cublas {
        device: Device,
        call: &'static str,
        #[source]
        source: cudarc::cublas::result::CublasError,
    },

    /// An NCCL call failed: `code` is NCCL's result (`ncclRemoteError`, ...), `message` what NCCL
    /// said about it (its error string and last error).
    #[cfg(feature = "cuda")]
    #[error("{device}: NCCL {call} as rank {rank} of {n_ranks} failed with {code}: {message}")]
    Nccl { device: Device, call: &'static str, rank: usize, n_ranks: usize, code: String, message: String },

    /// An NCCL call gave up waiting because its caller asked it to (the communicator is aborted).
    #[cfg(feature = "cuda")]
    #[error("{device}: NCCL {call} as rank {rank} of {n_ranks} was aborted before it completed")]
    NcclAborted { device: Device, call: &'static str, rank: usize, n_ranks: usize },

    /// `ncclGetUniqueId` failed (no network interface NCCL can bootstrap over, ...).
    #[cfg(feature = "cuda")]
    #[error("NCCL ncclGetUniqueId failed with {code}: {message}")]
    NcclUniqueId { code: String, message: String },

    /// Bytes that should hold an NCCL unique id have the wrong length.
    #[cfg(feature = "cuda")]
    #[error("an NCCL unique id is {expected} bytes, got {got}")]
    NcclIdLength { expected: usize, got: usize },

    /// An NCCL communicator was asked for something it cannot do: a rank or peer outside it, a
    /// device that is not a GPU.
    #[cfg(feature = "cuda")]
    #[error("NCCL rank {rank} of {n_ranks} on {device}: {problem}")]
    NcclUsage { device: Device, rank: usize, n_ranks: usize, problem: String },

    /// A tensor-parallel all-reduce in host memory was given up: another rank failed before it.
    #[error("all-reduce as rank {rank} of {n_ranks} was aborted: another rank failed")]
    CollectiveAborted { rank: usize, n_ranks: usize },

    /// A device string such as `cuda:0` could not be parsed.
    #[error("unknown device '{0}' (expected 'cpu' or 'cuda:N')")]
    BadDevice(String),

    /// `configure` was called after the kernel settings were installed or already in use.
    #[error("kernel settings are installed once, before the first kernel compiles (configure was called again, or too late)")]
    SettingsAlreadySet,

    /// NVRTC definitions were asked of a build that does not take them.
    #[error(
        "NVRTC definitions {defines:?} (AWQ_NVRTC_DEFINES) need a build with the `kernel-probes` feature: they can \
         turn on benchmark probes that give wrong results, so a normal build takes none"
    )]
    NvrtcDefinesNeedProbes { defines: Vec<String> },
}

impl Error {
    /// Whether the device or its libraries failed (out of memory, a driver, cuBLAS or NCCL error,
    /// a kernel that would not compile or load, CUDA missing on this machine), as opposed to an op
    /// called with operands it cannot take. A fault is the machine's, not the input's: work that
    /// hit one can succeed on another device.
    pub fn is_fault(&self) -> bool {
        match self {
            Error::Shape { .. }
            | Error::ElementCount { .. }
            | Error::StagingTooShort { .. }
            | Error::DType { .. }
            | Error::Index { .. }
            | Error::DeviceMismatch { .. }
            | Error::NoCudaImplementation { .. }
            | Error::BadDevice(_)
            | Error::SettingsAlreadySet
            | Error::NvrtcDefinesNeedProbes { .. } => false,
            Error::CudaUnavailable { .. } | Error::NoSuchCudaDevice { .. } | Error::CudaLibraryNotFound { .. } | Error::NvrtcCompile { .. } => true,
            // Another rank's failure, whatever it was: the group is gone, which is not the input's doing.
            Error::CollectiveAborted { .. } => true,
            #[cfg(feature = "cuda")]
            Error::CudaDriver { .. }
            | Error::CudaKernel { .. }
            | Error::Cublas { .. }
            | Error::Nccl { .. }
            | Error::NcclAborted { .. }
            | Error::NcclUniqueId { .. }
            | Error::NcclIdLength { .. }
            | Error::NcclUsage { .. } => true,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
