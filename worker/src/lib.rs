//! The compute side of awq-cluster.
//!
//! - [`forward`]: the decoder block forward pass, built from the architecture descriptor and the
//!   kernels' ops, with hooks to capture the inputs of every linear (what AWQ calibrates on).
//! - [`eval`]: the windows perplexity scores (check-model.py's rule); the scoring runs on
//!   `awq_serve::eval`.
//! - [`stage`]: one pipeline stage (a worker's block range) behind the `StageIo` trait; [`node`]:
//!   the worker process (gRPC stage IO, joins, uploads); `nccl_io`: the stage IO of a chain of GPU
//!   stages, over NCCL.
//! - [`serving`]: the replicas of deployments the coordinator placed on this worker (an
//!   `awq_serve` engine each) and the `ReplicaService` gateways reach them through; [`pipeline`]:
//!   the link from a pipelined replica's stage to the next one (gRPC), and [`stage_link`]: its
//!   hidden states over NCCL between GPU stages.
//!
//! - [`awq`]: the AWQ engine (calibration, scale and clip search, packing).
//!
//! Invariant: a block's output depends only on its input activations and its weights, never on
//! which worker or how many workers computed it, nor on how the activations travelled.

pub mod awq;
pub mod eval;
pub mod forward;
pub mod kept;
mod nccl_io;
pub mod node;
pub mod pipeline;
pub mod serving;
pub mod stage;
pub mod stage_link;

pub use eval::Windows;
pub use forward::{BlockShape, LinearInputs};

impl From<awq_kernels::Error> for Error {
    fn from(e: awq_kernels::Error) -> Error {
        Error::Kernel(Box::new(e))
    }
}

/// What went wrong in the worker's computations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] awq_model::Error),
    #[error("block {block_idx}: {source}")]
    Block { block_idx: usize, source: Box<awq_kernels::Error> },
    /// Boxed, as `Block`'s: kernel errors carry paths and messages, and every `Result` of the
    /// worker would otherwise be as large as the largest of them.
    #[error(transparent)]
    Kernel(Box<awq_kernels::Error>),
    #[error("{0}")]
    Input(String),
    #[error("job {0} was cancelled")]
    Cancelled(String),
    /// Moving activations or results to another party failed.
    #[error("transfer: {0}")]
    Transfer(String),
    /// An NCCL call between this stage and its neighbours failed (this worker's failure, not the
    /// job's: the stage's blocks are planned again).
    #[error("NCCL group {group}: {source}")]
    Nccl { group: String, source: Box<awq_kernels::Error> },
    /// An NCCL group cannot go on: a member was lost, a peer broke the protocol, or this worker
    /// cannot do NCCL (the stage's blocks are planned again).
    #[error("NCCL group {group}: {reason}")]
    NcclGroup { group: String, reason: String },
    /// The coordinator refused this worker's token (none, or not its worker token): joining again
    /// would not help, so the worker stops.
    #[error("the coordinator at {coordinator} refused the worker token: {message}")]
    Unauthenticated { coordinator: String, message: String },
    /// A fault a test asked for (`awq worker --inject-fault-at-block`), standing for a device error.
    #[error("block {block_idx}: injected device fault (a test switch)")]
    InjectedFault { block_idx: usize },
}

impl Error {
    /// Whether the job itself is at fault (its model, options or files: fail it, naming what is
    /// wrong) rather than this worker or its device (out of memory, a driver or NCCL error, a lost
    /// peer, a file the coordinator could read and this worker cannot: plan the stage again on a
    /// live worker). The one place errors are classified; a cancellation is neither.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::Model(e) => !e.is_fault(),
            Error::Block { source, .. } | Error::Kernel(source) => !source.is_fault(),
            Error::Input(_) => true,
            Error::Cancelled(_)
            | Error::Transfer(_)
            | Error::Nccl { .. }
            | Error::NcclGroup { .. }
            | Error::InjectedFault { .. }
            | Error::Unauthenticated { .. } => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
