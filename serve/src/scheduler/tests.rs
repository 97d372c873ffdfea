//! Scheduler tests against a fake model that keeps real KV bookkeeping: every computed position
//! writes a digest of the sequence's tokens up to it into its cache slot, and every attended
//! position is read back through the block table and checked. A wrong block table, a shared block
//! overwritten, or a prefix-cache hit on the wrong content fails the step that reads it.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use super::*;
use crate::kv_cache::slot_of;

fn config(max_num_seqs: usize, max_num_batched_tokens: usize, n_blocks: usize, block_size: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens,
        max_model_len: n_blocks * block_size,
        max_waiting: 1000,
        kv_cache: KvCacheConfig { n_blocks, block_size, prefix_caching: true },
    }
}

fn request(id: u64, prompt: Vec<u32>, max_new_tokens: usize) -> Request {
    Request { id: RequestId(id), prompt, max_new_tokens, prompt_logprobs: false }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 31 + seed * 7) % 101).collect()
}

/// The KV "content" of position `p`: a digest of tokens `0..=p`, as real K/V depend on them all.
fn digest(tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    tokens.hash(&mut h);
    h.finish()
}

/// Runs plans the way a model runner would and checks every plan and every KV read against the
/// sequences' true tokens, which the harness tracks on its own.
struct Harness {
    sched: Scheduler,
    slots: HashMap<usize, u64>,
    truth: HashMap<RequestId, Vec<u32>>,
    finished: BTreeMap<RequestId, FinishReason>,
    /// Every plan, for assertions on the schedule.
    plans: Vec<StepPlan>,
    /// Prompt positions scored per request, in order.
    scored: HashMap<RequestId, Vec<usize>>,
}

impl Harness {
    fn new(config: SchedulerConfig) -> Harness {
        Harness {
            sched: Scheduler::new(config).unwrap(),
            slots: HashMap::new(),
            truth: HashMap::new(),
            finished: BTreeMap::new(),
            plans: Vec::new(),
            scored: HashMap::new(),
        }
    }

    fn add(&mut self, r: Request) {
        self.truth.insert(r.id, r.prompt.clone());
        self.sched.add_request(r).unwrap();
    }

    /// One step: plan, checks, fake forward pass, report. Returns false when nothing ran.
    fn step(&mut self) -> bool {
        let plan = self.sched.step().unwrap();
        self.sched.kv_cache().check_invariants();
        let c = self.sched.config();
        let bs = c.kv_cache.block_size;
        assert!(plan.n_tokens <= c.max_num_batched_tokens, "token budget exceeded: {plan:?}");
        assert_eq!(plan.n_tokens, plan.seqs.iter().map(|s| s.positions.len()).sum::<usize>());
        assert!(plan.seqs.len() <= c.max_num_seqs);
        for s in &plan.seqs {
            let truth = &self.truth[&s.id];
            assert!(!s.positions.is_empty());
            assert_eq!(s.token_ids, truth[s.positions.clone()], "token ids of {:?}", s.id);
            assert_eq!(s.sample, s.positions.end == truth.len(), "sample flag of {:?}", s.id);
            assert!(s.block_table.len() * bs >= s.positions.end);
            assert_eq!(plan.seqs.iter().filter(|o| o.id == s.id).count(), 1);
            self.scored.entry(s.id).or_default().extend(s.prompt_logprob_positions.clone());
        }
        // Forward pass: all writes of the batch, then all reads (attention over 0..end).
        for s in &plan.seqs {
            for p in s.positions.clone() {
                self.slots.insert(slot_of(&s.block_table, bs, p), digest(&self.truth[&s.id][..=p]));
            }
        }
        let mut sampled = Vec::new();
        for s in &plan.seqs {
            let truth = &self.truth[&s.id];
            for p in 0..s.positions.end {
                let got = self.slots.get(&slot_of(&s.block_table, bs, p));
                assert_eq!(got, Some(&digest(&truth[..=p])), "{:?} reads wrong KV at position {p}", s.id);
            }
            if s.sample {
                let token = (digest(truth) % 997) as u32;
                sampled.push(SampledToken { id: s.id, token, stop: None });
            }
        }
        let ran = !plan.is_empty();
        self.plans.push(plan);
        if !ran {
            return false;
        }
        for u in self.sched.on_step_done(&sampled).unwrap() {
            self.truth.get_mut(&u.id).unwrap().push(u.token);
            if let Some(f) = u.finish {
                self.finished.insert(u.id, f);
            }
        }
        self.sched.kv_cache().check_invariants();
        true
    }

