//! The engine end to end on a tiny synthetic model (CPU): events in order, greedy tokens that do not
//! depend on batching or chunking, aborts that return KV blocks, errors at submit, prompt logprobs
//! that do not depend on chunking, stop token ids. (The runner's logits against the worker's
//! `block_forward`: `worker/tests/serve_runner.rs`.)

use std::ops::Range;
use std::path::Path;

use awq_model::synthetic::{write_checkpoint, SyntheticSpec};

use super::*;
use crate::runner::StepLogits;
use crate::sampling::{RawSamplingParams, Sampler};
use crate::scheduler::StepPlan;
use crate::{Error, StopCause};

fn model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec { vocab_size: 300, ..SyntheticSpec::tiny_llama() }).unwrap();
    dir
}

fn config(dir: &Path) -> EngineConfig {
    EngineConfig { max_model_len: Some(256), kv_cache_bytes: Some(8 << 20), ..EngineConfig::new(dir) }
}

fn greedy(max_tokens: i64) -> SamplingParams {
    SamplingParams::new(RawSamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    })
    .unwrap()
}

fn request(prompt: Vec<u32>, params: SamplingParams) -> GenerateRequest {
    GenerateRequest { prompt, params, prompt_logprobs: None }
}

/// Everything a stream sends, until its end.
fn drain(mut stream: RequestStream) -> Vec<EngineEvent> {
    let mut events = Vec::new();
    while let Some(e) = stream.events.blocking_recv() {
        events.push(e);
    }
    events
}

/// The generated token ids of a finished stream, checking the event order on the way.
fn tokens(events: &[EngineEvent]) -> Vec<u32> {
    let (last, body) = events.split_last().expect("at least the final event");
    assert!(matches!(last, EngineEvent::Finished { .. }), "last event: {last:?}");
    body.iter()
        .flat_map(|e| match e {
            EngineEvent::Tokens { tokens, .. } => tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
            EngineEvent::PromptLogprobs(_) => vec![],
            other => panic!("unexpected event before the end: {other:?}"),
        })
        .collect()
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 37 + seed * 101 + 5) % 256).collect()
}

