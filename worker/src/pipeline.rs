//! The link from one stage of a pipelined replica to the next, across workers: [`RemoteStages`],
//! the `awq_serve::pipeline::NextStages` of a stage whose successor runs on another worker, over
//! that worker's `ReplicaService` (`StageInfo`, `StageStep`; the messages converted by
//! `awq_serve::pipeline`).
//!
//! Between two GPU stages the hidden states take an NCCL link instead ([`crate::stage_link`]),
//! offered once the next stage has loaded; the plan and the logits stay on gRPC.
//!
//! The engine thread (or the previous stage's step) calls it synchronously: each call blocks on the
//! worker's tokio runtime. The next stage may still be loading when this one asks its capacity, so
//! `n_cache_blocks` retries until it answers, within [`STAGE_READY_TIMEOUT`]; a step that gets no
//! answer within [`STEP_TIMEOUT`], or whose connection breaks (HTTP/2 keepalive notices a vanished
//! peer within about 15 s), fails with `EngineStopped`, and the step's requests end with an error.

use std::time::{Duration, Instant};

use awq_auth::{AttachToken, Authed, Secret};
use awq_kernels::{Device, Tensor};
use awq_proto::v1 as pb;
use awq_proto::v1::replica_service_client::ReplicaServiceClient;
use awq_serve::pipeline::{logits_bound, logits_from_wire, step_to_wire, NextStages};
use awq_serve::runner::StepLogits;
use awq_serve::scheduler::StepPlan;
use tokio::runtime::Handle;
use tracing::info;

use crate::stage_link::{LinkToNext, JOIN_TIMEOUT};

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
    /// This stage's leader's device: where its hidden states are.
    device: Device,
    /// The NCCL link to the next stage, between two GPU stages that could make one.
    link: Option<LinkToNext>,
    handoff: Handoff,
}

/// What the steps' handoffs to the next stage cost: each step's wait here (from this stage's
/// output to the logits back) minus the time the next stages said the step took there. Logged at
/// debug level every [`Handoff::EVERY`] steps.
#[derive(Default)]
struct Handoff {
    steps: u64,
    wait_s: f64,
    there_s: f64,
}

impl Handoff {
    const EVERY: u64 = 100;

    fn record(&mut self, wait_s: f64, there_s: f64, over_link: bool, address: &str) {
        (self.steps, self.wait_s, self.there_s) = (self.steps + 1, self.wait_s + wait_s, self.there_s + there_s);
        if self.steps.is_multiple_of(Self::EVERY) {
            let per_step = |s: f64| 1e3 * s / Self::EVERY as f64;
            let road = if over_link { "NCCL" } else { "gRPC" };
            tracing::debug!(
                "handoff to the next stage at {address} over {road}: {:.3} ms per step over the last {} steps \
                 (waited {:.3} ms, the next stages computed {:.3} ms)",
                per_step(self.wait_s - self.there_s),
                Self::EVERY,
                per_step(self.wait_s),
                per_step(self.there_s)
            );
            (self.wait_s, self.there_s) = (0.0, 0.0);
        }
    }
}

impl RemoteStages {
    /// A link to replica `replica`'s next stage at `address` (`host:port`), whose worker requires
    /// `worker_token` (if any), over TLS when `tls` serves it (a cluster is all-TLS or all-plain),
    /// from this stage on `device` (its leader's); connects lazily. Errors: an address that is not
    /// a URI authority.
    pub fn new(
        runtime: Handle,
        address: &str,
        replica: pb::ReplicaRef,
        worker_token: Option<&Secret>,
        tls: Option<&awq_auth::TlsConfig>,
        device: Device,
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
        let address = address.to_string();
        Ok(RemoteStages { runtime, address, replica, client, device, link: None, handoff: Handoff::default() })
    }

    /// Offers the next stage (loaded: it answered `StageInfo`) an NCCL link, when this stage is on
    /// a GPU, and says which road the hidden states take.
    fn offer_link(&mut self) {
        if self.device == Device::Cpu {
            return;
        }
        let r = &self.replica;
        let (deployment, replica, address) = (&r.deployment, r.replica, &self.address);
        match self.link_to_next() {
            Ok(link) => {
                info!(%deployment, replica, "hidden states to the next stage at {address}: over NCCL");
                self.link = Some(link);
            }
            Err(why) => info!(%deployment, replica, "hidden states to the next stage at {address}: over gRPC ({why})"),
        }
    }

