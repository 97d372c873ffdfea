//! The link from one stage of a pipelined replica to the next, across workers: [`RemoteStages`],
//! the `awq_serve::pipeline::NextStages` of a stage whose successor runs on another worker, over
//! that worker's `ReplicaService` (`StageInfo`, `StageStep`; the messages converted by
//! `awq_serve::pipeline`).
//!
//! The engine thread (or the previous stage's step) calls it synchronously: each call blocks on the
//! worker's tokio runtime. The next stage may still be loading when this one asks its capacity, so
//! `n_cache_blocks` retries until it answers, within [`STAGE_READY_TIMEOUT`]; a step that gets no
//! answer within [`STEP_TIMEOUT`], or whose connection breaks (HTTP/2 keepalive notices a vanished
//! peer within about 15 s), fails with `EngineStopped`, and the step's requests end with an error.

use std::time::{Duration, Instant};

use awq_auth::{AttachToken, Authed, Secret};
use awq_proto::v1 as pb;
use awq_proto::v1::replica_service_client::ReplicaServiceClient;
use awq_serve::pipeline::{logits_bound, logits_from_wire, step_to_wire, NextStages};
use awq_serve::runner::StepLogits;
use awq_serve::scheduler::StepPlan;
use tokio::runtime::Handle;

/// How long a stage waits for the next one to load and answer `StageInfo`.
pub const STAGE_READY_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long a stage keeps trying to connect to the next one's worker (which listens from the
/// moment it joins: an address that refuses longer is wrong, or its worker is gone).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one step may take through the later stages.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// The stages after this one, reached through the next stage's worker (see the module docs).
pub struct RemoteStages {
    runtime: Handle,
    address: String,
    replica: pb::ReplicaRef,
    client: ReplicaServiceClient<Authed>,
}

impl RemoteStages {
    /// A link to replica `replica`'s next stage at `address` (`host:port`), whose worker requires
    /// `worker_token` (if any), over TLS when `tls` serves it (a cluster is all-TLS or all-plain);
    /// connects lazily. Errors: an address that is not a URI authority.
    pub fn new(
        runtime: Handle,
        address: &str,
        replica: pb::ReplicaRef,
        worker_token: Option<&Secret>,
        tls: Option<&awq_auth::TlsConfig>,
    ) -> Result<RemoteStages, String> {
        let endpoint = awq_auth::endpoint(&awq_auth::peer_url(address, tls), tls)
            .map_err(|e| format!("next_stage_address {address:?}: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        // The channel's connection task runs on the worker's runtime (this is the loading thread).
        let _runtime = runtime.enter();
        let client = ReplicaServiceClient::with_interceptor(endpoint.connect_lazy(), AttachToken::new(worker_token))
            .max_decoding_message_size(awq_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(awq_proto::MAX_MESSAGE_BYTES);
        Ok(RemoteStages { runtime, address: address.to_string(), replica, client })
    }

    fn stopped(&self, why: impl std::fmt::Display) -> awq_serve::Error {
        let r = &self.replica;
        awq_serve::Error::EngineStopped {
            reason: format!("the next stage of replica {} of {} at {}: {why}", r.replica, r.deployment, self.address),
        }
    }
}

impl NextStages for RemoteStages {
    fn n_cache_blocks(&mut self) -> awq_serve::Result<usize> {
        let start = Instant::now();
        loop {
            let mut client = self.client.clone();
            let replica = self.replica.clone();
            let answer = self.runtime.block_on(async move { client.stage_info(replica).await });
            // A connection that failed carries the transport's error as its source; the next
            // stage's own answers (not placed there yet: NOT_FOUND; loading: UNAVAILABLE) do not.
            let waited = start.elapsed();
            match answer {
                Ok(info) => return Ok(info.into_inner().n_cache_blocks as usize),
                Err(status) if std::error::Error::source(&status).is_some() && waited < CONNECT_TIMEOUT => {}
                Err(status)
                    if std::error::Error::source(&status).is_none()
                        && matches!(status.code(), tonic::Code::NotFound | tonic::Code::Unavailable)
                        && waited < STAGE_READY_TIMEOUT => {}
                Err(status) => return Err(self.stopped(format!("no answer to StageInfo: {}", status.message()))),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn forward(
        &mut self,
        plan: &StepPlan,
        argmax_on_device: &[bool],
        hidden: Vec<f32>,
    ) -> awq_serve::Result<StepLogits> {
        let parts = step_to_wire(self.replica.clone(), plan, argmax_on_device, &hidden);
        drop(hidden);
        let mut client = self.client.clone();
        let call = async move {
            let mut replies = client.stage_step(tokio_stream::iter(parts)).await?.into_inner();
            let mut gathered: Option<(pb::StageStepReply, Vec<u8>)> = None;
            while let Some(mut reply) = replies.message().await? {
                let chunk = std::mem::take(&mut reply.logits);
                let (first, bytes) = gathered.get_or_insert_with(|| (reply, Vec::new()));
                bytes.extend_from_slice(&chunk);
                // The next stage is ours, but its reply still may not grow without bound.
                let bound = logits_bound(plan, argmax_on_device, first.vocab_size as usize)
                    .map_err(|e| tonic::Status::data_loss(e.to_string()))?;
                if bytes.len() > bound {
                    let got = bytes.len();
                    return Err(tonic::Status::data_loss(format!(
                        "{got} bytes of logits, more than the step's {bound}"
                    )));
                }
            }
            gathered.ok_or_else(|| tonic::Status::data_loss("the call ended without a reply"))
        };
        let answer = self.runtime.block_on(async move { tokio::time::timeout(STEP_TIMEOUT, call).await });
        match answer {
            Err(_) => Err(self.stopped(format!("no answer within {STEP_TIMEOUT:?}"))),
            Ok(Err(status)) => Err(self.stopped(format!("{:?}: {}", status.code(), status.message()))),
            Ok(Ok((first, bytes))) => logits_from_wire(first, &bytes),
        }
    }
}
