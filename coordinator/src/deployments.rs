//! The coordinator's `DeploymentService` (deploy, get, list, undeploy), the deployments' records in
//! the store, and what the HTTP gateway asks of them (which replicas of a deployment are ready, and
//! where).
//!
//! A `Deploy` call is checked here once ([`check`]: the spec's fields by
//! `awq_job::deployment::DeploymentSpec`, the model under the coordinator's roots and readable as
//! a checkpoint of a known architecture), then the state places its replicas
//! ([`crate::state::serving`]). Records (`keys::deployment`, the `Deployment` message: spec and each
//! replica's generation) are written after every change and read back at start, every replica
//! pending until its worker joins again and lists it.

use awq_job::deployment::DeploymentSpec;
use awq_model::Checkpoint;
use awq_proto::v1 as pb;
use awq_proto::v1::deployment_service_server::DeploymentService;
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::service::now_ms;
use crate::state::{Deployment, ReplicaState, State};
use crate::store::{keys, Store};
use crate::validate::under_roots;
use crate::wire::deployment_to_wire;
use crate::{Coordinator, Error, Result};

/// A `Deploy` request checked (see the module docs). Reads the model's config: call off the
/// async threads.
/// The spec, with the model's decoder blocks.
fn check(spec: &pb::DeploymentSpec, roots: &[std::path::PathBuf]) -> Result<(DeploymentSpec, usize)> {
    let spec = DeploymentSpec::try_from(spec)?;
    if !spec.model.is_absolute() {
        return Err(Error::Invalid {
            field: "model_path",
            detail: format!("{} is not an absolute path", spec.model.display()),
        });
    }
    if !under_roots(&spec.model, roots) {
        return Err(Error::Invalid {
            field: "model_path",
            detail: format!("{} is not under the coordinator's roots {roots:?}", spec.model.display()),
        });
    }
    let checkpoint = Checkpoint::open(&spec.model)?;
    check_split(&spec, checkpoint.config())?;
    Ok((spec, checkpoint.config().n_blocks))
}

/// What the engine would refuse at load, refused now: `spec`'s ranks must split the heads and the
/// MLP of a model of config `c`, and its stages its decoder blocks (one at least each).
pub(crate) fn check_split(spec: &DeploymentSpec, c: &awq_model::ModelConfig) -> Result<()> {
    if spec.pp > c.n_blocks {
        return Err(Error::Invalid {
            field: "pp",
            detail: format!("{} stages for {} decoder blocks: at most one stage per block", spec.pp, c.n_blocks),
        });
    }
    // Each expert of a mixture of experts splits like the dense MLP, over its own width.
    let expert_width = c.moe.as_ref().map_or(0, |m| m.expert_intermediate_size);
    let fits = c.n_heads % spec.tp == 0
        && c.intermediate_size % spec.tp == 0
        && expert_width % spec.tp == 0
        && (c.n_kv_heads % spec.tp == 0 || spec.tp % c.n_kv_heads == 0);
    if !fits {
        let experts = if expert_width > 0 { format!(", {expert_width} columns of each expert") } else { String::new() };
        return Err(Error::Invalid {
            field: "tp",
            detail: format!(
                "{} does not split {} attention heads, {} KV heads and {} MLP columns{experts} evenly",
                spec.tp, c.n_heads, c.n_kv_heads, c.intermediate_size
            ),
        });
    }
    Ok(())
}

/// Reads the deployments an earlier coordinator recorded back into `state` (see the module docs).
pub(crate) async fn resume(store: &dyn Store, state: &mut State) -> Result<()> {
    for (key, value) in store.list(keys::DEPLOYMENTS).await? {
        let record =
            pb::Deployment::decode(&value[..]).map_err(|e| Error::Store(format!("{key}: not a Deployment: {e}")))?;
        let spec = match record.spec.as_ref().map(DeploymentSpec::try_from) {
            Some(Ok(spec)) => spec,
            Some(Err(e)) => {
                warn!("{key}: dropped, its spec no longer checks: {}: {}", e.field, e.detail);
                continue;
            }
            None => continue,
        };
        let generations: Vec<u32> = record.replicas.iter().map(|r| r.generation).collect();
        tracing::info!(deployment = %spec.name, "deployment read back; its replicas wait for their workers");
        state.resume_deployment(spec, record.n_blocks as usize, record.created_unix_ms, &generations);
    }
    Ok(())
}

