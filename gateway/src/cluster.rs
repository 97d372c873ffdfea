//! The models of a cluster: every deployment of a coordinator, served under its served model name
//! (the deployment's name unless it gave another), each request sent to the least loaded ready
//! replica of the deployment serving its `model` ([`ClusterModels`], the [`Models`] the
//! coordinator's HTTP gateway and `awq serve` serve).
//!
//! Where replicas are comes from a [`ReplicaDirectory`] (the coordinator's state, through a thin
//! adapter in the binary: this crate does not depend on the coordinator). A refresher task keeps one
//! [`RemoteReplica`] connection per ready replica: it connects the replicas that became ready (or
//! were placed again, a new generation), drops those that are gone, every [`REFRESH`]; a request
//! for a model whose replicas are not connected yet connects them on the spot, and so do /health
//! and /v1/models ([`Models::refresh`]). The least loaded
//! replica is the one with the fewest of this gateway's requests in flight
//! ([`RemoteReplica::in_flight`]), the lowest index on a tie. A deployment without a ready replica
//! answers 503, an unknown model 404.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use awq_auth::Secret;
use awq_serve::engine::EngineStats;

use crate::{async_trait, combine_stats, ApiError, Backend, ModelListing, Models, RemoteReplica};

/// How often the refresher compares the connections with the directory.
pub const REFRESH: Duration = Duration::from_millis(500);

/// A ready replica, as the directory names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaAddress {
    pub index: u32,
    /// Its placement: a new one (the replica placed again, or its deployment made again under the
    /// same name, whose generations start over) is a new connection.
    pub generation: u32,
    /// When its deployment was made (what tells a deployment made again apart).
    pub deployed_unix_ms: u64,
    /// Its worker's `ReplicaService`, `host:port`.
    pub address: String,
}

/// A deployment and the model name it is served as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedDeployment {
    /// The deployment's name in the cluster (its replicas' `ReplicaRef`s carry it).
    pub deployment: String,
    /// What clients send as `model` (unique among a cluster's deployments).
    pub model: String,
}

/// Where a cluster's deployments and their ready replicas are.
pub trait ReplicaDirectory: Send + Sync + 'static {
    /// Every deployment, ready or not.
    fn deployments(&self) -> Vec<ServedDeployment>;
    /// The ready replicas of deployment `name` (none for an unknown name).
    fn ready(&self, name: &str) -> Vec<ReplicaAddress>;
}

/// One connected replica.
struct Connected {
    generation: u32,
    deployed_unix_ms: u64,
    address: String,
    replica: Arc<RemoteReplica>,
    /// When it was connected (OpenAI's `created` of its model).
    since: u64,
}

/// Every deployment's connected replicas, by served model name and replica index.
type Connections = HashMap<String, HashMap<u32, Connected>>;

