//! The serving engine's model runner (`awq_serve::runner`, which `awq eval` also runs on) against the
//! forward pass quantization uses (`block_forward` over whole sequences): the same logits, whether the runner
//! computes a prompt whole, in prefill chunks, one token at a time (decode over the paged KV
//! cache), or batched with another sequence, on one rank or tensor-parallel, on tiny synthetic
//! models (llama: GQA; qwen2: q/k/v biases, one KV head; mistral: a sliding window shorter than the
//! prompt; qwen3: per-head q/k norms, heads wider than `hidden / heads`; phi3: q|k|v and gate|up
//! stored fused, a sliding window; gemma3: `1 + w` norms, output norms, sliding and full blocks
//! with a RoPE each, scaled embeddings and scores, soft-capped logits; mixtral: every block a
//! mixture of experts, renormalised; qwen3_moe: dense and sparse blocks, not renormalised).

use awq_kernels::rng::SplitMix64;
use awq_kernels::{ops, DType, Device, Tensor};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_model::Checkpoint;
use awq_serve::kv_cache::BlockId;
use awq_serve::runner::{norm_weight, ModelRunner};
use awq_serve::scheduler::{ScheduledSeq, StepPlan};
use awq_serve::RequestId;
use awq_worker::forward::{block_forward, embeddings, BlockShape};
use serde_json::{json, Value};

const BLOCK_SIZE: usize = 4;

/// Logits `[T, vocab]` of every position of `ids`, through `block_forward` (the reference): the
/// scaled embeddings, the blocks, the final norm in the architecture's form, the LM head and the
/// soft cap where config.json sets one.
fn reference_logits(ck: &Checkpoint, ids: &[u32]) -> Vec<f32> {
    let shape = BlockShape::of(ck);
    let mut x = embeddings(ck, ids, DType::F32, Device::Cpu).unwrap();
    for b in 0..ck.n_blocks() {
        let w = ck.load_block(b).unwrap().into_dtype(DType::F32);
        x = block_forward(&x, &w, &shape, ids.len(), false).unwrap().0;
    }
    let final_norm = ck.final_norm().unwrap();
    let x = ops::rms_norm(&x, &norm_weight(&final_norm, shape.norm_form).unwrap(), shape.rms_norm_eps).unwrap();
    let logits = ops::linear(&x, &ck.lm_head().unwrap().into_dtype(DType::F32), None).unwrap();
    match ck.config().final_logit_softcapping {
        Some(cap) => ops::softcap(&logits, cap as f32).unwrap().to_f32_vec().unwrap(),
        None => logits.to_f32_vec().unwrap(),
    }
}

/// A plan computing `positions` of sequence `id`, asking for the logits of every one of them.
fn seq(id: u64, ids: &[u32], positions: std::ops::Range<usize>, table: &[BlockId]) -> ScheduledSeq {
    ScheduledSeq {
        id: RequestId(id),
        token_ids: ids[positions.clone()].to_vec(),
        block_table: table.to_vec(),
        sample: false,
        prompt_logprob_positions: positions.clone(),
        positions,
    }
}

/// Runs `chunks` (each a list of sequences' position ranges) and collects each sequence's logits
/// rows in position order.
fn run(
    runner: &mut ModelRunner,
    prompts: &[(&[u32], Vec<BlockId>)],
    steps: &[Vec<(usize, std::ops::Range<usize>)>],
) -> Vec<Vec<f32>> {
    let mut out = vec![Vec::new(); prompts.len()];
    for step in steps {
        let seqs: Vec<ScheduledSeq> =
            step.iter().map(|(s, r)| seq(*s as u64, prompts[*s].0, r.clone(), &prompts[*s].1)).collect();
        let n_tokens = seqs.iter().map(|s| s.positions.len()).sum();
        let logits = runner.execute(&StepPlan { seqs, n_tokens, preempted: vec![] }).unwrap();
        for ((s, _), rows) in step.iter().zip(&logits.seqs) {
            assert_eq!(rows.sample_row, None);
            for r in rows.prompt_rows.clone() {
                out[*s].extend_from_slice(logits.row(r));
            }
        }
    }
    out
}

fn relative(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den).sqrt()
}

/// [`check_edited`] with a `sliding_window` set in config.json, which every block then has.
fn check(spec: SyntheticSpec, sliding_window: Option<usize>, tp: usize) {
    let edits: Vec<(&str, Value)> = sliding_window.iter().map(|&w| ("sliding_window", w.into())).collect();
    let windows = check_edited(spec, &edits, tp);
    if sliding_window.is_some() {
        assert!(windows.iter().all(|&w| w == sliding_window), "{windows:?}");
    }
}

