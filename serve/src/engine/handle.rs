//! The engine loop of one replica and the handle the gateway holds ([`EngineHandle`]).
//!
//! [`EngineHandle::start`] opens the checkpoint, sizes the KV cache, loads the [`ModelRunner`] and
//! spawns one thread, `awq-engine`, that runs the loop of the crate header: `Scheduler::step` ->
//! `ModelRunner::execute` -> per sampled sequence `Sampler::sample`, stop token check,
//! `Detokenizer::push` -> `Scheduler::on_step_done` -> [`EngineEvent`]s. The scheduler and the
//! per-request state sit behind one mutex shared with the handles, so `submit` answers `QueueFull`
//! or `PromptTooLong` at once, and an abort (a dropped [`RequestStream`]) frees the request's blocks
//! at once, even while its step runs (the scheduler reuses blocks only in a later step; that step's
//! results for the request are dropped). The lock is not held while the runner computes.
//!
//! Faults never hang a request: a runner error (or panic) ends every request of that step with
//! [`EngineEvent::Error`] and the loop goes on with the rest; a sampler or detokenizer error ends
//! its own request only. The loop stops when the last handle is dropped; requests still running
//! then get an error event.

use std::collections::HashMap;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use awq_kernels::Device;
use awq_model::safetensors::SafetensorsFile;
use awq_model::{Checkpoint, TokenizerConfig};

use super::{EngineEvent, EngineStats, GenerateRequest, GeneratedToken, ModelInfo, PromptToken, RequestStream, Usage};
use crate::detokenizer::Detokenizer;
use crate::kv_cache::KvCacheConfig;
use crate::pipeline::NextStages;
use crate::runner::{ModelRunner, StageOutput, StepLogits};
use crate::sampling::{score_token, Sampler};
use crate::scheduler::{Request, SampledToken, Scheduler, SchedulerConfig, StepPlan};
use crate::{Error, FinishReason, RequestId, Result, StopCause};

/// The KV cache a CPU engine takes when `kv_cache_bytes` is not given.
pub const DEFAULT_CPU_KV_CACHE_BYTES: u64 = 1 << 30;

/// How one replica's engine is set up (vLLM's engine arguments, by the same names).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// A Hugging Face checkpoint directory: AutoAWQ GEMM (dequantized on the CPU), fp16, bf16, fp32.
    pub model: PathBuf,
    /// The name clients use; default: `model` as given.
    pub served_model_name: Option<String>,
    /// One tensor-parallel rank per device; `[Cpu]` for the CPU.
    pub devices: Vec<Device>,
    /// Tensor-parallel ranks: on the CPU, ranks on threads (a divisor of the attention heads and the
    /// MLP that divides or is a multiple of the KV heads); on GPUs, `devices.len()`.
    pub tp: usize,
    /// Prompt plus generated tokens per sequence; default: config.json's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    /// Tokens computed per step; default: the larger of `max_num_seqs` and 2048 (CPU) or 8192 (GPU).
    pub max_num_batched_tokens: Option<usize>,
    /// Tokens per KV cache block.
    pub block_size: usize,
    /// The share of a GPU's memory the engine may take (weights, activations, KV cache); GPUs only.
    pub gpu_memory_utilization: f32,
    /// The KV cache's size; default on the CPU: [`DEFAULT_CPU_KV_CACHE_BYTES`].
    pub kv_cache_bytes: Option<u64>,
    /// Requests waiting to be scheduled before `submit` answers `QueueFull` (HTTP 429).
    pub max_waiting: usize,
    /// Run every step's kernels one by one instead of replaying decode steps recorded as CUDA
    /// graphs (vLLM's `--enforce-eager`); GPUs only.
    pub enforce_eager: bool,
    /// Tensors read from memory instead of from `model` (a worker's blocks of the job that wrote
    /// it); empty: all from `model`.
    pub kept: KeptTensors,
}

