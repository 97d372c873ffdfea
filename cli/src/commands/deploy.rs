//! `awq deploy MODEL`, `awq deployments`, `awq undeploy NAME`: serving a checkpoint on the cluster's
//! workers through the coordinator's `DeploymentService`. The coordinator places each replica on an
//! idle worker (a worker that serves takes no quantization stage) and its HTTP gateway answers the
//! OpenAI API for every deployment, `model` being the deployment's served model name (its name
//! unless `--served-model-name` gives another).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use awq_auth::{Authed, Secret};
use awq_proto::v1 as pb;
use awq_proto::v1::deployment_service_client::DeploymentServiceClient;
use clap::Args;
use serde_json::{json, Value};

use super::jobs::status_error;

#[derive(Args)]
#[command(after_help = "\
Examples:
  awq deploy /models/Llama-3-8B-AWQ --name llama3 --replicas 2 --wait
  awq deploy /models/SmolLM2-AWQ --name smol --tp 3          # CPU workers: 3 ranks on threads
  awq deploy /models/Llama-3-8B-AWQ --name llama3 --if-exists replace --wait   # idempotent (Helm hooks)
  curl http://COORDINATOR:8000/v1/completions -d '{\"model\": \"llama3\", \"prompt\": \"Hi\"}'")]
pub struct DeployArgs {
    /// The checkpoint directory, as the workers see it (AutoAWQ GEMM, fp16 or bf16).
    pub model: PathBuf,
    /// The deployment's name ([a-z0-9][a-z0-9._-]*, `awq undeploy NAME`); default: the model
    /// directory's name, lowercased.
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub deployment: DeploymentFlags,
    /// What to do when a deployment of this name exists: `error`; `keep` it as it is (whatever
    /// its spec); `replace` it when its spec differs from this one (undeployed, then deployed
    /// again: its replicas reload), else keep it. `--wait` then waits for the one kept or made.
    #[arg(long, value_enum, value_name = "WHAT", default_value_t = IfExists::Error)]
    pub if_exists: IfExists,
    /// Wait until every replica is ready (or one fails for good).
    #[arg(long)]
    pub wait: bool,
    /// Seconds `--wait` waits at most.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub timeout: u64,
    #[command(flatten)]
    pub client: super::jobs::ClientArgs,
}

/// `awq deploy --if-exists`: what a deploy does with a deployment of the same name. (The variants
/// have no doc comments: clap would list them one per line and switch all of `--help` to its long
/// layout; `--if-exists`'s own help says what each does.)
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IfExists {
    // Refuse (the coordinator's "exists already").
    Error,
    // Keep the existing deployment, whatever its spec.
    Keep,
    // Keep it when its spec is this one; otherwise undeploy it and deploy this one.
    Replace,
}

