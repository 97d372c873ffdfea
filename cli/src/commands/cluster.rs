//! `awq coordinator` and `awq worker`: the long-running roles of a cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use awq_coordinator::store::{EtcdStore, MemoryStore, Store};
use awq_coordinator::{Coordinator, CoordinatorConfig};
use awq_gateway::cluster::{ClusterModels, ReplicaAddress, ReplicaDirectory, ServedDeployment};
use awq_gateway::{Gateway, GatewayConfig};
use awq_worker::node::{available_memory_bytes, run_worker, WorkerConfig};
use clap::Args;

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Address to serve the job and worker APIs on.
    #[arg(long, default_value = "127.0.0.1:50151")]
    pub listen: SocketAddr,
    /// Where state lives: `memory` (lost on exit) or `etcd://HOST:PORT` (survives restarts:
    /// jobs continue where they were). Several coordinators on one etcd elect a leader; the others
    /// stand by (they refuse every call, naming the leader) and one takes over within seconds when
    /// the leader dies: give workers and clients all their URLs (`--coordinator URL1,URL2`).
    #[arg(long, default_value = "memory")]
    pub store: String,
    /// The URL workers and clients reach this coordinator at, which standbys name to them (default:
    /// `http://` or `https://` and --listen; for --listen on every interface, `0.0.0.0:PORT`, this
    /// machine's host name and PORT).
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    /// Allowed root for models, outputs and calibration files (repeatable). Without any, every
    /// path is allowed.
    #[arg(long = "root", value_name = "DIR")]
    pub roots: Vec<PathBuf>,
    /// Address of the OpenAI-compatible HTTP API for every deployment (`model` = the deployment's
    /// served model name, its name by default; /v1/*, /health, /metrics); without it, no HTTP API
    /// is served.
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
    /// Seconds that requests running through the HTTP API may take to finish after Ctrl-C or
    /// SIGTERM (meanwhile new requests and /health get 503).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub shutdown_timeout: u64,
    #[command(flatten)]
    pub api_keys: super::auth::ApiKeyArgs,
    #[command(flatten)]
    pub admin_token: super::auth::AdminTokenArgs,
    #[command(flatten)]
    pub worker_token: super::auth::WorkerTokenArgs,
    #[command(flatten)]
    pub tls: super::auth::TlsArgs,
}

/// The coordinator's deployments as the HTTP gateway looks them up.
pub(crate) struct Directory(pub(crate) Coordinator);

impl ReplicaDirectory for Directory {
    fn deployments(&self) -> Vec<ServedDeployment> {
        let served = self.0.served_models().into_iter();
        served.map(|(deployment, model)| ServedDeployment { deployment, model }).collect()
    }

    fn ready(&self, name: &str) -> Vec<ReplicaAddress> {
        let ready = self.0.ready_replicas(name).into_iter();
        ready
            .map(|r| ReplicaAddress {
                index: r.index,
                generation: r.generation,
                deployed_unix_ms: r.deployed_unix_ms,
                address: r.address,
            })
            .collect()
    }
}

#[derive(Args)]
pub struct WorkerArgs {
    /// Coordinator URL (`https://` for a coordinator that serves TLS: then this worker needs
    /// --tls-cert and --tls-key too, and --tls-ca for a private CA). Several, comma-separated: a
    /// leader and its standbys on one etcd; the worker joins whichever leads, and the next one
    /// when it is lost.
    #[arg(
        long,
        env = "AWQ_COORDINATOR",
        value_name = "URL",
        value_delimiter = ',',
        value_parser = super::auth::coordinator_url,
        default_value = "http://127.0.0.1:50151"
    )]
    pub coordinator: Vec<String>,
    /// Devices to compute on: `cpu`, `cuda:N` (a build with the `cuda` feature: block weights,
    /// activations and a replica's KV cache live on that GPU), or a node's GPUs as
    /// `cuda:0,cuda:1,...`: one worker per GPU in this process, each joining as its own (named
    /// NAME-cudaN), as `awq quantize` runs its local workers.
    #[arg(long = "device", value_name = "DEVICE", value_delimiter = ',', default_value = "cpu")]
    pub devices: Vec<awq_kernels::Device>,
    /// GPUs each worker of this process owns: it runs quantization stages on the first, and serves
    /// replicas of up to N tensor-parallel ranks (`awq deploy --tp N`) over all N, joined by NCCL
    /// all-reduces. --device must list a multiple of N GPUs. Default 1: one worker per GPU.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub gpus_per_worker: usize,
    /// Name shown in `awq workers` (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Address of this worker's stage service, which receives activations from other workers and
    /// serves its replicas (with several devices: the port of the first, the next ones +1, +2, ...;
    /// port 0: any free port each).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Address other workers use to reach the stage service, `host:port` (default: the bound
    /// address, or this machine's host name for --listen on every interface, `0.0.0.0:PORT`; with
    /// several devices, the port of the first, +1, +2, ... for the next).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Memory to offer, in GiB, shared by the devices' workers (default: what the machine has
    /// available now).
    #[arg(long)]
    pub memory_gib: Option<f64>,
    /// Bytes of block weights a stage may keep on its GPU (default: 40% of its free memory, or
    /// none on the CPU). Never changes the output.
    #[arg(long, env = "AWQ_RESIDENT_BYTES", value_name = "BYTES")]
    pub resident_bytes: Option<u64>,
    /// For tests: the first stage that reaches this block fails as if its device had failed
    /// (once per process), so a test can show that the stage is planned again.
    #[arg(long, hide = true, value_name = "BLOCK")]
    pub inject_fault_at_block: Option<usize>,
    #[command(flatten)]
    pub worker_token: super::auth::WorkerTokenArgs,
    #[command(flatten)]
    pub tls: super::auth::TlsArgs,
}