/// Safetensors files held in memory, by a name for messages: the blocks a worker kept from the
/// job that wrote the checkpoint it serves (`awq submit --deploy`), read in place of the
/// checkpoint's once `Checkpoint::with_kept` has matched them. Clones share the bytes.
#[derive(Clone, Default)]
pub struct KeptTensors(pub Vec<(String, Arc<Vec<u8>>)>);

impl std::fmt::Debug for KeptTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes: usize = self.0.iter().map(|(_, b)| b.len()).sum();
        write!(f, "KeptTensors({} files, {bytes} bytes)", self.0.len())
    }
}

impl EngineConfig {
    /// vLLM's defaults, on the CPU.
    pub fn new(model: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            model: model.into(),
            served_model_name: None,
            devices: vec![Device::Cpu],
            tp: 1,
            max_model_len: None,
            max_num_seqs: 256,
            max_num_batched_tokens: None,
            block_size: 16,
            gpu_memory_utilization: 0.9,
            kv_cache_bytes: None,
            max_waiting: 1024,
            enforce_eager: false,
            kept: KeptTensors::default(),
        }
    }

    /// Opens `model`, with the `kept` tensors read from memory. Kept blocks that do not match the
    /// checkpoint (the output was replaced after the job that kept them, or the bytes are not what the
    /// worker thinks) are dropped with a warning and every tensor is read from the checkpoint: the files
    /// on disk are what the deployment names, and a replica that can load from them should not fail
    /// for want of a shortcut.
    pub(crate) fn open_checkpoint(&self) -> Result<Checkpoint> {
        let checkpoint = Checkpoint::open(&self.model)?;
        if self.kept.0.is_empty() {
            return Ok(checkpoint);
        }
        let with_kept = self
            .kept
            .0
            .iter()
            .map(|(name, bytes)| SafetensorsFile::from_shared(name, bytes.clone()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .and_then(|files| checkpoint.with_kept(files));
        match with_kept {
            Ok((checkpoint, moved)) => {
                tracing::info!(
                    model = %self.model.display(),
                    "{moved} tensors of {} kept blocks read from memory, not from the checkpoint",
                    self.kept.0.len()
                );
                Ok(checkpoint)
            }
            Err(mismatch) => {
                tracing::warn!(
                    model = %self.model.display(),
                    error = %mismatch,
                    "the {} kept blocks do not match the checkpoint; reading every tensor from it instead",
                    self.kept.0.len()
                );
                Ok(Checkpoint::open(&self.model)?)
            }
        }
    }
}

/// The engine of one replica: cheap to clone, `Send + Sync`. The engine thread stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

/// A pipeline's first stage: its decoder blocks, and the stages after it.
struct PipelineStage {
    blocks: Range<usize>,
    next: Box<dyn NextStages>,
}

/// What executes a step plan on the engine thread: the runner's `execute_picking`, with per
/// scheduled sequence whether its token is the argmax, picked on the device.
type Executor = Box<dyn FnMut(&StepPlan, &[bool]) -> Result<StepLogits> + Send>;

/// State shared by the handles, the abort callbacks and the engine thread.
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    model: ModelInfo,
    vocab_size: usize,
    kv_capacity_tokens: usize,
}

/// Stops and joins the engine thread when the last handle goes.
struct Owner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

struct State {
    scheduler: Scheduler,
    requests: HashMap<RequestId, Live>,
    next_id: u64,
    shutdown: bool,
    /// Set when the loop stopped on a fault it could not contain; `submit` answers `EngineStopped`.
    stopped: Option<String>,
    prompt_tokens_total: u64,
    generation_tokens_total: u64,
}

/// A request the engine is working on.
struct Live {
    events: tokio::sync::mpsc::UnboundedSender<EngineEvent>,
    sampler: Sampler,
    detokenizer: Detokenizer,
    prompt: Vec<u32>,
    prompt_logprobs: Option<usize>,
    /// Prompt logprobs so far (`None` for position 0), sent once complete.
    scored: Vec<Option<PromptToken>>,
    /// Prompt tokens found in the prefix cache when first scheduled.
    cached_tokens: Option<usize>,
    n_generated: usize,
}