/// How a deployment is served (`awq deploy`, and `awq submit --deploy`).
#[derive(Args, Default)]
pub struct DeploymentFlags {
    /// What clients send as `model` (any text, e.g. `meta-llama/Llama-3.1-8B-Instruct`); default:
    /// the deployment's name.
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Tensor-parallel ranks per replica (CPU workers: threads; a GPU worker: one per GPU it serves
    /// on, which `awq worker` offers one of per device today); default 1.
    #[arg(long, visible_alias = "tensor-parallel-size", value_name = "T")]
    pub tp: Option<u32>,
    /// Pipeline stages per replica, one worker each (contiguous, even ranges of the model's decoder
    /// blocks; for a model that one worker cannot hold); default 1.
    #[arg(long, visible_alias = "pipeline-parallel-size", value_name = "P")]
    pub pp: Option<u32>,
    /// Replicas, each on workers of its own; default 1.
    #[arg(long, value_name = "R")]
    pub replicas: Option<u32>,
    /// Prompt plus generated tokens per request, at most; default: config.json's
    /// max_position_embeddings.
    #[arg(long, value_name = "N")]
    pub max_model_len: Option<u32>,
    /// Requests in a replica's running batch, at most (default 256).
    #[arg(long, value_name = "N")]
    pub max_num_seqs: Option<u32>,
    /// Tokens per engine step (default: 2048 on the CPU, 8192 on a GPU).
    #[arg(long, value_name = "N")]
    pub max_num_batched_tokens: Option<u32>,
    /// Tokens per KV-cache block (default 16).
    #[arg(long, value_name = "N")]
    pub block_size: Option<u32>,
    /// The share of a GPU's memory a replica may take (default 0.9).
    #[arg(long, value_name = "F")]
    pub gpu_memory_utilization: Option<f32>,
    /// A replica's KV cache in bytes (default: 1 GiB on the CPU, from free memory on a GPU).
    #[arg(long, value_name = "BYTES")]
    pub kv_cache_bytes: Option<u64>,
    /// Requests waiting per replica before 429 (default 1024).
    #[arg(long, value_name = "N")]
    pub max_waiting: Option<u32>,
    /// Run every kernel one by one (no CUDA graphs).
    #[arg(long)]
    pub enforce_eager: bool,
}

impl DeploymentFlags {
    /// Whether no flag was given (`awq submit` without `--deploy` takes none).
    pub fn is_default(&self) -> bool {
        let DeploymentFlags {
            served_model_name,
            tp,
            pp,
            replicas,
            max_model_len,
            max_num_seqs,
            max_num_batched_tokens,
            block_size,
            gpu_memory_utilization,
            kv_cache_bytes,
            max_waiting,
            enforce_eager,
        } = self;
        served_model_name.is_none()
            && [tp, pp, replicas, max_model_len, max_num_seqs, max_num_batched_tokens, block_size, max_waiting]
                .iter()
                .all(|v| v.is_none())
            && gpu_memory_utilization.is_none()
            && kv_cache_bytes.is_none()
            && !enforce_eager
    }

    /// The spec of deployment `name` of `model_path` (checked by the coordinator; 0 on the wire
    /// is "the engine's default").
    pub fn spec(&self, name: String, model_path: String) -> pb::DeploymentSpec {
        let engine = pb::EngineOptions {
            max_model_len: self.max_model_len.unwrap_or(0),
            max_num_seqs: self.max_num_seqs.unwrap_or(0),
            max_num_batched_tokens: self.max_num_batched_tokens.unwrap_or(0),
            block_size: self.block_size.unwrap_or(0),
            gpu_memory_utilization: self.gpu_memory_utilization.unwrap_or(0.0),
            kv_cache_bytes: self.kv_cache_bytes.unwrap_or(0),
            max_waiting: self.max_waiting.unwrap_or(0),
            enforce_eager: self.enforce_eager,
        };
        pb::DeploymentSpec {
            name,
            model_path,
            tp: self.tp.unwrap_or(1),
            pp: self.pp.unwrap_or(1),
            replicas: self.replicas.unwrap_or(1),
            engine: Some(engine),
            served_model_name: self.served_model_name.clone().unwrap_or_default(),
        }
    }
}

#[derive(Args)]
pub struct UndeployArgs {
    /// The deployment's name.
    pub name: String,
    #[command(flatten)]
    pub client: super::jobs::ClientArgs,
}

/// A client of the deployment API of the coordinator at `url`, sending `token` (if any).
pub(crate) async fn connect(
    url: &str,
    token: Option<&Secret>,
    tls: Option<&awq_auth::TlsConfig>,
) -> Result<DeploymentServiceClient<Authed>> {
    Ok(DeploymentServiceClient::new(super::jobs::channel(url, token, tls).await?))
}

/// The deployment API of `--coordinator`, sending --token.
async fn client(args: &super::jobs::ClientArgs) -> Result<DeploymentServiceClient<Authed>> {
    Ok(DeploymentServiceClient::new(args.channel().await?))
}

/// The default deployment name of a model directory: its name, lowercased, other characters as `-`.
pub(crate) fn default_name(model: &std::path::Path) -> String {
    let base = model.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let name: String =
        base.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' }).collect();
    name.trim_start_matches(['.', '_', '-']).chars().take(awq_job::deployment::MAX_NAME_BYTES).collect()
}

fn state_name(state: i32) -> &'static str {
    match pb::ReplicaState::try_from(state).unwrap_or(pb::ReplicaState::Unspecified) {
        pb::ReplicaState::Unspecified => "unknown",
        pb::ReplicaState::Pending => "pending",
        pb::ReplicaState::Loading => "loading",
        pb::ReplicaState::Ready => "ready",
        pb::ReplicaState::Failed => "failed",
    }
}