/// Builds the store named by `--store`.
pub async fn open_store(spec: &str) -> Result<Arc<dyn Store>> {
    if spec == "memory" {
        return Ok(Arc::new(MemoryStore::default()));
    }
    let Some(endpoint) = spec.strip_prefix("etcd://") else {
        bail!("--store {spec}: expected `memory` or `etcd://HOST:PORT`");
    };
    Ok(Arc::new(EtcdStore::connect(endpoint, Duration::from_secs(5)).await?))
}

/// Serves `args`' ports as a standby (every call refused, naming the leader) until this coordinator
/// is elected leader on `store` (known by --advertise, or its scheme and bound address); then frees
/// the ports, returned as bound, for the coordinator itself.
async fn stand_by_until_leading(
    args: &CoordinatorArgs,
    store: Arc<dyn Store>,
    tls: Option<&awq_auth::TlsConfig>,
) -> Result<(awq_coordinator::leader::Leadership, SocketAddr, Option<SocketAddr>)> {
    use awq_coordinator::standby;
    let seen: standby::SeenLeader = Default::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let listen = listener.local_addr()?;
    let scheme = if tls.is_some_and(awq_auth::TlsConfig::serves) { "https" } else { "http" };
    let url = args.advertise.clone().unwrap_or_else(|| format!("{scheme}://{}", reachable(listen)));
    let url = url.as_str();
    let grpc_tls = tls.and_then(awq_auth::TlsConfig::server);
    let grpc = tokio::spawn(standby::serve_grpc(listener, grpc_tls, seen.clone(), stopped()));
    let http = match args.http_listen {
        None => None,
        Some(addr) => {
            let http = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--http-listen {addr}: cannot bind"))?;
            let bound = http.local_addr()?;
            Some((bound, super::serve::spawn_http(http, tls, standby::http_router(seen.clone()), stopped())?.1))
        }
    };
    let leadership = awq_coordinator::leader::Leadership::acquire(store, url, |leader| {
        match &leader {
            Some(leader) => eprintln!("awq coordinator {url}: standing by; the leader is {leader}"),
            None => eprintln!("awq coordinator {url}: standing by; no leader known yet"),
        }
        *seen.lock().unwrap_or_else(|e| e.into_inner()) = leader;
    })
    .await;
    let _ = stop_tx.send(true);
    grpc.await.context("the standby's gRPC task")?.context("the standby's gRPC server")?;
    let http_listen = match http {
        Some((bound, task)) => {
            task.await.context("the standby's HTTP task")?.context("the standby's HTTP server")?;
            Some(bound)
        }
        None => None,
    };
    eprintln!("awq coordinator {url}: elected leader");
    Ok((leadership, listen, http_listen))
}