impl Live {
    fn send(&self, event: EngineEvent) {
        // A receiver that is gone aborts the request through its stream's drop; nothing to do here.
        let _ = self.events.send(event);
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.n_generated,
            cached_tokens: self.cached_tokens.unwrap_or(0),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn abort(&self, id: RequestId) {
        let mut st = self.lock();
        st.scheduler.abort(id);
        st.requests.remove(&id);
    }
}

impl EngineHandle {
    /// Loads the model, sizes the KV cache, logs its capacity and starts the engine thread.
    /// Blocking (seconds to minutes: the weights are read and converted). Errors: `Model` (the
    /// checkpoint), `InvalidConfig` naming the setting (devices, tp, a KV cache too small for one
    /// sequence of `max_model_len`, ...).
    pub fn start(config: EngineConfig) -> Result<EngineHandle> {
        EngineHandle::start_with(config, |mut runner| {
            Box::new(move |plan, argmax_on_device| runner.execute_picking(plan, argmax_on_device))
        })
    }

    /// [`EngineHandle::start`] as the first stage of a pipelined replica (`crate::pipeline`): the
    /// decoder blocks `blocks` here, the rest through `next`; the KV cache holds the blocks that
    /// every stage can hold. Errors: as `start`, and `next`'s when it cannot be asked its capacity.
    pub fn start_pipelined(
        config: EngineConfig,
        blocks: Range<usize>,
        next: Box<dyn NextStages>,
    ) -> Result<EngineHandle> {
        let stage = PipelineStage { blocks, next };
        EngineHandle::start_stage(config, Some(stage), |mut runner, next| match next {
            None => Box::new(move |plan, argmax_on_device| runner.execute_picking(plan, argmax_on_device)),
            Some(mut next) => {
                Box::new(move |plan, argmax_on_device| match runner.execute_stage(plan, argmax_on_device, None)? {
                    StageOutput::Hidden(hidden) => next.forward(plan, argmax_on_device, hidden),
                    StageOutput::Logits(logits) => Ok(logits),
                })
            }
        })
    }

    /// [`EngineHandle::start`] with the step executor built from the loaded runner by `executor`
    /// (tests wrap it to inject faults).
    pub(crate) fn start_with(
        config: EngineConfig,
        executor: impl FnOnce(ModelRunner) -> Executor,
    ) -> Result<EngineHandle> {
        EngineHandle::start_stage(config, None, |runner, _| executor(runner))
    }