/// See the module docs.
pub struct ClusterModels<D: ReplicaDirectory> {
    directory: D,
    /// What the replicas' workers require (the cluster's worker token).
    worker_token: Option<Secret>,
    /// TLS to the replicas' workers when it serves it (a cluster is all-TLS or all-plain).
    tls: Option<awq_auth::TlsConfig>,
    connections: Mutex<Connections>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl<D: ReplicaDirectory> ClusterModels<D> {
    /// The models of `directory`, whose replicas' workers require `worker_token` (if any) and are
    /// reached over TLS when `tls` serves it, with the refresher running on the current tokio
    /// runtime (it stops when the last `Arc` goes).
    pub fn start(
        directory: D,
        worker_token: Option<Secret>,
        tls: Option<awq_auth::TlsConfig>,
    ) -> Arc<ClusterModels<D>> {
        let connections = Mutex::new(HashMap::new());
        let models = Arc::new(ClusterModels { directory, worker_token, tls, connections });
        let weak: Weak<ClusterModels<D>> = Arc::downgrade(&models);
        tokio::spawn(async move {
            loop {
                let Some(models) = weak.upgrade() else { return };
                for d in models.directory.deployments() {
                    models.connect(&d).await;
                }
                models.forget_gone();
                drop(models);
                tokio::time::sleep(REFRESH).await;
            }
        });
        models
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects the ready replicas of `d` not connected yet (or placed again), drops its
    /// connections to replicas no longer ready.
    async fn connect(&self, d: &ServedDeployment) {
        let (name, model) = (&d.deployment, &d.model);
        let ready = self.directory.ready(name);
        let missing: Vec<ReplicaAddress> = {
            let mut all = self.lock();
            let connected = all.entry(model.clone()).or_default();
            connected.retain(|index, c| {
                ready.iter().any(|r| {
                    r.index == *index
                        && r.generation == c.generation
                        && r.deployed_unix_ms == c.deployed_unix_ms
                        && r.address == c.address
                })
            });
            ready.into_iter().filter(|r| !connected.contains_key(&r.index)).collect()
        };
        for r in missing {
            match RemoteReplica::connect(&r.address, name, r.index, self.worker_token.as_ref(), self.tls.as_ref()).await
            {
                Ok(replica) => {
                    let connected = Connected {
                        generation: r.generation,
                        deployed_unix_ms: r.deployed_unix_ms,
                        address: r.address,
                        replica: Arc::new(replica),
                        since: unix_now(),
                    };
                    self.lock().entry(model.clone()).or_default().insert(r.index, connected);
                }
                // Tried again at the next refresh (its worker may still be opening its port).
                Err(e) => tracing::warn!("deployment {name}: {e}"),
            }
        }
    }

    /// Drops the connections of deployments that are gone.
    fn forget_gone(&self) {
        let served = self.directory.deployments();
        self.lock().retain(|model, _| served.iter().any(|d| d.model == *model));
    }

    /// The least loaded connected replica of `model`.
    fn least_loaded(&self, model: &str) -> Option<Arc<RemoteReplica>> {
        let all = self.lock();
        let connected = all.get(model)?;
        let mut replicas: Vec<(&u32, &Connected)> = connected.iter().collect();
        replicas.sort_by_key(|(index, c)| (c.replica.in_flight(), **index));
        replicas.first().map(|(_, c)| c.replica.clone())
    }
}

#[async_trait]
impl<D: ReplicaDirectory> Models for ClusterModels<D> {
    async fn refresh(&self) {
        let connect_all = async {
            for d in self.directory.deployments() {
                self.connect(&d).await;
            }
        };
        // What is not connected within the bound is left to the refresher.
        let _ = tokio::time::timeout(crate::REFRESH_BOUND, connect_all).await;
    }

    fn list(&self) -> Vec<ModelListing> {
        let all = self.lock();
        let mut list: Vec<ModelListing> = all
            .iter()
            .filter_map(|(name, connected)| {
                let first = connected.values().min_by_key(|c| c.since)?;
                Some(ModelListing {
                    name: name.clone(),
                    created: first.since,
                    max_model_len: first.replica.model().max_model_len,
                })
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    async fn pick(&self, model: &str) -> Result<Arc<dyn Backend>, ApiError> {
        if let Some(replica) = self.least_loaded(model) {
            return Ok(replica);
        }
        let served = self.directory.deployments();
        let Some(d) = served.iter().find(|d| d.model == model) else {
            let names: Vec<String> = served.into_iter().map(|d| d.model).collect();
            return Err(ApiError::model_not_found(model, &names));
        };
        // Ready since the last refresh, perhaps: connect now rather than make the client wait.
        self.connect(d).await;
        self.least_loaded(model).map(|r| r as Arc<dyn Backend>).ok_or_else(|| {
            let name = &d.deployment;
            ApiError::unavailable(format!("deployment {name} has no ready replica now; `awq deployments` shows why"))
        })
    }

    async fn stats(&self) -> Vec<(String, EngineStats)> {
        let replicas: Vec<(String, Arc<RemoteReplica>)> = self
            .lock()
            .iter()
            .flat_map(|(name, connected)| connected.values().map(|c| (name.clone(), c.replica.clone())))
            .collect();
        let mut by_model: HashMap<String, Vec<EngineStats>> = HashMap::new();
        for (name, replica) in replicas {
            match replica.stats().await {
                Ok(stats) => by_model.entry(name).or_default().push(stats),
                Err(e) => tracing::warn!("/metrics: {e}"),
            }
        }
        let mut out: Vec<(String, EngineStats)> =
            by_model.into_iter().map(|(name, s)| (name, combine_stats(s))).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