/// The runner's logits against the reference's for `spec` with config.json's fields `edits`, whole,
/// chunked, decoded and batched, on `tp` ranks. Returns the blocks' sliding windows.
fn check_edited(spec: SyntheticSpec, edits: &[(&str, Value)], tp: usize) -> Vec<Option<usize>> {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &spec).unwrap();
    if !edits.is_empty() {
        let path = dir.path().join("config.json");
        let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (field, value) in edits {
            config[*field] = value.clone();
        }
        std::fs::write(&path, config.to_string()).unwrap();
    }
    let ck = Checkpoint::open(dir.path()).unwrap();
    let shape = BlockShape::of(&ck);
    let windows: Vec<Option<usize>> = (0..ck.n_blocks()).map(|b| shape.window(b)).collect();
    let mut rng = SplitMix64::new(spec.seed);
    let vocab = ck.config().vocab_size;
    let (t_a, t_b) = (23, 9);
    let a: Vec<u32> = (0..t_a).map(|_| rng.below(vocab) as u32).collect();
    let b: Vec<u32> = (0..t_b).map(|_| rng.below(vocab) as u32).collect();
    let (want_a, want_b) = (reference_logits(&ck, &a), reference_logits(&ck, &b));
    // Blocks in no particular order, A's and B's interleaved.
    let table_a: Vec<BlockId> = [9, 2, 14, 0, 7, 11].map(BlockId).to_vec();
    let table_b: Vec<BlockId> = [3, 12, 5].map(BlockId).to_vec();
    let prompts = [(&a[..], table_a), (&b[..], table_b)];
    let mut runner = ModelRunner::load(&ck, &[Device::Cpu], tp, BLOCK_SIZE, 16).unwrap();
    let name = format!("{} tp={tp}", spec.model_type);
    // 1e-4: f32 sums in another order (paged attention's per-row dot products against the GEMMs of
    // causal_attention) over a few blocks; bit-level differences, far below any sampling margin.
    let ok = |what: &str, got: &[f32], want: &[f32]| {
        let e = relative(got, want);
        assert!(e < 1e-4, "{name}, {what}: relative error {e}");
    };

    let whole = run(&mut runner, &prompts, &[vec![(0, 0..t_a)]]);
    ok("whole prompt", &whole[0], &want_a);

    // Chunked prefill: 5 tokens a step (chunks across block boundaries), B batched with A's chunks.
    let steps = vec![
        vec![(0, 0..5), (1, 0..3)],
        vec![(0, 5..10), (1, 3..9)],
        vec![(0, 10..15)],
        vec![(0, 15..20)],
        vec![(0, 20..t_a)],
    ];
    let chunked = run(&mut runner, &prompts, &steps);
    ok("chunked prefill", &chunked[0], &want_a);
    ok("batched with a chunk", &chunked[1], &want_b);

    // Decode: a prefix, then one token a step, B's decodes batched with A's.
    let mut steps = vec![vec![(0, 0..2), (1, 0..1)]];
    steps.extend((2..t_a).map(|p| if p < t_b { vec![(0, p..p + 1), (1, p - 1..p)] } else { vec![(0, p..p + 1)] }));
    steps.push(vec![(1, t_b - 1..t_b)]);
    let decoded = run(&mut runner, &prompts, &steps);
    ok("token by token", &decoded[0], &want_a);
    ok("decodes batched", &decoded[1], &want_b);
    windows
}

/// Gemma 3: sliding (window 8, shorter than the 23-token prompt), full, sliding blocks, with their
/// two RoPEs; and the same with its logits soft-capped at 2 (far inside the logits' range, so the
/// cap changes every row).
fn check_gemma3(tp: usize) {
    let windows = check_edited(SyntheticSpec::tiny_gemma3(), &[], tp);
    assert_eq!(windows, [Some(8), None, Some(8)]);
    check_edited(
        SyntheticSpec { seed: 5, ..SyntheticSpec::tiny_gemma3() },
        &[("final_logit_softcapping", json!(2.0))],
        tp,
    );
}

#[test]
fn runner_logits_equal_block_forward_whole_chunked_and_decoded() {
    check(SyntheticSpec::tiny_llama(), None, 1);
    check(SyntheticSpec::tiny_qwen2(), None, 1);
    check(SyntheticSpec { model_type: "mistral", seed: 4, ..SyntheticSpec::tiny_llama() }, Some(6), 1);
    check(SyntheticSpec::tiny_qwen3(), None, 1);
    check(SyntheticSpec::tiny_phi3(), Some(6), 1);
    check_gemma3(1);
    check(SyntheticSpec::tiny_mixtral(), Some(6), 1);
    check(SyntheticSpec::tiny_qwen3_moe(), None, 1);
}

/// Tensor parallelism: 2 ranks splitting llama's 2 KV heads, 4 ranks sharing them (each KV head on
/// two ranks), qwen2's one KV head and q/k/v biases on 2 ranks, mistral's window on 2, qwen3's q/k
/// norms (replicated) on 2, phi3's q, k, v and gate, up (stored fused, split by role) on 2, with
/// grouped-query attention, gemma3's output norms (after the all-reduce) on 2, mixtral's and
/// qwen3_moe's experts (each split like the dense MLP, the router replicated) on 2.
#[test]
fn tensor_parallel_runner_logits_equal_block_forward() {
    check(SyntheticSpec::tiny_llama(), None, 2);
    check(SyntheticSpec::tiny_llama(), None, 4);
    check(SyntheticSpec::tiny_qwen2(), None, 2);
    check(SyntheticSpec { model_type: "mistral", seed: 4, ..SyntheticSpec::tiny_llama() }, Some(6), 2);
    check(SyntheticSpec::tiny_qwen3(), None, 2);
    check(SyntheticSpec { n_kv_heads: 2, ..SyntheticSpec::tiny_phi3() }, None, 2);
    check_gemma3(2);
    check(SyntheticSpec::tiny_mixtral(), None, 2);
    check(SyntheticSpec { norm_topk_prob: Some(true), ..SyntheticSpec::tiny_qwen3_moe() }, None, 2);
}