    /// The engine of a whole replica (`stage` `None`) or of a pipeline's first stage.
    fn start_stage(
        config: EngineConfig,
        stage: Option<PipelineStage>,
        executor: impl FnOnce(ModelRunner, Option<Box<dyn NextStages>>) -> Executor,
    ) -> Result<EngineHandle> {
        let bad = |field, expected: &str, got: String| Error::InvalidConfig { field, expected: expected.into(), got };
        // The leader's device (every rank's is checked when the runner loads).
        let device = *config.devices.first().ok_or_else(|| bad("devices", "at least one device", "none".into()))?;
        if config.block_size == 0 {
            return Err(bad("block_size", "at least 1", "0".into()));
        }
        let checkpoint = config.open_checkpoint()?;
        let c = checkpoint.config();
        let max_model_len = match config.max_model_len.or(c.max_position_embeddings) {
            Some(n) => n,
            None => {
                return Err(bad("max_model_len", "set (config.json has no max_position_embeddings)", "none".into()))
            }
        };
        let max_num_batched_tokens = step_token_budget(&config, device);
        let model = model_info(&config, &checkpoint, max_model_len)?;
        let (mut runner, mut next) = match stage {
            None => (ModelRunner::load_weights(&checkpoint, &config.devices, config.tp, config.block_size)?, None),
            Some(PipelineStage { blocks, next }) => (
                ModelRunner::load_stage_weights(&checkpoint, &config.devices, config.tp, config.block_size, blocks)?,
                Some(next),
            ),
        };
        if max_model_len > runner.max_positions() {
            let expected = format!("at most {} (config.json's max_position_embeddings)", runner.max_positions());
            return Err(bad("max_model_len", &expected, max_model_len.to_string()));
        }
        let (kv_cache_bytes, block_bytes) = cache_budget(&config, &checkpoint, &runner)?;
        let mut n_blocks = (kv_cache_bytes / block_bytes) as usize;
        if let Some(next) = &mut next {
            n_blocks = n_blocks.min(next.n_cache_blocks()?);
        }
        let needed_blocks = max_model_len.div_ceil(config.block_size);
        if n_blocks < needed_blocks {
            let expected = format!(
                "at least {} bytes (one sequence of max_model_len {max_model_len} at {block_bytes} bytes per block of {} tokens)",
                needed_blocks as u64 * block_bytes,
                config.block_size
            );
            let field = if config.kv_cache_bytes.is_some() || device == Device::Cpu {
                "kv_cache_bytes"
            } else {
                "gpu_memory_utilization"
            };
            return Err(bad(field, &expected, kv_cache_bytes.to_string()));
        }
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens,
            max_model_len,
            max_waiting: config.max_waiting,
            kv_cache: KvCacheConfig { n_blocks, block_size: config.block_size, prefix_caching: true },
        })?;
        runner.allocate_cache(n_blocks)?;
        if !config.enforce_eager {
            runner.enable_decode_graphs(max_model_len, config.max_num_seqs)?;
        }
        let kv_capacity_tokens = n_blocks * config.block_size;
        tracing::info!(
            model = %model.name,
            kv_cache_bytes,
            kv_capacity_tokens,
            max_model_len,
            sequences_at_max_len = kv_capacity_tokens / max_model_len,
            %device,
            "KV cache: {kv_capacity_tokens} tokens, {} sequences of {max_model_len} tokens at once",
            kv_capacity_tokens / max_model_len
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                scheduler,
                requests: HashMap::new(),
                next_id: 0,
                shutdown: false,
                stopped: None,
                prompt_tokens_total: 0,
                generation_tokens_total: 0,
            }),
            wake: Condvar::new(),
            vocab_size: runner.vocab_size(),
            model,
            kv_capacity_tokens,
        });
        let loop_shared = shared.clone();
        let execute = executor(runner, next);
        let thread = std::thread::Builder::new()
            .name("awq-engine".into())
            .spawn(move || run_loop(&loop_shared, execute))
            .map_err(|e| Error::EngineStopped { reason: format!("cannot start the engine thread: {e}") })?;
        let owner = Arc::new(Owner { shared: shared.clone(), thread: Mutex::new(Some(thread)) });
        Ok(EngineHandle { shared, _owner: owner })
    }

    /// Queues a tokenized request; its events arrive on the returned stream (dropping it aborts the
    /// request). Errors, nothing queued: `EmptyPrompt`, `TokenOutOfVocabulary`, `PromptTooLong`,
    /// `InvalidParameter`, `QueueFull` (retry later), `EngineStopped`.
    pub fn submit(&self, request: GenerateRequest) -> Result<RequestStream> {
        let GenerateRequest { prompt, params, prompt_logprobs } = request;
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let vocab_size = self.shared.vocab_size;
        if let Some(index) = prompt.iter().position(|&t| t as usize >= vocab_size) {
            return Err(Error::TokenOutOfVocabulary { index, token: prompt[index], vocab_size });
        }
        let max_model_len = self.shared.model.max_model_len;
        let detokenizer = Detokenizer::new(self.shared.model.tokenizer.clone(), &prompt, true, params.stop().to_vec())?;
        let sampler = Sampler::new(params.clone(), &prompt);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut st = self.shared.lock();
        if let Some(reason) = &st.stopped {
            return Err(Error::EngineStopped { reason: reason.clone() });
        }
        let id = RequestId(st.next_id);
        st.scheduler.add_request(Request {
            id,
            prompt: prompt.clone(),
            max_new_tokens: params.max_new_tokens(prompt.len(), max_model_len),
            prompt_logprobs: prompt_logprobs.is_some(),
        })?;
        st.next_id += 1;
        st.requests.insert(
            id,
            Live {
                events: tx,
                sampler,
                detokenizer,
                prompt,
                prompt_logprobs,
                scored: vec![None],
                cached_tokens: None,
                n_generated: 0,
            },
        );
        drop(st);
        self.shared.wake.notify_all();
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        let abort = move || {
            if let Some(shared) = weak.upgrade() {
                shared.abort(id);
            }
        };
        Ok(RequestStream { id, events: rx, abort_on_drop: Some(Box::new(abort)) })
    }

    pub fn stats(&self) -> EngineStats {
        let st = self.shared.lock();
        let s = st.scheduler.stats();
        EngineStats {
            num_requests_running: s.n_running,
            num_requests_waiting: s.n_waiting,
            kv_cache_usage: s.kv_cache.usage,
            prompt_tokens_total: st.prompt_tokens_total,
            generation_tokens_total: st.generation_tokens_total,
            prefix_cache_queries_tokens: s.kv_cache.prefix_queries_tokens,
            prefix_cache_hits_tokens: s.kv_cache.prefix_hits_tokens,
            num_preemptions_total: s.n_preemptions,
            kv_capacity_tokens: self.shared.kv_capacity_tokens,
        }
    }

    pub fn model(&self) -> &ModelInfo {
        &self.shared.model
    }
}

