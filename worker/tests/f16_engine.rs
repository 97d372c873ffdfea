//! The engine in f16 (how AutoAWQ searches, and the GPU engine's planned compute dtype) against
//! the engine in f32, on the CPU: every op the block search uses must take f16 tensors, and the
//! choices must stay those of f32 up to f16 rounding. Runs everywhere (no GPU needed), so a dtype
//! contract the f16 path breaks shows up in CI, not on a lent GPU.

use awq_kernels::ops::{GroupSize, QuantSpec};
use awq_kernels::rng::SplitMix64;
use awq_kernels::{DType, Tensor};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_model::Checkpoint;
use awq_worker::awq::{quantize_block, AwqOptions, Method};
use awq_worker::BlockShape;

#[test]
fn an_f16_block_search_runs_and_agrees_with_f32() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let shape = BlockShape::of(&ck);
    let hidden = ck.config().hidden_size;
    let (n_seq, seq_len) = (4, 32);
    let mut rng = SplitMix64::new(8);
    let mut x = rng.normal_vec(n_seq * seq_len * hidden, 1.0);
    for row in x.chunks_exact_mut(hidden) {
        for c in [7, 50, 99] {
            row[c] *= 20.0;
        }
    }
    let x = Tensor::from_f32(&[n_seq * seq_len, hidden], x).unwrap();
    let options = AwqOptions::new(QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: true }, Method::Awq);
    let weights = ck.load_block(0).unwrap();
    let f32_weights = weights.clone().into_dtype(DType::F32);
    let (f32_block, f32_next) =
        quantize_block(f32_weights, &x, &shape, seq_len, ck.arch(), ck.config(), &options).unwrap();
    let (f16_block, f16_next) = quantize_block(
        weights.into_dtype(DType::F16),
        &x.clone().into_dtype(DType::F16),
        &shape,
        seq_len,
        ck.arch(),
        ck.config(),
        &options,
    )
    .unwrap();
    assert_eq!(f16_next.dtype(), DType::F16, "the block output keeps the compute dtype");
    let e = awq_kernels::ops::relative_error(&f16_next.into_dtype(DType::F32), &f32_next).unwrap();
    assert!(e < 5e-3, "block output: f16 vs f32 rel err {e}");
    for (a, b) in f32_block.report.groups.iter().zip(&f16_block.report.groups) {
        eprintln!("{:?}: ratio f32 {} f16 {}, loss f32 {:.4e} f16 {:.4e}", a.linears, a.best_ratio, b.best_ratio, a.loss_best, b.loss_best);
        // f16 rounding may move a choice between neighbouring ratios, not further.
        assert!((a.best_ratio - b.best_ratio).abs() <= 0.051, "{:?}: ratio {} vs {}", a.linears, a.best_ratio, b.best_ratio);
        assert!((a.loss_best - b.loss_best).abs() <= 0.1 * a.loss_best, "{:?}: loss {} vs {}", a.linears, a.loss_best, b.loss_best);
    }
}