fn deployment_json(d: &pb::Deployment) -> Value {
    let spec = d.spec.clone().unwrap_or_default();
    json!({
        "name": spec.name,
        "served_model_name": if spec.served_model_name.is_empty() { &spec.name } else { &spec.served_model_name },
        "model": spec.model_path,
        "tp": spec.tp,
        "pp": spec.pp,
        "replicas": d.replicas.iter().map(|r| json!({
            "index": r.index,
            "state": state_name(r.state),
            "worker": r.worker_id,
            "address": r.address,
            "generation": r.generation,
            "error": r.error,
            "stage_workers": r.stage_workers,
        })).collect::<Vec<_>>(),
    })
}

fn print_deployment(d: &pb::Deployment) {
    let spec = d.spec.clone().unwrap_or_default();
    let ready = d.replicas.iter().filter(|r| r.state == pb::ReplicaState::Ready as i32).count();
    let served = match spec.served_model_name.as_str() {
        "" => String::new(),
        s if s == spec.name => String::new(),
        s => format!(" (served as {s})"),
    };
    out!(
        "{}{served}  {}  tp {} pp {}  {ready}/{} ready",
        spec.name,
        spec.model_path,
        spec.tp,
        spec.pp,
        d.replicas.len()
    );
    for r in &d.replicas {
        let on = match (r.worker_id.is_empty(), r.stage_workers.len() > 1) {
            (true, _) => String::new(),
            (false, false) => format!(" on {} ({})", r.worker_id, r.address),
            (false, true) => format!(" on {} (stages; the first at {})", r.stage_workers.join(" -> "), r.address),
        };
        let why = if r.error.is_empty() { String::new() } else { format!(": {}", r.error) };
        out!("  replica {}: {}{on}{why}", r.index, state_name(r.state));
    }
}