/// The KV cache a GPU takes when none is given: what `gpu_memory_utilization` of its memory leaves
/// after what is in use now (the weights, loaded first) and `activation_bytes` for one step's
/// temporaries (vLLM's rule, with the activations estimated instead of profiled). Errors:
/// `InvalidConfig` naming `gpu_memory_utilization` when nothing is left; `Kernel` (the device).
/// Tokens per engine step: `max_num_batched_tokens`, or vLLM's defaults: 8192 on a GPU (its API
/// server's; long prefill chunks keep the tensor cores busy), 2048 on the CPU; never fewer than
/// max_num_seqs (every decode fits a step).
pub(crate) fn step_token_budget(config: &EngineConfig, device: Device) -> usize {
    let default_budget = if device == Device::Cpu { 2048 } else { 8192 };
    config.max_num_batched_tokens.unwrap_or(config.max_num_seqs.max(default_budget))
}

/// The KV cache's budget of `runner` and what one cache block takes of it, in bytes: over all ranks
/// when `kv_cache_bytes` is set or on the CPU; else on the GPU that holds the fewest blocks (its
/// free memory by `gpu_memory_utilization`, its ranks' share of a block).
pub(crate) fn cache_budget(config: &EngineConfig, checkpoint: &Checkpoint, runner: &ModelRunner) -> Result<(u64, u64)> {
    let leader = runner.device();
    if config.kv_cache_bytes.is_some() || leader == Device::Cpu {
        return Ok((kv_cache_budget(config, checkpoint, leader)?, runner.kv_bytes_per_cache_block()));
    }
    let mut fewest: Option<(u64, u64)> = None;
    let devices = runner.rank_devices_in_use();
    for (i, &device) in devices.iter().enumerate() {
        if devices[..i].contains(&device) {
            continue;
        }
        let budget = (kv_cache_budget(config, checkpoint, device)?, runner.kv_bytes_per_cache_block_on(device));
        if fewest.is_none_or(|(bytes, block)| budget.0 / budget.1 < bytes / block) {
            fewest = Some(budget);
        }
    }
    Ok(fewest.unwrap_or((0, runner.kv_bytes_per_cache_block())))
}

