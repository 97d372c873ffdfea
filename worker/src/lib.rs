//! The compute side of awq-cluster.
//!
//! - [`forward`]: the decoder block forward pass, built from the architecture descriptor and the
//!   kernels' ops, with hooks to capture the inputs of every linear (what AWQ calibrates on).
//! - [`eval`]: perplexity over non-overlapping windows, streaming the model one block at a time.
//!
//! Later issues add the AWQ engine (calibration, scale and clip search, packing), the pipeline stage
//! and the worker's gRPC side here. Invariant: a block's output depends only on its input
//! activations and its weights, never on which worker or how many workers computed it.

pub mod awq;
pub mod eval;
pub mod forward;
pub mod node;
pub mod stage;

pub use eval::{perplexity, EvalProgress, PerplexityReport, Windows};
pub use forward::{BlockShape, LinearInputs};

/// What went wrong in the worker's computations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] awq_model::Error),
    #[error("block {block_idx}: {source}")]
    Block { block_idx: usize, source: awq_kernels::Error },
    #[error(transparent)]
    Kernel(#[from] awq_kernels::Error),
    #[error("{0}")]
    Input(String),
    #[error("job {0} was cancelled")]
    Cancelled(String),
    /// Moving activations or results to another party failed.
    #[error("transfer: {0}")]
    Transfer(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
