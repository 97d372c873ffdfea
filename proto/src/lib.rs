//! The awq.v1 wire protocol: `awq/v1/awq.proto` and the tonic code generated from it, nothing else.
//!
//! - `JobService`: clients -> coordinator (submit, get, watch, cancel, list jobs and workers).
//! - `WorkerService`: workers -> coordinator (a long-lived `Join` stream that carries
//!   assignments and tells the coordinator the worker is alive; chunked uploads of finished blocks;
//!   the NCCL id of a chain of GPU stages, published by its rank 0 and relayed to the others).
//! - `StageService`: worker -> worker, activations from one pipeline stage to the next (a chain of
//!   GPU stages uses NCCL instead: `Assignment.transport`).
//!
//! Limits that both ends apply live here too, so they cannot disagree, and how a receiver makes
//! room for a transfer ([`reserve_for_chunk`]).

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("awq.v1");
}

/// Bytes of payload per chunk of a bulk transfer.
pub const CHUNK_BYTES: usize = 4 << 20;

/// Largest gRPC message either side accepts (a chunk plus headers, with room to spare).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Makes room in `payload` for `more` bytes of a bulk transfer whose header or chunks claim
/// `claimed` bytes in all. The claim is never reserved up front (any sender can claim terabytes):
/// capacity doubles with what arrived, never past the claim, so a true claim ends in a buffer of
/// exactly its size (one copy of the payload in all, over a few reallocations) and a lying one
/// costs at most twice what was sent.
pub fn reserve_for_chunk(payload: &mut Vec<u8>, more: usize, claimed: u64) {
    let need = payload.len().saturating_add(more);
    if need <= payload.capacity() {
        return;
    }
    let doubled = payload.capacity().saturating_mul(2).max(need);
    let target = doubled.min(usize::try_from(claimed).unwrap_or(usize::MAX)).max(need);
    payload.reserve_exact(target - payload.len());
}

/// HTTP/2 flow-control windows of the bulk streams (results, activations), per stream and per
/// connection: large enough that a loopback or LAN transfer is not paced by window updates.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;

/// The protocol version a worker announces in `JoinRequest`.
pub const PROTOCOL_VERSION: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_true_claim_ends_in_one_exact_buffer_and_a_lie_costs_twice_what_was_sent() {
        let mut payload = Vec::new();
        let claimed = 10 * CHUNK_BYTES as u64 + 5;
        let chunk = vec![7u8; CHUNK_BYTES];
        for _ in 0..10 {
            reserve_for_chunk(&mut payload, chunk.len(), claimed);
            payload.extend_from_slice(&chunk);
        }
        reserve_for_chunk(&mut payload, 5, claimed);
        payload.extend_from_slice(&[1; 5]);
        assert_eq!((payload.len(), payload.capacity()), (claimed as usize, claimed as usize));

        let mut lie = Vec::new();
        reserve_for_chunk(&mut lie, 16, 1 << 40);
        lie.extend_from_slice(&[0; 16]);
        assert!(lie.capacity() <= 32, "{}", lie.capacity());
    }
}
