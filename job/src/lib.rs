//! What a job asks for, checked once, then carried typed.
//!
//! A quantization job enters as raw values: `awq quantize`'s flags, or a `SubmitRequest` and an
//! `Assignment` from the wire. Each edge turns them into the types of this crate at once (ripgrep's
//! low-level args -> high-level args; TGI's `ValidGenerateRequest`), and nothing after the edge
//! parses a string or compares a method name again:
//!
//! - [`JobOptions`]: how to quantize ([`QuantSpec`] with its [`GroupSize`], [`Method`],
//!   [`CalibOptions`], [`CalibSource`], [`EngineDtype`], the output's shard size);
//! - [`wire`]: the one conversion between these and their `awq.v1` messages, each direction
//!   (`TryFrom<&pb::QuantOptions> for JobOptions`, `Device` <-> `pb::Device`); an error names the
//!   wire field.
//!
//! - [`RetryBackoff`]: how work that a passing fault (a full disk, a silent state store) stopped
//!   waits to go again (worker and coordinator alike).
//! - [`deployment`]: what a deployment asks for ([`deployment::DeploymentSpec`], its engine's
//!   [`deployment::EngineOptions`]), checked from its `awq.v1` form the same way.
//!
//! The coordinator validates a request into a `JobSpec` holding `JobOptions` (plus what needs the
//! model on disk); the worker turns an assignment into a `StageSpec` holding the same value. What
//! this crate never does: touch a file, a tensor or the network.

mod backoff;
pub mod deployment;
mod options;
pub mod wire;

pub use awq_kernels::ops::{GroupSize, QuantSpec};
pub use backoff::RetryBackoff;
pub use awq_kernels::{DType, Device};
pub use options::{CalibOptions, CalibSource, EngineDtype, InvalidOption, JobOptions, Method};