/// Waits until the engine holds no request (the loop reports finishes before the stream ends).
fn wait_idle(engine: &EngineHandle) -> EngineStats {
    for _ in 0..2000 {
        let s = engine.stats();
        if s.num_requests_running == 0 && s.num_requests_waiting == 0 {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("the engine did not become idle: {:?}", engine.stats());
}

#[test]
fn concurrent_requests_get_the_tokens_they_get_alone() {
    let dir = model();
    let engine = EngineHandle::start(config(dir.path())).unwrap();
    let prompts: Vec<Vec<u32>> = (0..12).map(|i| prompt(i, 3 + 5 * i as usize)).collect();
    let alone: Vec<Vec<u32>> =
        prompts.iter().map(|p| tokens(&drain(engine.submit(request(p.clone(), greedy(10))).unwrap()))).collect();
    assert!(alone.iter().all(|t| t.len() == 10));
    let streams: Vec<RequestStream> =
        prompts.iter().map(|p| engine.submit(request(p.clone(), greedy(10))).unwrap()).collect();
    let together: Vec<Vec<u32>> = streams.into_iter().map(|s| tokens(&drain(s))).collect();
    assert_eq!(together, alone);
    let stats = wait_idle(&engine);
    assert_eq!(stats.kv_cache_usage, 0.0);
    assert_eq!(stats.generation_tokens_total, 240);
    // The second round found the first round's full prompt blocks in the prefix cache.
    assert!(stats.prefix_cache_hits_tokens > 0, "{stats:?}");
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_with_the_same_tokens() {
    let dir = model();
    let long = prompt(7, 150);
    let whole = EngineHandle::start(config(dir.path())).unwrap();
    let want = drain(whole.submit(request(long.clone(), greedy(6))).unwrap());
    drop(whole);
    // 16 tokens a step: the prompt takes 10 steps, while a short request decodes beside it.
    let chunked =
        EngineHandle::start(EngineConfig { max_num_batched_tokens: Some(16), max_num_seqs: 4, ..config(dir.path()) })
            .unwrap();
    let long_stream = chunked.submit(request(long, greedy(6))).unwrap();
    let short_stream = chunked.submit(request(prompt(1, 4), greedy(20))).unwrap();
    let got = drain(long_stream);
    assert_eq!(tokens(&got), tokens(&want));
    assert_eq!(tokens(&drain(short_stream)).len(), 20);
    // Same text and usage too.
    assert_eq!(got.last(), want.last());
}

#[test]
fn dropping_a_stream_aborts_its_request_and_frees_its_blocks() {
    let dir = model();
    let engine = EngineHandle::start(config(dir.path())).unwrap();
    let mut stream = engine.submit(request(prompt(3, 40), greedy(200))).unwrap();
    // Wait for the first tokens: the request is running and holds blocks.
    let first = stream.events.blocking_recv().unwrap();
    assert!(matches!(first, EngineEvent::Tokens { .. }), "{first:?}");
    assert!(engine.stats().kv_cache_usage > 0.0);
    drop(stream);
    let stats = wait_idle(&engine);
    assert_eq!(stats.kv_cache_usage, 0.0, "{stats:?}");
    // The engine goes on serving.
    assert_eq!(tokens(&drain(engine.submit(request(prompt(4, 5), greedy(3))).unwrap())).len(), 3);
}

#[test]
fn submit_refuses_what_cannot_run() {
    let dir = model();
    let engine = EngineHandle::start(EngineConfig { max_waiting: 1, ..config(dir.path()) }).unwrap();
    let err = engine.submit(request(vec![], greedy(1))).err().unwrap();
    assert!(matches!(err, Error::EmptyPrompt), "{err}");
    let err = engine.submit(request(vec![1, 300, 2], greedy(1))).err().unwrap();
    assert!(matches!(err, Error::TokenOutOfVocabulary { index: 1, token: 300, vocab_size: 300 }), "{err}");
    let err = engine.submit(request(prompt(0, 256), greedy(1))).err().unwrap();
    assert!(matches!(err, Error::PromptTooLong { prompt_len: 256, max_model_len: 256 }), "{err}");
    // Submits take microseconds, a step milliseconds: a burst finds the queue of one full.
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for i in 0..20 {
        match engine.submit(request(prompt(i, 8), greedy(2))) {
            Ok(stream) => accepted.push(stream),
            Err(Error::QueueFull { max_waiting: 1 }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0 && !accepted.is_empty(), "{refused} refused");
    accepted.into_iter().for_each(|s| assert_eq!(tokens(&drain(s)).len(), 2));
    let err = EngineHandle::start(EngineConfig { kv_cache_bytes: Some(1000), ..config(dir.path()) }).err().unwrap();
    assert!(matches!(err, Error::InvalidConfig { field: "kv_cache_bytes", .. }), "{err}");
    let err = EngineHandle::start(EngineConfig { tp: 3, ..config(dir.path()) }).err().unwrap();
    assert!(matches!(err, Error::InvalidConfig { field: "tp", .. }), "{err}");
}

#[test]
fn prompt_logprobs_come_first_and_score_the_prompt() {
    let dir = model();
    let chunked = EngineConfig { max_num_batched_tokens: Some(16), max_num_seqs: 4, ..config(dir.path()) };
    let engine = EngineHandle::start(chunked).unwrap();
    let p = prompt(5, 40);
    let plain = drain(engine.submit(request(p.clone(), greedy(2))).unwrap());
    let mut req = request(p.clone(), greedy(2));
    req.prompt_logprobs = Some(3);
    let events = drain(engine.submit(req).unwrap());
    let EngineEvent::PromptLogprobs(lp) = &events[0] else { panic!("first event: {:?}", events[0]) };
    assert_eq!(lp.len(), p.len());
    assert_eq!(lp[0], None);
    for (i, l) in lp.iter().enumerate().skip(1) {
        let l = l.as_ref().expect("every position after the first is scored");
        assert_eq!(l.token, p[i]);
        assert!(l.logprob < 0.0 && l.logprob.is_finite());
        // The 3 most likely tokens there, most likely first; the prompt's token among them with
        // its own logprob, or below the third.
        let top = &l.top_logprobs;
        assert_eq!(top.len(), 3);
        assert!(top.windows(2).all(|w| w[0].logprob >= w[1].logprob), "{top:?}");
        match top.iter().find(|t| t.token == l.token) {
            Some(t) => assert_eq!(t.logprob, l.logprob),
            None => assert!(l.logprob <= top[2].logprob),
        }
    }
    // Scoring (computed in 16-token chunks, never from the prefix cache) changes nothing else.
    assert_eq!(tokens(&events), tokens(&plain));
    let EngineEvent::Finished { usage, .. } = events.last().unwrap() else { unreachable!() };
    assert_eq!(usage.cached_tokens, 0);
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (40, 2));
    // The same prompt scored in one step.
    let whole = EngineHandle::start(config(dir.path())).unwrap();
    let mut req = request(p.clone(), greedy(1));
    req.prompt_logprobs = Some(0);
    let EngineEvent::PromptLogprobs(lp_whole) = &drain(whole.submit(req).unwrap())[0] else { panic!() };
    for (a, b) in lp.iter().zip(lp_whole).skip(1) {
        let (a, b) = (a.as_ref().unwrap().logprob, b.as_ref().unwrap().logprob);
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn a_stop_token_ends_the_request_with_its_cause() {
    let dir = model();
    let engine = EngineHandle::start(config(dir.path())).unwrap();
    let p = prompt(2, 6);
    let free = tokens(&drain(engine.submit(request(p.clone(), greedy(5))).unwrap()));
    let params = SamplingParams::new(RawSamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(5),
        stop_token_ids: vec![free[2]],
        ignore_eos: true,
        ..Default::default()
    })
    .unwrap();
    let events = drain(engine.submit(request(p, params)).unwrap());
    let stop_at = free.iter().position(|&t| t == free[2]).unwrap();
    assert_eq!(tokens(&events), free[..=stop_at]);
    let EngineEvent::Finished { reason, usage, .. } = events.last().unwrap() else { unreachable!() };
    assert_eq!(*reason, FinishReason::Stop(StopCause::StopToken(free[2])));
    assert_eq!(usage.completion_tokens, stop_at + 1);
}

#[test]
fn tensor_parallel_ranks_give_the_tokens_of_one_rank() {
    let dir = model();
    let one = EngineHandle::start(config(dir.path())).unwrap();
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(i, 5 + 9 * i as usize)).collect();
    let want: Vec<Vec<u32>> =
        prompts.iter().map(|p| tokens(&drain(one.submit(request(p.clone(), greedy(8))).unwrap()))).collect();
    drop(one);
    for tp in [2, 4] {
        let engine = EngineHandle::start(EngineConfig { tp, ..config(dir.path()) }).unwrap();
        let streams: Vec<_> = prompts.iter().map(|p| engine.submit(request(p.clone(), greedy(8))).unwrap()).collect();
        let got: Vec<Vec<u32>> = streams.into_iter().map(|s| tokens(&drain(s))).collect();
        assert_eq!(got, want, "tp={tp}");
    }
}

/// A runner error, then a runner panic: the requests of those steps end with an error event, the
/// others are served, and nothing hangs.
#[test]
fn a_failing_step_ends_its_requests_with_an_error_and_the_engine_goes_on() {
    let dir = model();
    let mut calls = 0;
    let engine = EngineHandle::start_with(config(dir.path()), move |mut runner| {
        Box::new(move |plan, argmax| {
            calls += 1;
            match calls {
                1 => Err(Error::EngineStopped { reason: "injected device fault".into() }),
                2 => panic!("injected panic"),
                _ => runner.execute_picking(plan, argmax),
            }
        })
    })
    .unwrap();
    for expected in ["injected device fault", "the model runner panicked: injected panic"] {
        let events = drain(engine.submit(request(prompt(0, 6), greedy(4))).unwrap());
        assert_eq!(events.len(), 1, "{events:?}");
        let EngineEvent::Error(message) = &events[0] else { panic!("{events:?}") };
        assert!(message.contains(expected), "{message}");
        assert_eq!(wait_idle(&engine).kv_cache_usage, 0.0);
    }
    assert_eq!(tokens(&drain(engine.submit(request(prompt(0, 6), greedy(4))).unwrap())).len(), 4);
}

/// A cache of 6 blocks of 16 tokens for requests that need 3 each: running sequences are preempted
/// and recomputed (through the prefix cache where their blocks survived), with the tokens they get
/// alone.
#[test]
fn preempted_requests_recompute_to_the_same_tokens() {
    let dir = model();
    let alone = EngineHandle::start(config(dir.path())).unwrap();
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(10 + i, 18 + i as usize)).collect();
    let want: Vec<Vec<u32>> =
        prompts.iter().map(|p| tokens(&drain(alone.submit(request(p.clone(), greedy(24))).unwrap()))).collect();
    drop(alone);
    // 6 blocks of 16 tokens: (kv bytes per block) * 6.
    let dir_path = dir.path();
    let ck = awq_model::Checkpoint::open(dir_path).unwrap();
    let block_bytes = crate::runner::ModelRunner::kv_bytes_per_block(&ck, 16, 1, awq_kernels::Device::Cpu).unwrap();
    let small = EngineConfig { max_model_len: Some(64), kv_cache_bytes: Some(6 * block_bytes), ..config(dir_path) };
    let engine = EngineHandle::start(small).unwrap();
    let streams: Vec<_> = prompts.iter().map(|p| engine.submit(request(p.clone(), greedy(24))).unwrap()).collect();
    let got: Vec<Vec<u32>> = streams.into_iter().map(|s| tokens(&drain(s))).collect();
    assert_eq!(got, want);
    let stats = wait_idle(&engine);
    assert!(stats.num_preemptions_total > 0, "{stats:?}");
    assert_eq!((stats.kv_capacity_tokens, stats.kv_cache_usage), (96, 0.0));
}

/// A plain greedy request's token is picked by the runner's argmax (`execute_picking`); with
/// logprobs the same token comes from the host sampler over the whole row: both agree, and the
/// token is the one whose logprob is the highest.
#[test]
fn the_runners_argmax_picks_the_samplers_greedy_token() {
    let dir = model();
    let engine = EngineHandle::start(config(dir.path())).unwrap();
    let with_logprobs = SamplingParams::new(RawSamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(12),
        ignore_eos: true,
        logprobs: true,
        top_logprobs: Some(1),
        ..Default::default()
    })
    .unwrap();
    assert!(!Sampler::new(with_logprobs.clone(), &[]).picks_argmax());
    assert!(Sampler::new(greedy(12), &[]).picks_argmax());
    for seed in 0..4 {
        let plain = tokens(&drain(engine.submit(request(prompt(seed, 9), greedy(12))).unwrap()));
        let events = drain(engine.submit(request(prompt(seed, 9), with_logprobs.clone())).unwrap());
        assert_eq!(plain, tokens(&events), "prompt {seed}");
        for e in &events {
            if let EngineEvent::Tokens { tokens, .. } = e {
                assert_eq!(tokens[0].top_logprobs[0].token, tokens[0].id);
            }
        }
    }
}

/// The stage after this one, in this process (what the worker's gRPC client reaches across workers).
struct Local(crate::pipeline::LaterStage);

impl crate::pipeline::NextStages for Local {
    fn n_cache_blocks(&mut self) -> crate::Result<usize> {
        Ok(self.0.n_cache_blocks())
    }

    fn forward(
        &mut self,
        plan: &StepPlan,
        argmax_on_device: &[bool],
        hidden: awq_kernels::Tensor,
    ) -> crate::Result<StepLogits> {
        self.0.step(plan, argmax_on_device, &hidden)
    }
}

/// A replica pipelined over three stages gives each request the tokens the whole model gives, with
/// requests batched and prompts chunked; its KV capacity is the smallest stage's.
#[test]
fn a_pipelined_engine_gives_the_whole_engines_tokens() {
    let dir = model();
    let config = || EngineConfig { max_num_batched_tokens: Some(32), max_num_seqs: 8, ..config(dir.path()) };
    // Stage 2 holds 30 blocks of 16 tokens, stage 1 40 (its cache is cut to the later stage's 30).
    let stage = |blocks: Range<usize>, n_blocks: u64, next: Option<Box<dyn crate::pipeline::NextStages>>| {
        let block_bytes = 2 * 16 * 64 * 4; // K and V of 16 tokens of 2 KV heads of 32, f32
        let config = EngineConfig { kv_cache_bytes: Some(n_blocks * block_bytes), ..config() };
        crate::pipeline::LaterStage::load(&config, blocks, next).unwrap()
    };
    let last = stage(2..3, 30, None);
    let later = stage(1..2, 40, Some(Box::new(Local(last))));
    assert_eq!(later.n_cache_blocks(), 30);
    let pipelined = EngineHandle::start_pipelined(config(), 0..1, Box::new(Local(later))).unwrap();
    assert_eq!(pipelined.stats().kv_capacity_tokens, 30 * 16, "the smallest stage's blocks");
    let whole = EngineHandle::start(config()).unwrap();
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(i, 5 + 13 * i as usize)).collect();
    let run = |engine: &EngineHandle| -> Vec<Vec<u32>> {
        let streams: Vec<_> = prompts.iter().map(|p| engine.submit(request(p.clone(), greedy(12))).unwrap()).collect();
        streams.into_iter().map(|s| tokens(&drain(s))).collect()
    };
    let want = run(&whole);
    assert_eq!(run(&pipelined), want);
    assert!(want.iter().all(|t| t.len() == 12));
}

/// Kept blocks that match the checkpoint replace its tensors; kept blocks that do not (here: one
/// transposed, and bytes that are no safetensors file at all) are dropped and every tensor is read
/// from the checkpoint, so the replica still loads.
#[test]
fn kept_blocks_that_do_not_match_fall_back_to_the_checkpoint() {
    use awq_model::arch::LinearRole;
    use awq_model::safetensors::{self, RawTensor};
    use awq_model::Checkpoint;
    let dir = model();
    let disk = Checkpoint::open(dir.path()).unwrap();
    let (arch, c) = (disk.arch(), disk.config().clone());
    let name = arch.linear_name(1, LinearRole::Up);
    let [o, i] = arch.linear_shape(LinearRole::Up, &c);
    let values: Vec<f32> = (0..o * i).map(|k| (k % 5) as f32 - 2.0).collect();
    let block = |shape: &[usize]| {
        let t = awq_kernels::Tensor::from_f32_as(shape, values.clone(), awq_kernels::DType::F16).unwrap();
        let raw = RawTensor::from_tensor(&name, &t).unwrap();
        Arc::new(safetensors::serialize(Path::new("block-1"), &[raw], &Default::default()).unwrap())
    };
    let up = |ck: &Checkpoint| ck.load_block(1).unwrap().linear(LinearRole::Up).weight.to_f32_vec().unwrap();
    let from_disk = up(&disk);
    let open = |kept: Vec<(String, Arc<Vec<u8>>)>| {
        EngineConfig { kept: KeptTensors(kept), ..config(dir.path()) }.open_checkpoint().unwrap()
    };
    assert_eq!(up(&open(vec![("kept block 1".into(), block(&[o, i]))])), values, "a matching block comes from memory");
    assert_eq!(up(&open(vec![("kept block 1".into(), block(&[i, o]))])), from_disk, "a transposed one is dropped");
    let junk = Arc::new(b"not a safetensors file".to_vec());
    assert_eq!(up(&open(vec![("kept block 1".into(), junk)])), from_disk, "unreadable bytes are dropped");
}