    fn link_to_next(&self) -> Result<LinkToNext, String> {
        let (link, nccl_id) = LinkToNext::start(self.device)?;
        let mut client = self.client.clone();
        let call = pb::StageLinkCall { replica: Some(self.replica.clone()), nccl_id };
        // The next stage answers within its own JOIN_TIMEOUT; the margin is for the call itself.
        let answer = self.runtime.block_on(async move {
            tokio::time::timeout(JOIN_TIMEOUT + Duration::from_secs(10), client.stage_link(call)).await
        });
        // A refused or failed link is dropped, which aborts this end's join.
        match answer {
            Ok(Ok(_)) => link.joined(),
            Ok(Err(status)) => Err(format!("the next stage did not join: {}", status.message())),
            Err(_) => Err(format!("the next stage did not join within {JOIN_TIMEOUT:?}")),
        }
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
                Ok(info) => {
                    self.offer_link();
                    return Ok(info.into_inner().n_cache_blocks as usize);
                }
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
        hidden: Tensor,
    ) -> awq_serve::Result<StepLogits> {
        let started = Instant::now();
        let over_link = self.link.is_some() && hidden.device() == self.device;
        let parts = match over_link {
            true => step_to_wire(self.replica.clone(), plan, argmax_on_device, None),
            false => {
                let values = hidden.to_f32_vec().map_err(|e| self.stopped(format!("hidden states to the host: {e}")))?;
                step_to_wire(self.replica.clone(), plan, argmax_on_device, Some(&values))
            }
        };
        let mut client = self.client.clone();
        // The call may run as a task of its own (beside a send over the link): it owns what it reads.
        let (plan, argmax_on_device) = (plan.clone(), argmax_on_device.to_vec());
        let call = async move {
            let mut replies = client.stage_step(tokio_stream::iter(parts)).await?.into_inner();
            let mut gathered: Option<(pb::StageStepReply, Vec<u8>)> = None;
            while let Some(mut reply) = replies.message().await? {
                let chunk = std::mem::take(&mut reply.logits);
                let (first, bytes) = gathered.get_or_insert_with(|| (reply, Vec::new()));
                bytes.extend_from_slice(&chunk);
                // The next stage is ours, but its reply still may not grow without bound.
                let bound = logits_bound(&plan, &argmax_on_device, first.vocab_size as usize)
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
        let answer = match (&self.link, over_link) {
            (Some(link), true) => {
                // The call goes first (the next stage posts its receive when the plan arrives),
                // then the hidden states; a call that fails stops the send through the watch.
                let watch = link.begin_step();
                let call = self.runtime.spawn(async move {
                    let answer = tokio::time::timeout(STEP_TIMEOUT, call).await;
                    if !matches!(answer, Ok(Ok(_))) {
                        watch.fail();
                    }
                    answer
                });
                if let Err(why) = link.send(&hidden) {
                    call.abort();
                    self.link = None;
                    return Err(self.stopped(format!("{why}; later steps go over gRPC")));
                }
                drop(hidden);
                match self.runtime.block_on(call) {
                    Ok(answer) => answer,
                    Err(e) => return Err(self.stopped(format!("the step's call ended: {e}"))),
                }
            }
            _ => {
                drop(hidden);
                self.runtime.block_on(async move { tokio::time::timeout(STEP_TIMEOUT, call).await })
            }
        };
        match answer {
            Err(_) => Err(self.stopped(format!("no answer within {STEP_TIMEOUT:?}"))),
            Ok(Err(status)) => Err(self.stopped(format!("{:?}: {}", status.code(), status.message()))),
            Ok(Ok((first, bytes))) => {
                self.handoff.record(started.elapsed().as_secs_f64(), first.step_seconds, over_link, &self.address);
                logits_from_wire(first, &bytes)
            }
        }
    }
}
