//! Devices, tensors and the numeric ops of awq-cluster.
//!
//! This crate owns everything that touches tensor values: the [`Device`] a computation runs on, the
//! [`Tensor`] type (a shape, a [`DType`] and storage on one device) and the ops in [`ops`] that a
//! decoder block and the AWQ search need: linear layers, RMSNorm, rotary embeddings, causal
//! grouped-query attention, gated activations, softmax, embedding lookup and reductions.
//!
//! Every op has a CPU reference implementation, written to be read, with f32 accumulation (f64 where a
//! sum is long). The CPU path is also the one real CPU workers and tests run, so matrix products go
//! through the `gemm` crate and rayon, never naive loops. CUDA implementations sit behind the same
//! functions with the `cuda` feature (module `cuda`: devices, device storage, NVRTC-compiled
//! kernels, cuBLAS); a tensor moves between devices with [`Tensor::to_device`] and ops run where
//! their operands are. A build without the feature answers a CUDA request with
//! [`Error::CudaUnavailable`], never a panic; a build with it loads every CUDA library at run time,
//! so it builds and starts on machines without CUDA and reports a missing library at first use.
//!
//! How kernels are compiled and launched (the disk cache of compiled kernels, where CUDA's headers
//! are, benchmark knobs) is one [`KernelSettings`] value per process, which the binary installs with
//! [`configure`] at its start; without that, the defaults hold. The crate reads no environment
//! variable of its own.
//!
//! What this crate never knows: models, tensor names, jobs. It sees devices, dtypes and shapes.

pub mod collective;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod dtype;
mod error;
mod graph;
mod indices;
pub mod ops;
pub mod rng;
mod settings;
mod staging;
mod tensor;

pub use collective::{Collective, CollectiveGroup};
pub use device::Device;
pub use dtype::DType;
pub use error::{Error, Result};
pub use graph::Graph;
pub use indices::Indices;
pub use settings::{configure, KernelCache, KernelSettings};
pub use staging::HostStaging;
pub use tensor::Tensor;

/// Half-precision float types used for tensor storage, re-exported so callers need not depend on `half`.
pub use half::{bf16, f16};