/// The bytes the KV cache may take on `device`: `kv_cache_bytes` when set; else 1 GiB on the CPU,
/// and on a GPU what `gpu_memory_utilization` leaves after what is allocated already (the weights,
/// loaded first) and the activations of a step. Errors: `Kernel` (the device cannot be asked).
pub(crate) fn kv_cache_budget(config: &EngineConfig, checkpoint: &Checkpoint, device: Device) -> Result<u64> {
    Ok(match (config.kv_cache_bytes, device) {
        (Some(bytes), _) => bytes,
        (None, Device::Cpu) => DEFAULT_CPU_KV_CACHE_BYTES,
        (None, Device::Cuda(_)) => {
            // Recorded decode steps keep their activations in the graph memory pool, apart from
            // the eager steps'.
            let graphs = if config.enforce_eager { 0 } else { activation_bytes(checkpoint, config.max_num_seqs) };
            let activations = activation_bytes(checkpoint, step_token_budget(config, device)) + graphs;
            gpu_kv_cache_bytes(device, config.gpu_memory_utilization, activations)?
        }
    })
}

fn gpu_kv_cache_bytes(device: Device, utilization: f32, activation_bytes: u64) -> Result<u64> {
    let kernel = |e| Error::Kernel { block_idx: None, cause: Box::new(e) };
    let total = device.total_memory().map_err(kernel)?.unwrap_or(0);
    let free = device.free_memory().map_err(kernel)?.unwrap_or(0);
    let budget = (total as f64 * utilization as f64) as u64;
    let in_use = total.saturating_sub(free);
    match budget.checked_sub(in_use + activation_bytes) {
        Some(bytes) if bytes > 0 => Ok(bytes),
        _ => Err(Error::InvalidConfig {
            field: "gpu_memory_utilization",
            expected: format!(
                "a share of {device}'s {total} bytes that leaves room for a KV cache ({in_use} bytes in use after \
                 loading the weights, {activation_bytes} bytes kept for a step's activations)"
            ),
            got: utilization.to_string(),
        }),
    }
}

/// What one step of `tokens` rows may hold at once on a GPU (f16): each row's activations through a
/// block (residual, norms, q/k/v, attention out, MLP gate/up/product, with a margin for the
/// kernels' temporaries), the logits of every row in f16 and f32, the attention scores of a whole
/// prompt (f32 and f16, `ops::WHOLE_PROMPT_ROWS`), and 512 MiB for cuBLAS' workspace, the kernels'
/// modules and the allocator's slack.
fn activation_bytes(checkpoint: &Checkpoint, tokens: usize) -> u64 {
    let c = checkpoint.config();
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    // A sparse block gathers each token's rows once per expert it takes, with their gate|up and
    // down outputs, and accumulates in f32.
    let experts =
        c.moe.as_ref().map_or(0, |m| m.experts_per_token * (2 * c.hidden_size + 3 * m.expert_intermediate_size));
    let per_row = 2 * (8 * c.hidden_size + 2 * q + 4 * kv + 4 * c.intermediate_size + experts) + 6 * c.vocab_size;
    let longest = (*awq_kernels::ops::WHOLE_PROMPT_ROWS.end()).min(tokens);
    let scores = 6 * c.n_heads * longest * longest;
    (tokens * per_row + scores) as u64 + (512 << 20)
}

