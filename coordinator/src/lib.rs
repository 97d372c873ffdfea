//! The coordinator of awq-cluster: job API, planner, scheduler, state store and output assembly.
//!
//! - [`Coordinator`] ([`service`]): the gRPC `JobService` (clients) and `WorkerService` (workers)
//!   over one shared state: wire messages in and out, validation and file work off the state's
//!   lock, the state's decisions carried out after it. Workers join with a long-lived stream that
//!   carries their assignments; when it breaks, the worker is lost and its unfinished blocks are
//!   planned again.
//! - [`state`]: every job and joined worker, and what each event does to them ([`state::scheduler`]:
//!   which idle worker takes which unfinished blocks). Pure: no gRPC, store, files or clock; its
//!   decisions come back as effects. `wire` converts its types to and from `awq.v1` messages.
//! - [`validate`]: a `SubmitRequest` from the wire becomes a checked [`validate::JobSpec`] before
//!   any work starts (model readable, architecture supported, shapes divisible by the group size,
//!   output under an allowed root).
//! - [`planner`]: contiguous block ranges, balanced and bounded by each worker's memory.
//! - `nccl`: which chains of GPU stages pass their activations over NCCL (one group per chain,
//!   ranks in chain order), and the groups' state while their job runs.
//! - [`deployments`]: the `DeploymentService` (deploy, list, undeploy) over the state's
//!   deployments ([`state::serving`]: replicas placed on idle workers, taken back from workers that
//!   rejoin a restarted coordinator), their records in the store, and the ready replicas the HTTP
//!   gateway routes requests to.
//! - [`store`]: the [`store::Store`] trait, in memory or in etcd, and its keys; with etcd, a
//!   restarted coordinator reads jobs and finished blocks back and computes nothing finished again.
//! - [`assemble`]: each result is checked against the output's manifest, staged as a file beside
//!   the output (what a restarted coordinator resumes from) and written straight into the output
//!   checkpoint, laid out in a temporary folder from the job's first result on; once the last
//!   result is in, the rest is a sync, small files and a rename. A job is done only after that
//!   rename.
//!
//! The coordinator never computes on tensor values: it moves bytes, keeps state and writes files.

pub mod assemble;
pub mod deployments;
mod error;
pub mod leader;
mod nccl;
pub mod planner;
pub mod service;
pub mod state;
pub mod standby;
pub mod store;
pub mod validate;
mod wire;

pub use error::{Error, Result};
pub use service::{Coordinator, CoordinatorConfig};
