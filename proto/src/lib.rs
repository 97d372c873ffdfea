//! The awq.v1 wire protocol: `awq/v1/awq.proto` and the tonic code generated from it, nothing else.
//!
//! - `JobService`: clients -> coordinator (submit, get, watch, cancel, list jobs and workers).
//! - `WorkerService`: workers -> coordinator (a long-lived `Join` stream that carries
//!   assignments and tells the coordinator the worker is alive; chunked uploads of finished blocks;
//!   the NCCL id of a chain of GPU stages, published by its rank 0 and relayed to the others).
//! - `StageService`: worker -> worker, activations from one pipeline stage to the next (a chain of
//!   GPU stages uses NCCL instead: `Assignment.transport`).
//!
//! Limits that both ends apply live here too, so they cannot disagree.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("awq.v1");
}

/// Bytes of payload per chunk of a bulk transfer.
pub const CHUNK_BYTES: usize = 4 << 20;

/// Largest gRPC message either side accepts (a chunk plus headers, with room to spare).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// HTTP/2 flow-control windows of the bulk streams (results, activations), per stream and per
/// connection: large enough that a loopback or LAN transfer is not paced by window updates.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;

/// The protocol version a worker announces in `JoinRequest`.
pub const PROTOCOL_VERSION: u32 = 2;