pub async fn coordinator(args: CoordinatorArgs) -> Result<()> {
    let (admin_token, worker_token) = (args.admin_token.secret()?, args.worker_token.secret()?);
    let api_keys = args.api_keys.keys()?;
    let tls = args.tls.config()?;
    let store = open_store(&args.store).await?;
    let described = store.describe();
    // On etcd, coordinators elect one leader; this one stands by until it is elected, on the ports
    // it then serves (port 0 resolved once, so that the URL it is known by stays true).
    let (leadership, listen, http_listen) = match args.store.as_str() {
        "memory" => (None, args.listen, args.http_listen),
        _ => {
            let (leadership, listen, http_listen) = stand_by_until_leading(&args, store.clone(), tls.as_ref()).await?;
            (Some(leadership), listen, http_listen)
        }
    };
    let config =
        CoordinatorConfig { roots: args.roots, admin_token, worker_token: worker_token.clone(), tls: tls.clone() };
    let coordinator = Coordinator::start(store, config).await?;
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    // One Ctrl-C stops both servers.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let (http, gateway) = match http_listen {
        None => (None, None),
        Some(addr) => {
            let http = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--http-listen {addr}: cannot bind"))?;
            // The gateway calls the replicas on their workers' ports, which want the worker token.
            // ... over TLS when the coordinator serves it (a cluster is all-TLS or all-plain).
            let models = ClusterModels::start(Directory(coordinator.clone()), worker_token, tls.clone());
            let gateway = Gateway::with_models(GatewayConfig { api_keys, ..Default::default() }, models);
            let addr = http.local_addr()?;
            let (scheme, server) = super::serve::spawn_http(http, tls.as_ref(), gateway.router(), stopped())?;
            eprintln!("awq coordinator serving the OpenAI API on {scheme}://{addr}/v1");
            (Some(server), Some(gateway))
        }
    };
    let scheme = if tls.as_ref().is_some_and(awq_auth::TlsConfig::serves) { "TLS" } else { "plain TCP" };
    eprintln!("awq coordinator listening on {} ({scheme}; store: {described})", listener.local_addr()?);
    // Ctrl-C or SIGTERM (Kubernetes' way of asking): the gateway drains first, as `awq serve`'s
    // does (new requests and /health get 503, running ones get --shutdown-timeout seconds to
    // finish), then both servers stop. Jobs need no drain: their state is in the store, and
    // the next coordinator (a restart, a standby) carries them on.
    let grace = Duration::from_secs(args.shutdown_timeout);
    tokio::spawn(async move {
        super::serve::shutdown_signal().await;
        if let Some(gateway) = gateway {
            gateway.start_draining();
            eprintln!(
                "awq coordinator shutting down: new requests get 503; {} running have {} s to finish",
                gateway.in_flight(),
                grace.as_secs()
            );
            if tokio::time::timeout(grace, gateway.drained()).await.is_err() {
                eprintln!("awq coordinator: {} requests still running after {} s; stopping", gateway.in_flight(), grace.as_secs());
            }
        }
        let _ = stop_tx.send(true);
    });
    // A leader that may have been replaced stops before it writes over its successor's state; one
    // that stops gracefully hands its leadership back once it serves no more (below).
    let leading = leadership.map(|mut leadership| {
        let stopping = stopped();
        tokio::spawn(async move {
            tokio::select! {
                why = leadership.lost() => {
                    eprintln!("awq coordinator: no longer the leader ({why}); exiting so that a standby takes over");
                    std::process::exit(1);
                }
                () = stopping => leadership,
            }
        })
    });
    // Once stopped, the servers finish the calls in progress, but a worker's session (a stream
    // that lasts as long as the worker) never finishes by itself: past CLOSE_GRACE the process
    // exits with such connections open, and their workers join the next coordinator.
    let closing = || {
        let stopped = stopped();
        async move {
            stopped.await;
            tokio::time::sleep(CLOSE_GRACE).await;
        }
    };
    tokio::select! {
        served = coordinator.serve(listener, stopped()) => served?,
        _ = closing() => eprintln!("awq coordinator: closing the workers' sessions"),
    }
    if let Some(http) = http {
        tokio::select! {
            served = http => served.context("the HTTP server's task")?.context("the HTTP server")?,
            _ = closing() => {}
        }
    }
    // Resigning frees the leader's key at once: a standby leads within a second rather than after
    // the lease's TTL. This process exits right after, before the standby's next try.
    if let Some(leading) = leading {
        let leadership = leading.await.context("the leadership's task")?;
        match leadership.resign().await {
            Ok(()) => eprintln!("awq coordinator: resigned the leadership"),
            Err(e) => eprintln!("awq coordinator: could not resign the leadership ({e}); it lapses within its TTL"),
        }
    }
    Ok(())
}

/// How long a stopping coordinator waits for its open connections to close before it exits.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