/// Writes the deployments that changed and removes the undeployed ones (after the state's lock).
pub(crate) async fn persist(store: &dyn Store, changed: Vec<Deployment>, removed: Vec<String>) {
    for d in changed {
        let record = deployment_to_wire(&d, |_| None).encode_to_vec();
        if let Err(e) = store.put(&keys::deployment(&d.spec.name), record).await {
            warn!(deployment = %d.spec.name, "cannot persist the deployment: {e}");
        }
    }
    for name in removed {
        if let Err(e) = store.delete_prefix(&keys::deployment(&name)).await {
            warn!(deployment = %name, "cannot remove the deployment from the store: {e}");
        }
    }
}

/// A ready replica of a deployment, as the gateway reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyReplica {
    pub deployment: String,
    pub index: u32,
    pub generation: u32,
    /// When its deployment was made (a deployment made again under the same name starts its
    /// generations over).
    pub deployed_unix_ms: u64,
    /// Its worker's `ReplicaService`, `host:port`.
    pub address: String,
}

impl Coordinator {
    /// The ready replicas of deployment `name` (empty when it has none, or no such deployment).
    pub fn ready_replicas(&self, name: &str) -> Vec<ReadyReplica> {
        let inner = self.lock();
        let Some(d) = inner.state.deployment(name) else { return Vec::new() };
        let address = |w: &str| inner.state.workers().find(|r| r.id == w).map(|r| r.stage_address.clone());
        d.replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Ready)
            .filter_map(|r| {
                Some(ReadyReplica {
                    deployment: name.to_string(),
                    index: r.index,
                    generation: r.generation,
                    deployed_unix_ms: d.created_unix_ms,
                    address: address(r.leader()?)?,
                })
            })
            .collect()
    }

    /// Every deployment: its name and the model name it is served as.
    pub fn served_models(&self) -> Vec<(String, String)> {
        self.lock().state.deployments().map(|d| (d.spec.name.clone(), d.spec.served_model_name.clone())).collect()
    }

    fn deployment_message(&self, d: &Deployment) -> pb::Deployment {
        let inner = self.lock();
        deployment_to_wire(d, |w| inner.state.workers().find(|r| r.id == w).map(|r| r.stage_address.clone()))
    }
}

#[tonic::async_trait]
impl DeploymentService for Coordinator {
    async fn deploy(
        &self,
        request: Request<pb::DeploymentSpec>,
    ) -> std::result::Result<Response<pb::Deployment>, Status> {
        let spec = request.into_inner();
        let roots = self.shared.config.roots.clone();
        let spec = tokio::task::spawn_blocking(move || check(&spec, &roots))
            .await
            .map_err(|e| Status::internal(format!("validation panicked: {e}")))??;
        let (spec, n_blocks) = spec;
        self.store_answers("nothing was deployed").await?;
        let (deployed, out) = self.update(|inner, fx| inner.state.deploy(spec, n_blocks, None, now_ms(), fx));
        let deployed = deployed?;
        self.apply(out).await;
        Ok(Response::new(self.deployment_message(&deployed)))
    }

    async fn get_deployment(
        &self,
        request: Request<pb::GetDeploymentRequest>,
    ) -> std::result::Result<Response<pb::Deployment>, Status> {
        let name = request.into_inner().name;
        let d = self.lock().state.deployment(&name).cloned().ok_or_else(|| Error::NoSuchDeployment(name))?;
        Ok(Response::new(self.deployment_message(&d)))
    }

    async fn list_deployments(
        &self,
        _: Request<pb::ListDeploymentsRequest>,
    ) -> std::result::Result<Response<pb::ListDeploymentsResponse>, Status> {
        let all: Vec<Deployment> = self.lock().state.deployments().cloned().collect();
        Ok(Response::new(pb::ListDeploymentsResponse {
            deployments: all.iter().map(|d| self.deployment_message(d)).collect(),
        }))
    }

    async fn undeploy(
        &self,
        request: Request<pb::UndeployRequest>,
    ) -> std::result::Result<Response<pb::UndeployResponse>, Status> {
        let name = request.into_inner().name;
        let (undeployed, out) = self.update(|inner, fx| inner.state.undeploy(&name, fx));
        undeployed?;
        self.apply(out).await;
        Ok(Response::new(pb::UndeployResponse {}))
    }
}
