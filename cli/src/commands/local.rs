//! The whole cluster in this process, for `awq quantize` and `awq serve`: an embedded coordinator
//! (in-memory store) on a loopback port and one local worker per device, which join it over gRPC
//! exactly as a real cluster's workers do. So a job gives the same bytes here as on a cluster of
//! any size, and `awq serve` runs the same replica, engine and gateway code as `awq deploy`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use awq_coordinator::store::MemoryStore;
use awq_coordinator::{Coordinator, CoordinatorConfig};
use awq_kernels::Device;
use awq_worker::node::{available_memory_bytes, run_worker, WorkerConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::jobs::{connect, status_error};

/// How long the local workers may take to join the embedded coordinator.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A running embedded coordinator and its local workers; [`LocalCluster::stop`] ends them.
pub struct LocalCluster {
    pub coordinator: Coordinator,
    /// The coordinator's gRPC URL (`http://127.0.0.1:PORT`).
    pub url: String,
    stop: watch::Sender<bool>,
    server: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    workers: Vec<JoinHandle<awq_worker::Result<()>>>,
}

/// The devices of `--device`, each usable and named once (two workers on one device would only
/// share it: NCCL refuses two ranks on one GPU, and the CPU engine already uses every core).
pub fn local_devices(devices: &[Device]) -> Result<Vec<Device>> {
    if devices.is_empty() {
        bail!("--device: no device given");
    }
    let mut seen = BTreeSet::new();
    for &device in devices {
        if !seen.insert(device.to_string()) {
            bail!("--device: {device} is given twice (one worker per device)");
        }
    }
    // Checked in parallel: opening a GPU (driver, context) takes a few hundred milliseconds.
    std::thread::scope(|scope| {
        let checks: Vec<_> = devices.iter().map(|&device| scope.spawn(move || device.check_available())).collect();
        for (device, check) in devices.iter().zip(checks) {
            let checked = check.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            checked.with_context(|| format!("--device {device}"))?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(devices.to_vec())
}

/// The `i`-th local worker's name: `local` alone, `local-cuda0` (...) beside others, `local-cpu1`
/// (...) for CPU workers beside others (`awq serve --pp N` on the CPU).
fn worker_name(device: Device, i: usize, n_devices: usize) -> String {
    match (n_devices, device) {
        (1, _) => "local".into(),
        (_, Device::Cpu) => format!("local-cpu{i}"),
        (_, device) => format!("local-{}", device.to_string().replace(':', "")),
    }
}

impl LocalCluster {
    /// Starts the coordinator and one worker per entry of `workers`, and returns once every worker
    /// has joined. Each entry is one worker's devices: it computes on the first and serves on all
    /// of them (`awq serve --tp N` over GPUs: N GPUs per worker). Devices as checked by
    /// [`local_devices`] (the CPU may appear in several entries: workers that share its cores, for
    /// `awq serve --pp N`). `resident_bytes`: the workers' `--resident-bytes`.
    pub async fn start(workers: &[Vec<Device>], resident_bytes: Option<u64>) -> Result<LocalCluster> {
        let start = Instant::now();
        let coordinator = Coordinator::start(Arc::new(MemoryStore::default()), CoordinatorConfig::default()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot open a loopback port")?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let server = tokio::spawn(coordinator.clone().serve(listener, stopped(stop_rx.clone())));
        let n_workers = workers.len();
        let workers = workers
            .iter()
            .enumerate()
            .map(|(i, devices)| {
                let device = devices.first().copied().unwrap_or(Device::Cpu);
                let config = WorkerConfig {
                    coordinators: vec![url.clone()],
                    name: worker_name(device, i, n_workers),
                    device,
                    serving_devices: devices.clone(),
                    memory_bytes: available_memory_bytes(),
                    resident_bytes,
                    inject_fault_at_block: None,
                    stage_listen: "127.0.0.1:0".parse().expect("a valid address"),
                    stage_advertise: None,
                    worker_token: None,
                    tls: None,
                };
                tokio::spawn(run_worker(config, stopped(stop_rx.clone())))
            })
            .collect();
        let mut cluster = LocalCluster { coordinator, url, stop, server, workers };
        if let Err(e) = cluster.wait_for_workers().await {
            cluster.stop().await;
            return Err(e);
        }
        let n = cluster.workers.len();
        tracing::debug!(
            "devices checked and {n} local worker(s) joined {:.2} s after the start",
            start.elapsed().as_secs_f64()
        );
        Ok(cluster)
    }

    /// Waits until every local worker has joined (a worker that ended before, or a join that
    /// takes longer than [`JOIN_TIMEOUT`], is an error).
    async fn wait_for_workers(&mut self) -> Result<()> {
        let start = Instant::now();
        let mut client = connect(&self.url, None, None).await?;
        loop {
            let listed = client.list_workers(awq_proto::v1::ListWorkersRequest {}).await;
            let joined = listed.map_err(|s| status_error("local cluster", s))?.into_inner().workers.len();
            if joined >= self.workers.len() {
                return Ok(());
            }
            if let Some(worker) = self.workers.iter_mut().find(|w| w.is_finished()) {
                match worker.await {
                    Ok(Err(e)) => bail!("a local worker stopped before it joined: {e}"),
                    Ok(Ok(())) => bail!("a local worker stopped before it joined"),
                    Err(e) => bail!("a local worker panicked before it joined: {e}"),
                }
            }
            if start.elapsed() > JOIN_TIMEOUT {
                bail!("{joined} of {} local workers joined within {JOIN_TIMEOUT:?}", self.workers.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the workers (their replicas' engines with them) and the coordinator, and waits for
    /// them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for worker in self.workers {
            let _ = worker.await;
        }
        let _ = self.server.await;
    }
}
