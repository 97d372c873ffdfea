//! The coordinator's tokens over gRPC on loopback, with real tonic clients: every call of the job
//! and deployment APIs needs the admin token (reads too), every call of the worker API the worker
//! token; one kind of token does not open the other's API; a refusal is UNAUTHENTICATED, says
//! which token is needed and never shows one; a refused submit creates no job; the health service
//! answers without a token (Kubernetes' probes carry none).

use std::sync::Arc;

use awq_auth::{AttachToken, Authed, Secret};
use awq_coordinator::store::MemoryStore;
use awq_coordinator::{Coordinator, CoordinatorConfig};
use awq_proto::v1::deployment_service_client::DeploymentServiceClient;
use awq_proto::v1::job_service_client::JobServiceClient;
use awq_proto::v1::worker_command::Command;
use awq_proto::v1::worker_service_client::WorkerServiceClient;
use awq_proto::v1::{self as pb};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const ADMIN: &str = "admin-Secret-4f1c";
const WORKER: &str = "worker-Secret-9b2e";

fn secret(s: &str) -> Secret {
    Secret::new(s, "test").unwrap()
}

fn with(channel: &Channel, token: Option<&str>) -> Authed {
    Authed::new(channel.clone(), AttachToken::new(token.map(secret).as_ref()))
}

/// A refusal: UNAUTHENTICATED, naming the token `kind`, showing neither token.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, kind: &str, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{what}: {status}");
    assert!(status.message().contains(kind), "{what}: {status}");
    for token in [ADMIN, WORKER] {
        assert!(!status.message().contains(token), "{what}: the refusal shows a token: {status}");
    }
}

fn join_request(name: &str) -> pb::JoinRequest {
    pb::JoinRequest {
        name: name.into(),
        compute_device: Some(awq_job::wire::device_to_wire(awq_job::Device::Cpu)),
        gpu_model: String::new(),
        memory_bytes: 1 << 30,
        stage_address: "127.0.0.1:7001".into(),
        protocol_version: awq_proto::PROTOCOL_VERSION,
        replicas: Vec::new(),
        serving_devices: Vec::new(),
    }
}

#[tokio::test]
async fn each_api_needs_its_token() {
    let config = CoordinatorConfig {
        admin_token: Some(secret(ADMIN)),
        worker_token: Some(secret(WORKER)),
        ..Default::default()
    };
    let coordinator = Coordinator::start(Arc::new(MemoryStore::default()), config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(coordinator.serve(listener, async move {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();

    // The job and deployment APIs: no token, the worker's, a near miss: refused, reads included.
    for token in [None, Some(WORKER), Some("admin-Secret-4f1d"), Some("admin-Secret-4f1c0")] {
        let mut jobs = JobServiceClient::new(with(&channel, token));
        let mut deployments = DeploymentServiceClient::new(with(&channel, token));
        let what = |call: &str| format!("{call} with {token:?}");
        let submit = pb::SubmitRequest { model_path: "/nowhere".into(), ..Default::default() };
        assert_refused(jobs.submit(submit).await, "admin token", &what("submit"));
        assert_refused(
            jobs.cancel_job(pb::CancelJobRequest { job_id: "j".into() }).await,
            "admin token",
            &what("cancel"),
        );
        assert_refused(jobs.list_jobs(pb::ListJobsRequest {}).await, "admin token", &what("list_jobs"));
        assert_refused(jobs.list_workers(pb::ListWorkersRequest {}).await, "admin token", &what("list_workers"));
        assert_refused(jobs.get_job(pb::GetJobRequest { job_id: "j".into() }).await, "admin token", &what("get_job"));
        let watch = jobs.watch_job(pb::WatchJobRequest { job_id: "j".into() }).await;
        assert_refused(watch, "admin token", &what("watch_job"));
        let list = deployments.list_deployments(pb::ListDeploymentsRequest {}).await;
        assert_refused(list, "admin token", &what("list_deployments"));
        let deploy = deployments.deploy(pb::DeploymentSpec { name: "d".into(), ..Default::default() }).await;
        assert_refused(deploy, "admin token", &what("deploy"));
        let undeploy = deployments.undeploy(pb::UndeployRequest { name: "d".into() }).await;
        assert_refused(undeploy, "admin token", &what("undeploy"));
    }

    // The worker API: no token, the admin's: refused.
    for token in [None, Some(ADMIN)] {
        let mut workers = WorkerServiceClient::new(with(&channel, token));
        assert_refused(workers.join(join_request("intruder")).await, "worker token", &format!("join with {token:?}"));
        let report = pb::StageFailure { job_id: "j".into(), ..Default::default() };
        assert_refused(workers.report_failure(report).await, "worker token", &format!("report with {token:?}"));
        let id = pb::NcclIdMessage { job_id: "j".into(), ..Default::default() };
        assert_refused(workers.publish_nccl_id(id).await, "worker token", &format!("NCCL id with {token:?}"));
    }

    // With the admin token: the refused submits created nothing, no worker joined, and a submit
    // reaches validation (a model that is not there: INVALID_ARGUMENT, not UNAUTHENTICATED).
    let mut jobs = JobServiceClient::new(with(&channel, Some(ADMIN)));
    assert!(jobs.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner().jobs.is_empty());
    assert!(jobs.list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers.is_empty());
    let submit = pb::SubmitRequest { model_path: "/nowhere".into(), ..Default::default() };
    let refused = jobs.submit(submit).await.expect_err("no such model");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    let mut deployments = DeploymentServiceClient::new(with(&channel, Some(ADMIN)));
    assert!(deployments
        .list_deployments(pb::ListDeploymentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .deployments
        .is_empty());

    // With the worker token, a worker joins.
    let mut workers = WorkerServiceClient::new(with(&channel, Some(WORKER)));
    let mut commands = workers.join(join_request("w")).await.expect("join with the worker token").into_inner();
    let first = commands.next().await.expect("a command").expect("not an error").command;
    assert!(matches!(first, Some(Command::WelcomeWorkerId(_))), "{first:?}");
    let listed = jobs.list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    assert_eq!(listed.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["w"]);

    // Health answers without a token.
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    let health = HealthClient::new(channel.clone()).check(HealthCheckRequest { service: String::new() }).await;
    assert_eq!(health.expect("health without a token").into_inner().status, ServingStatus::Serving as i32);

    drop(commands);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
