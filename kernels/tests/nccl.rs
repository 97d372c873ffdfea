//! NCCL between two GPUs of one process: what carries activations from one pipeline stage to the
//! next.
//!
//! - `ids_round_trip_through_their_bytes_and_wrong_lengths_are_refused` and
//!   `a_missing_library_is_a_clear_error` need no GPU (they run wherever the `cuda` feature is
//!   built);
//! - the others need `AWQ_GPU_TESTS=1` (a missing GPU is then a failure, as in `cuda_ops.rs`);
//!   the two-rank tests also need two GPUs and skip with a note on a machine with one. Rank 0 runs
//!   on `cuda:0` and rank 1 on `cuda:1`, each on its own thread, as two pipeline stages do in
//!   `awq quantize --device cuda:0,cuda:1`. Every wait has an abort deadline, so a hang is a
//!   failure, not a stuck test binary.
#![cfg(feature = "cuda")]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use awq_kernels::cuda::{device_count, nccl_available, AbortSignal, NcclComm, NcclId, NCCL_ID_BYTES};
use awq_kernels::rng::SplitMix64;
use awq_kernels::{DType, Device, Error, Tensor};
use common::gpu;

/// Aborts a wait after `limit`: long enough for NCCL to set up two ranks on a loaded machine.
fn deadline(limit: Duration) -> AbortSignal {
    let start = Instant::now();
    Box::new(move || start.elapsed() > limit)
}

/// Two GPUs, or `None` (with a note) on a machine with one; `None` too when GPU tests are off.
fn two_gpus() -> Option<(Device, Device)> {
    gpu()?;
    let n = device_count();
    if n < 2 {
        eprintln!("skipped: this test needs 2 GPUs, this machine has {n}");
        return None;
    }
    Some((Device::Cuda(0), Device::Cuda(1)))
}

/// What rank 0 sends: awkward shapes (one row, widths that are no multiple of anything, a zero
/// row count, one larger than NCCL's 4 MiB chunk) in every dtype, from a fixed seed, non-zero.
fn cases() -> Vec<Tensor> {
    let mut rng = SplitMix64::new(17);
    let shapes: [&[usize]; 5] = [&[1, 7], &[3, 1001], &[0, 64], &[65, 4099], &[1536, 1024]];
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for shape in shapes {
            let n = shape.iter().product();
            let values = rng.normal_vec(n, 1.0).into_iter().map(|v| if v == 0.0 { 0.5 } else { v }).collect();
            out.push(Tensor::from_f32_as(shape, values, dtype).unwrap());
        }
    }
    out
}

#[test]
fn ids_round_trip_through_their_bytes_and_wrong_lengths_are_refused() {
    let bytes: Vec<u8> = (0..NCCL_ID_BYTES).map(|i| (i * 7 + 3) as u8).collect();
    let id = NcclId::from_bytes(&bytes).unwrap();
    assert_eq!(id.to_bytes().to_vec(), bytes);
    assert_eq!(NcclId::from_bytes(&id.to_bytes()).unwrap(), id);
    for len in [0, 1, NCCL_ID_BYTES - 1, NCCL_ID_BYTES + 1] {
        let err = NcclId::from_bytes(&vec![0u8; len]).unwrap_err();
        assert!(matches!(err, Error::NcclIdLength { expected: NCCL_ID_BYTES, got } if got == len), "{err}");
        assert!(err.to_string().contains(&format!("128 bytes, got {len}")), "{err}");
    }
    // The id is a socket address: no bytes in logs.
    assert_eq!(format!("{id:?}"), "NcclId(..)");
}

#[test]
fn a_missing_library_is_a_clear_error() {
    if nccl_available() {
        // A machine with NCCL: ids are fresh each time.
        let (a, b) = (NcclId::new().unwrap(), NcclId::new().unwrap());
        assert_ne!(a.to_bytes(), b.to_bytes());
        return;
    }
    let err = NcclId::new().unwrap_err();
    assert!(matches!(err, Error::CudaLibraryNotFound { what: "NCCL", .. }), "{err}");
    assert!(err.to_string().contains("libnccl.so"), "{err}");
}

#[test]
fn ranks_outside_the_communicator_and_cpu_devices_are_refused() {
    let id = NcclId::from_bytes(&[0u8; NCCL_ID_BYTES]).unwrap();
    let err = NcclComm::start(Device::Cpu, &id, 0, 2, Box::new(|| false)).unwrap_err();
    assert!(matches!(err, Error::NcclUsage { rank: 0, n_ranks: 2, .. }), "{err}");
    assert!(err.to_string().contains("CUDA devices"), "{err}");
    let err = NcclComm::start(Device::Cuda(0), &id, 2, 2, Box::new(|| false)).unwrap_err();
    assert!(matches!(err, Error::NcclUsage { rank: 2, n_ranks: 2, .. }), "{err}");
}