pub async fn worker(args: WorkerArgs) -> Result<()> {
    let worker_token = args.worker_token.secret()?;
    let tls = args.tls.config()?;
    let serves_tls = tls.as_ref().is_some_and(awq_auth::TlsConfig::serves);
    if let Some(url) = args.coordinator.iter().find(|u| u.starts_with("https://")).filter(|_| !serves_tls) {
        // The coordinator's gateway and the other workers would dial this worker over TLS.
        bail!("--coordinator {url} serves TLS: this worker needs --tls-cert and --tls-key too");
    }
    let devices = super::local::local_devices(&args.devices)?;
    let per_worker = args.gpus_per_worker;
    if per_worker == 0
        || (per_worker > 1 && (devices.contains(&awq_kernels::Device::Cpu) || devices.len() % per_worker != 0))
    {
        bail!(
            "--gpus-per-worker {per_worker} with --device {}: GPUs only, a multiple of {per_worker} of them",
            args.devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
        );
    }
    let groups: Vec<&[awq_kernels::Device]> = devices.chunks(per_worker).collect();
    let name = args.name.unwrap_or_else(|| host_name().unwrap_or_else(|| "worker".into()));
    if args.advertise.is_none() && args.listen.ip().is_unspecified() && args.listen.port() == 0 {
        bail!(
            "--listen {} binds every interface on a port chosen at start: other workers could not be told \
             where to reach it; give a port (the host name is then advertised) or --advertise HOST:PORT",
            args.listen
        );
    }
    let memory_bytes = args.memory_gib.map_or_else(available_memory_bytes, |g| (g * (1u64 << 30) as f64) as u64);
    let n = groups.len();
    // The i-th worker's port: the given one + i (0 stays 0: any free port).
    let port_of = |port: u16, i: usize| -> Result<u16> {
        match port {
            0 => Ok(0),
            p => u16::try_from(p as usize + i).with_context(|| format!("port {p} + {i} is past 65535")),
        }
    };
    let mut configs = Vec::with_capacity(n);
    for (i, group) in groups.into_iter().enumerate() {
        let device = group[0];
        let mut listen = args.listen;
        listen.set_port(port_of(args.listen.port(), i)?);
        let advertise = match &args.advertise {
            None if listen.ip().is_unspecified() => Some(reachable(listen)),
            None => None,
            Some(a) if n == 1 => Some(a.clone()),
            Some(a) => {
                let (host, port) = a.rsplit_once(':').with_context(|| format!("--advertise {a}: expected host:port"))?;
                let port: u16 = port.parse().with_context(|| format!("--advertise {a}: bad port"))?;
                Some(format!("{host}:{}", port_of(port, i)?))
            }
        };
        configs.push(WorkerConfig {
            coordinators: args.coordinator.clone(),
            name: if n == 1 { name.clone() } else { format!("{name}-{}", device.to_string().replace(':', "")) },
            device,
            serving_devices: group.to_vec(),
            memory_bytes: memory_bytes / n as u64,
            resident_bytes: args.resident_bytes,
            inject_fault_at_block: args.inject_fault_at_block,
            stage_listen: listen,
            stage_advertise: advertise,
            worker_token: worker_token.clone(),
            tls: tls.clone(),
        });
    }
    for c in &configs {
        let gib = c.memory_bytes as f64 / (1u64 << 30) as f64;
        let devices = c.serving_devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        eprintln!("awq worker {} ({devices}, {gib:.1} GiB) joining {}", c.name, c.coordinators.join(" or "));
    }
    // One Ctrl-C or SIGTERM stops every device's worker; so does one that fails (the process exits with its
    // error, and the pod restarts as a whole).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = tokio::task::JoinSet::new();
    for config in configs {
        let mut stop = stop_rx.clone();
        workers.spawn(run_worker(config, async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }));
    }
    let stop_on_signal = stop_tx.clone();
    tokio::spawn(async move {
        super::serve::shutdown_signal().await;
        let _ = stop_on_signal.send(true);
    });
    let mut first_error = None;
    while let Some(ended) = workers.join_next().await {
        let ended = ended.context("a worker's task panicked").and_then(|r| {
            r.map_err(|e| match e {
                e @ awq_worker::Error::Unauthenticated { .. } => anyhow::Error::from(e).context(
                    "set --worker-token, --worker-token-file or AWQ_WORKER_TOKEN to the coordinator's worker token",
                ),
                e => anyhow::Error::from(e),
            })
        });
        if let Err(e) = ended {
            let _ = stop_tx.send(true);
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// This machine's name as `/etc/hostname` gives it (a Kubernetes pod's name), if it has one.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/etc/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// `host:port` at which others can reach a socket bound to `bound`: the bound address itself, or for
/// one bound to every interface (`0.0.0.0`, `::`), which names no host another machine could dial,
/// this machine's host name (`localhost` without one).
fn reachable(bound: SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    format!("{}:{}", host_name().unwrap_or_else(|| "localhost".into()), bound.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_on_every_interface_is_advertised_by_host_name() {
        assert_eq!(reachable("127.0.0.1:7001".parse().unwrap()), "127.0.0.1:7001");
        for any in ["0.0.0.0:7001", "[::]:7001"] {
            let url = reachable(any.parse().unwrap());
            let host = url.strip_suffix(":7001").unwrap_or_else(|| panic!("{any} -> {url}: port kept"));
            assert!(!host.is_empty() && host != "0.0.0.0" && host != "[::]", "{any} -> {url}");
        }
    }
}