/// The runner refuses a block table that does not cover its positions, naming the op, instead of
/// reading another sequence's KV.
#[test]
fn a_block_table_too_short_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let mut runner = ModelRunner::load(&ck, &[Device::Cpu], 1, BLOCK_SIZE, 4).unwrap();
    let ids = [1, 2, 3, 4, 5, 6];
    let plan = StepPlan { seqs: vec![seq(0, &ids, 0..6, &[BlockId(0)])], n_tokens: 6, preempted: vec![] };
    let err = runner.execute(&plan).unwrap_err().to_string();
    assert!(err.contains("block table of 1 blocks") && err.contains("positions 0..6"), "{err}");
}

/// Pipeline stages: a model cut into runners of block ranges (the first with the embeddings, the
/// last with the LM head), each with its own KV cache, fed the same plans and the previous stage's
/// hidden states, gives the whole runner's logits bit for bit (the same ops in the same order),
/// whole, chunked and decoded, on one rank and on two; a stage given the wrong input is refused.
#[test]
fn pipeline_stages_give_the_whole_models_logits_bit_for_bit() {
    use awq_serve::runner::StageOutput;
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.n_blocks(), 3);
    let mut rng = SplitMix64::new(7);
    let vocab = ck.config().vocab_size;
    let ids: Vec<u32> = (0..13).map(|_| rng.below(vocab) as u32).collect();
    let table: Vec<BlockId> = [5, 1, 9, 3].map(BlockId).to_vec();
    // A prefill chunk, a second chunk asking for the sample row, then decodes.
    let mut steps = vec![(0..6, false), (6..10, true)];
    steps.extend((10..13).map(|p| (p..p + 1, true)));
    let plans: Vec<StepPlan> = steps
        .iter()
        .map(|(positions, sample)| {
            let s = ScheduledSeq { sample: *sample, ..seq(0, &ids, positions.clone(), &table) };
            StepPlan { n_tokens: positions.len(), seqs: vec![s], preempted: vec![] }
        })
        .collect();
    for tp in [1, 2] {
        let mut whole = ModelRunner::load(&ck, &[Device::Cpu], tp, BLOCK_SIZE, 16).unwrap();
        let mut stages: Vec<ModelRunner> = [0..1, 1..2, 2..3]
            .into_iter()
            .map(|blocks| {
                let mut r = ModelRunner::load_stage_weights(&ck, &[Device::Cpu], tp, BLOCK_SIZE, blocks).unwrap();
                r.allocate_cache(16).unwrap();
                r
            })
            .collect();
        assert!(whole.is_whole_model() && !stages[0].is_whole_model());
        assert_eq!(stages.iter().map(|s| s.kv_bytes_per_cache_block()).sum::<u64>(), whole.kv_bytes_per_cache_block());
        for (i, plan) in plans.iter().enumerate() {
            let want = whole.execute(plan).unwrap();
            let mut hidden: Option<Tensor> = None;
            let mut got = None;
            for stage in &mut stages {
                match stage.execute_stage(plan, &[false], hidden.as_ref()).unwrap() {
                    StageOutput::Hidden(h) => hidden = Some(h),
                    StageOutput::Logits(l) => got = Some(l),
                }
            }
            let got = got.expect("the last stage gives logits");
            assert_eq!(got.seqs, want.seqs, "tp {tp}, step {i}");
            assert!(got.logits == want.logits, "tp {tp}, step {i}: logits differ");
        }
    }

    let mut middle = ModelRunner::load_stage_weights(&ck, &[Device::Cpu], 1, BLOCK_SIZE, 1..2).unwrap();
    middle.allocate_cache(16).unwrap();
    let err = middle.execute_stage(&plans[0], &[false], None).unwrap_err().to_string();
    assert!(err.contains("hidden") && err.contains("previous stage"), "{err}");
    let seven = Tensor::from_f32(&[7], vec![0.5; 7]).unwrap();
    let err = middle.execute_stage(&plans[0], &[false], Some(&seven)).unwrap_err().to_string();
    assert!(err.contains("hidden") && err.contains("[7]"), "{err}");
    let err = middle.execute(&plans[0]).unwrap_err().to_string();
    assert!(err.contains("whole model"), "{err}");
    let err = ModelRunner::load_stage_weights(&ck, &[Device::Cpu], 1, BLOCK_SIZE, 2..4).err().unwrap().to_string();
    assert!(err.contains("blocks") && err.contains("2..4"), "{err}");
}