/// What the gateway needs to know of the model (see [`ModelInfo`]).
fn model_info(config: &EngineConfig, checkpoint: &Checkpoint, max_model_len: usize) -> Result<ModelInfo> {
    let dir = checkpoint.dir();
    let tokenizer = awq_model::Tokenizer::from_dir(dir, checkpoint.config())?;
    let tcfg = TokenizerConfig::from_dir(dir)?;
    // config.json's ids, then generation_config.json's (Llama 3 Instruct's <|eot_id|> is only there),
    // else tokenizer_config.json's eos_token.
    let mut eos_token_ids = checkpoint.config().eos_token_ids.clone();
    for id in awq_model::GenerationConfig::from_dir(dir)?.eos_token_ids {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    if eos_token_ids.is_empty() {
        eos_token_ids.extend(tcfg.eos_token.as_deref().and_then(|t| tokenizer.inner().token_to_id(t)));
    }
    Ok(ModelInfo {
        name: config.served_model_name.clone().unwrap_or_else(|| config.model.to_string_lossy().into_owned()),
        max_model_len,
        add_bos_token: tokenizer.bos().is_some(),
        tokenizer: Arc::new(tokenizer.inner().clone()),
        bos_token: tcfg.bos_token,
        eos_token: tcfg.eos_token,
        eos_token_ids,
        chat_template: tcfg.chat_template,
    })
}

/// The engine thread (see the module docs).
fn run_loop(shared: &Shared, mut execute: Executor) {
    loop {
        let plan = {
            let mut st = shared.lock();
            while !st.shutdown && !st.scheduler.has_unfinished() {
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.shutdown {
                fail_all(&mut st, "the engine was shut down");
                return;
            }
            let plan = match st.scheduler.step() {
                Ok(plan) => plan,
                Err(e) => {
                    let reason = format!("scheduler: {e}");
                    tracing::error!("{reason}; stopping the engine");
                    fail_all(&mut st, &reason);
                    st.stopped = Some(reason);
                    return;
                }
            };
            note_scheduled(&mut st, &plan);
            // Plain greedy requests (no penalties, no logprobs) need only the argmax of their row.
            let argmax: Vec<bool> = plan
                .seqs
                .iter()
                .map(|s| st.requests.get(&s.id).is_some_and(|live| live.sampler.picks_argmax()))
                .collect();
            (plan, argmax)
        };
        let (plan, argmax_on_device) = plan;
        if plan.is_empty() {
            // Unfinished requests but nothing runnable cannot last (a sequence alone always fits);
            // yield rather than spin.
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        let started = std::time::Instant::now();
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| execute(&plan, &argmax_on_device))).unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(Error::EngineStopped { reason: format!("the model runner panicked: {what}") })
            });
        // One line per step at debug level (AWQ_LOG=awq_serve=debug): where a benchmark's time goes.
        tracing::debug!(
            seqs = plan.seqs.len(),
            tokens = plan.n_tokens,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "step"
        );
        let mut st = shared.lock();
        let outcome = match result {
            Ok(logits) => finish_step(&mut st, &plan, &logits, &shared.model.eos_token_ids),
            Err(e) => {
                tracing::error!("step of {} sequences failed: {e}", plan.seqs.len());
                fail_step(&mut st, &plan, &e.to_string())
            }
        };
        if let Err(e) = outcome {
            let reason = format!("engine loop: {e}");
            tracing::error!("{reason}; stopping the engine");
            fail_all(&mut st, &reason);
            st.stopped = Some(reason);
            return;
        }
    }
}

/// Counts prompts when first scheduled and records their prefix-cache hits.
fn note_scheduled(st: &mut State, plan: &StepPlan) {
    for s in &plan.seqs {
        let Some(live) = st.requests.get_mut(&s.id) else { continue };
        if live.cached_tokens.is_none() {
            live.cached_tokens = Some(s.positions.start);
            st.prompt_tokens_total += live.prompt.len() as u64;
        }
    }
}

/// Ends every request with an error event (the loop is stopping).
fn fail_all(st: &mut State, reason: &str) {
    for (id, live) in st.requests.drain() {
        live.send(EngineEvent::Error(reason.to_string()));
        st.scheduler.abort(id);
    }
}