    fn run_to_completion(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            if !self.sched.has_unfinished() {
                return;
            }
            assert!(self.step(), "stalled with unfinished requests: {:?}", self.sched.stats());
        }
        panic!("not finished after {max_steps} steps");
    }

    /// The step index at which each request first appears in a plan.
    fn first_scheduled(&self) -> BTreeMap<RequestId, usize> {
        let mut first = BTreeMap::new();
        for (i, p) in self.plans.iter().enumerate() {
            for s in &p.seqs {
                first.entry(s.id).or_insert(i);
            }
        }
        first
    }
}

/// Random prompt lengths and output lengths, under small limits: every step respects the budget
/// and the sequence limit (the harness checks), and every request ends by length with exactly its
/// `max_new_tokens`, all blocks back.
#[test]
fn every_request_completes_within_the_limits() {
    let mut h = Harness::new(config(4, 16, 64, 4));
    for i in 0..12u64 {
        h.add(request(i, prompt(i as u32, 1 + (i as usize * 13) % 40), 1 + (i as usize * 7) % 9));
    }
    h.run_to_completion(500);
    for i in 0..12u64 {
        assert_eq!(h.finished[&RequestId(i)], FinishReason::Length);
        let n_prompt = 1 + (i as usize * 13) % 40;
        assert_eq!(h.truth[&RequestId(i)].len() - n_prompt, 1 + (i as usize * 7) % 9, "request {i}");
    }
    assert_eq!(h.sched.stats().kv_cache.n_blocks_in_use, 0);
    assert!(h.plans.iter().any(|p| p.n_tokens == 16), "the budget was never filled");
}

#[test]
fn chunked_prefill_interleaves_with_running_decodes() {
    let mut h = Harness::new(config(8, 16, 64, 4));
    h.add(request(0, prompt(0, 5), 50));
    h.add(request(1, prompt(1, 6), 50));
    h.step(); // both prefills in one step (11 tokens)
    h.add(request(2, prompt(2, 100), 3));
    let before = h.plans.len();
    while !h.plans.last().unwrap().seqs.iter().any(|s| s.id == RequestId(2) && s.sample) {
        h.step();
    }
    let during = &h.plans[before..];
    // 100 prompt tokens at 14 per step (16 minus the two decodes): 8 steps, the last sampling.
    assert_eq!(during.len(), 8);
    for (i, p) in during.iter().enumerate() {
        let ids: Vec<u64> = p.seqs.iter().map(|s| s.id.0).collect();
        assert_eq!(ids, [0, 1, 2], "step {i}: decodes first, then the chunk");
        assert_eq!((p.seqs[0].positions.len(), p.seqs[1].positions.len()), (1, 1), "step {i}");
        let chunk = &p.seqs[2];
        assert_eq!(chunk.positions, i * 14..(i * 14 + 14).min(100), "step {i}");
        assert_eq!(chunk.sample, i == 7);
    }
}

/// The same requests through a cache that holds one sequence at max length and a roomy one:
/// the tiny cache preempts, and every request still ends with the same tokens (the fake model is
/// a function of the tokens, as greedy decoding is), recomputing from its true tokens.
#[test]
fn preemption_under_a_tiny_cache_completes_everything_with_the_same_tokens() {
    let run = |n_blocks: usize| {
        let mut c = config(6, 32, n_blocks, 4);
        c.max_model_len = 48;
        let mut h = Harness::new(c);
        for i in 0..8u64 {
            h.add(request(i, prompt(i as u32 % 3, 10 + i as usize * 3), 12 + i as usize));
        }
        h.run_to_completion(2000);
        assert_eq!(h.sched.stats().kv_cache.n_blocks_in_use, 0);
        (h.truth, h.sched.stats().n_preemptions, h.plans)
    };
    let (roomy, roomy_preemptions, _) = run(200);
    let (tiny, tiny_preemptions, plans) = run(12);
    assert_eq!(roomy_preemptions, 0);
    assert!(tiny_preemptions > 0, "the tiny cache never preempted");
    assert_eq!(tiny, roomy);
    // Some victim had generated tokens when preempted, so its recompute covered them too (the
    // harness checked each recomputed position's token ids against the truth).
    let sampled_before =
        |id: RequestId, step: usize| plans[..step].iter().flat_map(|p| &p.seqs).any(|s| s.id == id && s.sample);
    let recomputed_generated = plans.iter().enumerate().any(|(i, p)| p.preempted.iter().any(|v| sampled_before(*v, i)));
    assert!(recomputed_generated, "no preempted sequence had generated tokens");
}