pub async fn deploy(args: DeployArgs) -> Result<()> {
    // The coordinator needs an absolute path; a relative one is taken from here.
    let model = std::path::absolute(&args.model).with_context(|| format!("{}", args.model.display()))?;
    let name = args.name.clone().unwrap_or_else(|| default_name(&model));
    let spec = args.deployment.spec(name.clone(), model.to_string_lossy().into_owned());
    let mut client = client(&args.client).await?;
    let mut d = match client.deploy(spec.clone()).await {
        Ok(d) => d.into_inner(),
        Err(s) if s.code() == tonic::Code::AlreadyExists && args.if_exists != IfExists::Error => {
            existing_or_replaced(&mut client, spec, args.if_exists, s).await?
        }
        Err(s) => return Err(status_error("deploy", s)),
    };
    if args.wait {
        let deadline = Instant::now() + Duration::from_secs(args.timeout);
        loop {
            let states: Vec<i32> = d.replicas.iter().map(|r| r.state).collect();
            if states.iter().all(|&s| s == pb::ReplicaState::Ready as i32) {
                break;
            }
            if let Some(r) = d.replicas.iter().find(|r| r.state == pb::ReplicaState::Failed as i32) {
                bail!("deployment {name}: replica {} failed: {}", r.index, r.error);
            }
            if Instant::now() > deadline {
                let ready = states.iter().filter(|&&s| s == pb::ReplicaState::Ready as i32).count();
                bail!(
                    "deployment {name}: {ready} of {} replicas ready after --timeout {} s",
                    states.len(),
                    args.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            let request = pb::GetDeploymentRequest { name: name.clone() };
            d = client.get_deployment(request).await.map_err(|s| status_error("deployment", s))?.into_inner();
        }
    }
    if args.client.json {
        out!("{}", deployment_json(&d));
    } else {
        print_deployment(&d);
    }
    Ok(())
}

/// `--if-exists keep|replace` after the coordinator refused `spec` with AlreadyExists (`refusal`):
/// the deployment of that name kept, or replaced by `spec` when `how` is `Replace` and the specs
/// differ. AlreadyExists also means that another deployment serves `spec`'s served model name:
/// then there is no deployment of this name, and the refusal stands.
async fn existing_or_replaced(
    client: &mut DeploymentServiceClient<Authed>,
    spec: pb::DeploymentSpec,
    how: IfExists,
    refusal: tonic::Status,
) -> Result<pb::Deployment> {
    let name = spec.name.clone();
    let existing = match client.get_deployment(pb::GetDeploymentRequest { name: name.clone() }).await {
        Ok(d) => d.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => return Err(status_error("deploy", refusal)),
        Err(s) => return Err(status_error("deployment", s)),
    };
    // Compared as the coordinator checked them (a served model name left empty is the name; an
    // engine option left 0 is its default), so an unchanged spec never counts as a change.
    let checked = |s: &pb::DeploymentSpec| awq_job::deployment::DeploymentSpec::try_from(s).ok();
    let same = existing.spec.as_ref().and_then(checked).is_some_and(|e| Some(e) == checked(&spec));
    if same {
        eprintln!("deployment {name} exists already with this spec; kept");
        return Ok(existing);
    }
    if how == IfExists::Keep {
        eprintln!("deployment {name} exists with another spec; kept as it is (--if-exists keep)");
        return Ok(existing);
    }
    // A served model name that another deployment holds would fail the deploy after the undeploy.
    let served = checked(&spec).map(|s| s.served_model_name).unwrap_or_default();
    let list =
        client.list_deployments(pb::ListDeploymentsRequest {}).await.map_err(|s| status_error("deployments", s))?;
    if let Some(other) = list
        .into_inner()
        .deployments
        .iter()
        .filter_map(|d| d.spec.as_ref().and_then(checked))
        .find(|d| d.name != name && d.served_model_name == served)
    {
        bail!("deployment {} serves the model name {served:?} already; deployment {name} is kept as it is", other.name);
    }
    eprintln!("deployment {name} exists with another spec; replacing it (--if-exists replace)");
    client.undeploy(pb::UndeployRequest { name }).await.map_err(|s| status_error("undeploy", s))?;
    Ok(client.deploy(spec).await.map_err(|s| status_error("deploy", s))?.into_inner())
}

pub async fn deployments(args: super::jobs::ClientArgs) -> Result<()> {
    let mut client = client(&args).await?;
    let list =
        client.list_deployments(pb::ListDeploymentsRequest {}).await.map_err(|s| status_error("deployments", s))?;
    let list = list.into_inner().deployments;
    if args.json {
        out!("{}", Value::Array(list.iter().map(deployment_json).collect()));
    } else if list.is_empty() {
        out!("no deployments");
    } else {
        list.iter().for_each(print_deployment);
    }
    Ok(())
}

pub async fn undeploy(args: UndeployArgs) -> Result<()> {
    let mut client = client(&args.client).await?;
    client.undeploy(pb::UndeployRequest { name: args.name.clone() }).await.map_err(|s| status_error("undeploy", s))?;
    if args.client.json {
        out!("{}", json!({"undeployed": args.name}));
    } else {
        out!("undeployed {}", args.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_deployment_names() {
        assert_eq!(default_name("/m/SmolLM2-135M-AWQ".as_ref()), "smollm2-135m-awq");
        assert_eq!(default_name("/m/_Llama 3 (8B)".as_ref()), "llama-3--8b-");
        for model in ["/m/SmolLM2-135M-AWQ", "/m/_Llama 3 (8B)"] {
            awq_job::deployment::check_name(&default_name(model.as_ref())).unwrap();
        }
    }
}