/// Ends the requests of a failed step with an error event and reports the step done.
fn fail_step(st: &mut State, plan: &StepPlan, reason: &str) -> Result<()> {
    for s in &plan.seqs {
        fail_request(st, s.id, reason);
    }
    st.scheduler.on_step_done(&[])?;
    Ok(())
}

fn fail_request(st: &mut State, id: RequestId, reason: &str) {
    if let Some(live) = st.requests.remove(&id) {
        live.send(EngineEvent::Error(reason.to_string()));
    }
    st.scheduler.abort(id);
}

/// Samples, detokenizes and reports a computed step; sends the events.
fn finish_step(st: &mut State, plan: &StepPlan, logits: &StepLogits, eos_token_ids: &[u32]) -> Result<()> {
    let mut sampled = Vec::new();
    let mut pending: HashMap<RequestId, (GeneratedToken, String)> = HashMap::new();
    for (s, rows) in plan.seqs.iter().zip(&logits.seqs) {
        // Aborted while the step ran: its results are dropped.
        let Some(live) = st.requests.get_mut(&s.id) else { continue };
        if let Some(top_n) = live.prompt_logprobs {
            let scored = s.prompt_logprob_positions.clone().zip(rows.prompt_rows.clone()).map(|(p, r)| {
                let token = live.prompt[p + 1];
                score_token(logits.row(r), token, top_n)
                    .map(|(logprob, top_logprobs)| Some(PromptToken { token, logprob, top_logprobs }))
            });
            match scored.collect::<Result<Vec<_>>>() {
                Ok(scored) => {
                    let complete_before = live.scored.len() == live.prompt.len();
                    live.scored.extend(scored);
                    if !complete_before && live.scored.len() == live.prompt.len() {
                        live.send(EngineEvent::PromptLogprobs(live.scored.clone()));
                    }
                }
                Err(e) => {
                    fail_request(st, s.id, &e.to_string());
                    continue;
                }
            }
        }
        let sampled_now = match (rows.argmax, rows.sample_row) {
            (Some(token), _) => live.sampler.take_argmax(token, logits.vocab_size),
            (None, Some(row)) => live.sampler.sample(logits.row(row)),
            (None, None) => continue,
        };
        let sample = match sampled_now {
            Ok(sample) => sample,
            Err(e) => {
                fail_request(st, s.id, &e.to_string());
                continue;
            }
        };
        let mut stop = live.sampler.params().stop_for_token(sample.token, eos_token_ids);
        let mut text = String::new();
        if stop.is_none() {
            match live.detokenizer.push(sample.token) {
                Ok(piece) => {
                    text = piece.text;
                    stop = piece.stop.map(StopCause::StopString);
                }
                Err(e) => {
                    fail_request(st, s.id, &e.to_string());
                    continue;
                }
            }
        }
        sampled.push(SampledToken { id: s.id, token: sample.token, stop });
        let token = GeneratedToken { id: sample.token, logprob: sample.logprob, top_logprobs: sample.top_logprobs };
        pending.insert(s.id, (token, text));
    }
    for u in st.scheduler.on_step_done(&sampled)? {
        let Some((token, text)) = pending.remove(&u.id) else { continue };
        let Some(live) = st.requests.get_mut(&u.id) else { continue };
        live.n_generated = u.n_generated;
        st.generation_tokens_total += 1;
        live.send(EngineEvent::Tokens { tokens: vec![token], text });
        let Some(reason) = u.finish else { continue };
        let rest = match &reason {
            FinishReason::Stop(StopCause::StopString(_)) => Ok(String::new()),
            _ => live.detokenizer.finish().map(|p| p.text),
        };
        let live = st.requests.remove(&u.id).expect("looked up above");
        match rest {
            Ok(text) => live.send(EngineEvent::Finished { text, reason, usage: live.usage() }),
            Err(e) => live.send(EngineEvent::Error(e.to_string())),
        }
    }
    Ok(())
}