#[test]
fn the_most_recently_arrived_running_sequence_is_preempted() {
    // 6 blocks of 2: three sequences of 4 prompt tokens take 2 blocks each; the first decode needs
    // a third block for sequence 0, so sequence 2 (the latest) goes back to waiting.
    let mut c = config(3, 16, 6, 2);
    c.kv_cache.prefix_caching = false;
    let mut h = Harness::new(c);
    for i in 0..3u64 {
        h.add(request(i, prompt(i as u32 + 5, 4), 4));
    }
    h.step();
    h.step();
    let plan = h.plans.last().unwrap();
    assert_eq!(plan.preempted, [RequestId(2)]);
    assert_eq!(plan.seqs.iter().map(|s| s.id.0).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(h.sched.stats().n_waiting, 1);
    h.run_to_completion(100);
    assert_eq!(h.finished.len(), 3);
}

#[test]
fn abort_frees_blocks_at_once_even_mid_step() {
    let mut h = Harness::new(config(4, 64, 32, 4));
    for i in 0..3u64 {
        h.add(request(i, prompt(i as u32, 9), 20));
    }
    h.step();
    let in_use = h.sched.stats().kv_cache.n_blocks_in_use;
    assert_eq!(in_use, 9);
    // Mid-step: the plan is out, the client of request 1 disconnects.
    let plan = h.sched.step().unwrap();
    assert!(h.sched.abort(RequestId(1)));
    assert_eq!(h.sched.stats().kv_cache.n_blocks_in_use, 6);
    let err = h.sched.add_request(request(1, prompt(1, 4), 5)).unwrap_err();
    assert!(matches!(err, Error::DuplicateRequest(RequestId(1))), "reused while its step is in flight: {err}");
    let sampled: Vec<SampledToken> =
        plan.seqs.iter().map(|s| SampledToken { id: s.id, token: 1, stop: None }).collect();
    let updates = h.sched.on_step_done(&sampled).unwrap();
    assert_eq!(updates.iter().map(|u| u.id.0).collect::<Vec<_>>(), [0, 2], "the aborted one is ignored");
    assert!(!h.sched.abort(RequestId(1)), "already gone");
    // Its id is free again once the step that held it is reported.
    h.sched.add_request(request(1, prompt(1, 4), 5)).unwrap();
    // A waiting request too.
    h.sched.add_request(request(7, prompt(7, 4), 5)).unwrap();
    assert!(h.sched.abort(RequestId(7)) && h.sched.abort(RequestId(1)));
    assert!(h.sched.abort(RequestId(0)) && h.sched.abort(RequestId(2)));
    let st = h.sched.stats();
    assert_eq!((st.n_running, st.n_waiting, st.kv_cache.n_blocks_in_use), (0, 0, 0));
    assert!(h.sched.step().unwrap().is_empty());
}

#[test]
fn a_prefix_cache_hit_skips_computing_the_cached_tokens() {
    let mut h = Harness::new(config(4, 64, 64, 8));
    let a = prompt(3, 40);
    h.add(request(0, a.clone(), 2));
    h.run_to_completion(10);
    let mut b = a[..35].to_vec();
    b.extend([500, 501, 502]);
    h.add(request(1, b, 2));
    h.step();
    let first = &h.plans.last().unwrap().seqs[0];
    assert_eq!(first.positions, 32..38, "four full blocks (32 tokens) come from the cache");
    h.run_to_completion(10); // the harness checked the cached KV's content through the table
    let kv = h.sched.stats().kv_cache;
    assert_eq!((kv.prefix_queries_tokens, kv.prefix_hits_tokens), (40 + 38, 32));
}

#[test]
fn prompt_logprobs_score_every_prompt_position_once_and_skip_the_cache() {
    let mut h = Harness::new(config(4, 16, 16, 4));
    let p = prompt(9, 30);
    h.add(request(0, p.clone(), 3));
    h.run_to_completion(20);
    h.add(Request { id: RequestId(1), prompt: p, max_new_tokens: 3, prompt_logprobs: true });
    h.run_to_completion(20);
    assert_eq!(h.scored[&RequestId(1)], (0..29).collect::<Vec<_>>());
    assert_eq!(h.first_scheduled().len(), 2);
    let first = h.plans.iter().flat_map(|p| &p.seqs).find(|s| s.id == RequestId(1)).unwrap();
    assert_eq!(first.positions.start, 0, "no prefix-cache hit for a request that scores its prompt");
    assert!(h.scored[&RequestId(0)].is_empty());
}

/// A large request at the head of the queue is admitted before later small ones, even while
/// small requests keep arriving: first come, first served, nobody starves.
#[test]
fn waiting_requests_are_admitted_first_come_first_served() {
    let mut h = Harness::new(config(8, 64, 16, 4));
    h.add(request(0, prompt(0, 40), 20)); // 10 blocks now, 15 of the 16 at its end
    h.step();
    h.add(request(1, prompt(1, 30), 10)); // 8 blocks: waits for request 0, where a 1-block one would fit
    for i in 2..12u64 {
        h.add(request(i, prompt(i as u32, 3), 2));
        h.step();
    }
    h.run_to_completion(500);
    let first = h.first_scheduled();
    let order: Vec<u64> = {
        let mut by_step: Vec<(usize, u64)> = first.iter().map(|(id, step)| (*step, id.0)).collect();
        by_step.sort();
        by_step.into_iter().map(|(_, id)| id).collect()
    };
    assert_eq!(order, (0..12).collect::<Vec<_>>(), "admission order");
    assert_eq!(h.finished.len(), 12);
}

#[test]
fn stop_reported_by_the_caller_finishes_and_frees() {
    let mut h = Harness::new(config(4, 64, 32, 4));
    h.add(request(0, prompt(0, 6), 100));
    let plan = h.sched.step().unwrap();
    assert!(plan.seqs[0].sample);
    let stop = Some(StopCause::StopString("\n\n".into()));
    let updates = h.sched.on_step_done(&[SampledToken { id: RequestId(0), token: 9, stop }]).unwrap();
    assert_eq!(updates[0].finish, Some(FinishReason::Stop(StopCause::StopString("\n\n".into()))));
    assert_eq!(updates[0].n_generated, 1);
    let st = h.sched.stats();
    assert_eq!((st.n_running, st.kv_cache.n_blocks_in_use), (0, 0));
    assert!(!h.sched.has_unfinished());
}

#[test]
fn sequences_stop_at_the_model_length() {
    let mut c = config(4, 64, 32, 4);
    c.max_model_len = 10;
    let mut h = Harness::new(c);
    h.add(request(0, prompt(0, 7), 100));
    h.run_to_completion(10);
    assert_eq!(h.finished[&RequestId(0)], FinishReason::Length);
    assert_eq!(h.truth[&RequestId(0)].len(), 10);
}

#[test]
fn bad_requests_and_a_full_queue_are_refused() {
    let mut c = config(4, 64, 32, 4);
    c.max_model_len = 20;
    c.max_waiting = 2;
    let mut s = Scheduler::new(c).unwrap();
    let check = |r: Result<()>, expected: &str| assert_eq!(r.unwrap_err().to_string(), expected);
    check(s.add_request(request(0, vec![], 5)), "the prompt is empty");
    check(
        s.add_request(request(0, prompt(0, 20), 5)),
        "the prompt has 20 tokens; this model's maximum length is 20 tokens, prompt plus generated",
    );
    check(s.add_request(request(0, prompt(0, 3), 0)), "max_tokens must be at least 1, got 0");
    s.add_request(request(0, prompt(0, 3), 5)).unwrap();
    check(s.add_request(request(0, prompt(0, 3), 5)), "request 0 already exists");
    s.add_request(request(1, prompt(0, 3), 5)).unwrap();
    let err = s.add_request(request(2, prompt(0, 3), 5)).unwrap_err();
    assert!(matches!(err, Error::QueueFull { max_waiting: 2 }), "{err}");
    // Admission makes room again.
    s.step().unwrap();
    s.add_request(request(2, prompt(0, 3), 5)).unwrap();
}

#[test]
fn step_results_must_match_the_plan() {
    let mut h = Harness::new(config(4, 64, 32, 4));
    h.add(request(0, prompt(0, 4), 5));
    h.add(request(1, prompt(1, 4), 5));
    assert!(matches!(h.sched.on_step_done(&[]), Err(Error::NoStepInFlight)));
    h.sched.step().unwrap();
    assert!(matches!(h.sched.step(), Err(Error::StepInFlight)));
    let t = |id: u64| SampledToken { id: RequestId(id), token: 1, stop: None };
    let err = h.sched.on_step_done(&[t(0)]).unwrap_err();
    assert_eq!(err.to_string(), "step results for request 1: no token for a sequence that samples");
    let err = h.sched.on_step_done(&[t(0), t(1), t(1)]).unwrap_err();
    assert_eq!(err.to_string(), "step results for request 1: two tokens for one sequence");
    // Still in flight after the errors; a token for an unknown (aborted) request is ignored.
    assert_eq!(h.sched.on_step_done(&[t(0), t(1), t(42)]).unwrap().len(), 2);
}

#[test]
fn inconsistent_configurations_are_refused() {
    let check = |c: SchedulerConfig, expected: &str| {
        assert_eq!(Scheduler::new(c).unwrap_err().to_string(), format!("engine configuration: {expected}"))
    };
    let mut c = config(8, 4, 16, 4);
    check(c, "max_num_batched_tokens must be at least max_num_seqs (8), got 4");
    c = config(4, 16, 16, 4);
    c.max_model_len = 65;
    check(c, "max_model_len must be in [2, 64] (the KV cache's capacity in tokens), got 65");
}