#[test]
fn a_rank_whose_peer_never_joins_gives_up_when_told() {
    let Some(device) = gpu() else { return };
    // Rank 1 never comes: joining must end with the abort signal, not hang.
    let id = NcclId::new().unwrap();
    let start = Instant::now();
    let comm = NcclComm::start(device, &id, 0, 2, deadline(Duration::from_millis(500))).unwrap();
    let err = comm.wait_ready().unwrap_err();
    assert!(matches!(err, Error::NcclAborted { rank: 0, n_ranks: 2, .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(30), "aborting took {:?}", start.elapsed());
    // Every later call fails the same way, and closing an aborted communicator is fine.
    let x = Tensor::from_f32(&[2], vec![1.0, 2.0]).unwrap().to_device(device).unwrap();
    assert!(matches!(comm.send(&x, 1), Err(Error::NcclAborted { .. })));
    comm.close().unwrap();
}

#[test]
fn rank_0_on_cuda_0_sends_every_dtype_to_rank_1_on_cuda_1_bit_for_bit() {
    let Some((d0, d1)) = two_gpus() else { return };
    let id = NcclId::new().unwrap();
    // Rank 1 gets the id as bytes, as a worker gets it from the coordinator.
    let bytes = id.to_bytes().to_vec();
    let expected = cases();
    let sent = expected.clone();
    let sender = thread::spawn(move || {
        let comm = NcclComm::start(d0, &id, 0, 2, deadline(Duration::from_secs(120))).unwrap();
        assert_eq!((comm.rank(), comm.n_ranks(), comm.device()), (0, 2, d0));
        for x in &sent {
            let (rows, cols) = x.dims2("test").unwrap();
            comm.send_u64s(&[rows as u64, cols as u64, x.dtype().size_bytes() as u64], 1).unwrap();
            comm.send(&x.to_device(d0).unwrap(), 1).unwrap();
        }
        comm.close().unwrap();
    });
    let receiver = thread::spawn(move || {
        let id = NcclId::from_bytes(&bytes).unwrap();
        let comm = NcclComm::start(d1, &id, 1, 2, deadline(Duration::from_secs(120))).unwrap();
        let mut got = Vec::new();
        for want in cases() {
            let header = comm.recv_u64s(3, 0).unwrap();
            assert_eq!(header, [want.shape()[0] as u64, want.shape()[1] as u64, want.dtype().size_bytes() as u64]);
            let x = comm.recv(want.shape(), want.dtype(), 0).unwrap();
            assert_eq!((x.device(), x.shape(), x.dtype()), (d1, want.shape(), want.dtype()));
            got.push(x.to_device(Device::Cpu).unwrap());
        }
        comm.close().unwrap();
        got
    });
    sender.join().expect("rank 0 panicked");
    let got = receiver.join().expect("rank 1 panicked");
    assert_eq!(got.len(), expected.len());
    for (x, want) in got.iter().zip(&expected) {
        assert_eq!(x.to_le_bytes().unwrap(), want.to_le_bytes().unwrap(), "{:?} {} arrived changed", want.shape(), want.dtype());
    }
}

#[test]
fn a_receiver_whose_sender_never_sends_gives_up_and_the_sender_closes_cleanly() {
    let Some((d0, d1)) = two_gpus() else { return };
    let id = NcclId::new().unwrap();
    let bytes = id.to_bytes().to_vec();
    let sender = thread::spawn(move || {
        let comm = NcclComm::init(d0, &id, 0, 2).unwrap();
        // Leaves without sending, as a stage that failed before its output: closing is local.
        comm.close().unwrap();
    });
    let receiver = thread::spawn(move || {
        let id = NcclId::from_bytes(&bytes).unwrap();
        // The deadline is armed once both ranks joined (joining may take seconds the first time).
        let give_up_after_ms = Arc::new(AtomicU64::new(120_000));
        let t0 = Instant::now();
        let limit = give_up_after_ms.clone();
        let signal: AbortSignal = Box::new(move || t0.elapsed().as_millis() as u64 > limit.load(Ordering::Relaxed));
        let comm = NcclComm::start(d1, &id, 1, 2, signal).unwrap();
        comm.wait_ready().unwrap();
        let armed_at = Instant::now();
        give_up_after_ms.store(t0.elapsed().as_millis() as u64 + 1000, Ordering::Relaxed);
        let err = comm.recv(&[4, 4], DType::F32, 0).unwrap_err();
        assert!(matches!(err, Error::NcclAborted { call: "ncclRecv", rank: 1, .. }), "{err}");
        assert!(armed_at.elapsed() < Duration::from_secs(30), "aborting took {:?}", armed_at.elapsed());
    });
    sender.join().expect("rank 0 panicked");
    receiver.join().expect("rank 1 panicked");
}
