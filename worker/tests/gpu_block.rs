//! A whole-block AWQ run on a GPU against the same run on the CPU, on the same inputs.
//!
//! The engine is device-generic: `quantize_block` computes where its weights and activations are.
//! On the GPU the forward pass, the scale search's candidates and losses, and the final
//! quantization run as CUDA ops (cuBLAS GEMMs with f32 accumulation, CUDA attention...); the clip
//! search still runs on the host. Arithmetic differs in the last bits, so the test holds the GPU to
//! the CPU's decisions (the ratio of every scaling group), close losses, a close block output and
//! nearly all codes equal. Skipped unless `AWQ_GPU_TESTS=1` (gpu-bin/run-gpu-tests sets it).
//! Mixtures of experts too (Mixtral, Qwen3-MoE's sparse block): routing from the router's f32
//! logits on the GPU, each expert on its tokens (gather, its linears, weighted scatter-add).
#![cfg(feature = "cuda")]

use awq_kernels::ops::{GroupSize, QuantSpec};
use awq_kernels::rng::SplitMix64;
use awq_kernels::{DType, Device, Tensor};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_model::Checkpoint;
use awq_worker::awq::{quantize_block, AwqOptions, Method};
use awq_worker::BlockShape;

/// `cuda:0` when `AWQ_GPU_TESTS=1` (a failure if it is not usable), `None` otherwise.
fn gpu() -> Option<Device> {
    if std::env::var("AWQ_GPU_TESTS").map_or(true, |v| v.is_empty() || v == "0") {
        eprintln!("skipped: set AWQ_GPU_TESTS=1 on a machine with a GPU");
        return None;
    }
    let gpu = Device::Cuda(0);
    gpu.check_available().expect("AWQ_GPU_TESTS=1 but cuda:0 is not usable");
    Some(gpu)
}

#[test]
fn a_block_on_the_gpu_makes_the_cpu_s_choices() {
    let Some(gpu) = gpu() else { return };
    let mut spec = SyntheticSpec::tiny_llama();
    spec.hidden_size = 256;
    spec.intermediate_size = 512;
    check(gpu, spec, 0..2);
}

/// Mixtral's blocks (4 experts of 256, 2 per token) and Qwen3-MoE's sparse block (8 experts of 128)
/// on the GPU: the CPU's choices for every group, the experts' included.
#[test]
fn a_moe_block_on_the_gpu_makes_the_cpu_s_choices() {
    let Some(gpu) = gpu() else { return };
    let wide = |spec: SyntheticSpec| SyntheticSpec { hidden_size: 256, intermediate_size: 512, ..spec };
    check(gpu, SyntheticSpec { expert_intermediate_size: 256, ..wide(SyntheticSpec::tiny_mixtral()) }, 0..2);
    check(gpu, wide(SyntheticSpec::tiny_qwen3_moe()), 1..2);
}

/// Quantizes `blocks` of `spec` on the CPU and on `gpu` from the same input and compares them.
fn check(gpu: Device, spec: SyntheticSpec, blocks: std::ops::Range<usize>) {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &spec).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let shape = BlockShape::of(&ck);
    let (n_seq, seq_len, hidden) = (8, 64, spec.hidden_size);
    // Activations with a few salient channels, as real ones have: AWQ has something to find.
    let mut rng = SplitMix64::new(5);
    let mut x = rng.normal_vec(n_seq * seq_len * hidden, 1.0);
    for row in x.chunks_exact_mut(hidden) {
        for c in [5, 40, 77, 200] {
            row[c] *= 20.0;
        }
    }
    let x = Tensor::from_f32(&[n_seq * seq_len, hidden], x).unwrap();
    let options = AwqOptions::new(QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: true }, Method::Awq);
    for b in blocks {
        let weights = ck.load_block(b).unwrap().into_dtype(DType::F32);
        let (arch, config) = (ck.arch(), ck.config());
        let (cpu, next_cpu) = quantize_block(weights.clone(), &x, &shape, seq_len, arch, config, &options).unwrap();
        let (on_gpu, x_on_gpu) = (weights.to_device(gpu).unwrap(), x.to_device(gpu).unwrap());
        let (gpu_block, next_gpu) =
            quantize_block(on_gpu, &x_on_gpu, &shape, seq_len, arch, config, &options).unwrap();
        assert_eq!(next_gpu.device(), gpu, "the block output stays on the GPU");
        let e = awq_kernels::ops::relative_error(&next_gpu.to_device(Device::Cpu).unwrap(), &next_cpu).unwrap();
        assert!(e < 1e-4, "block {b} output: rel err {e}");
        for (c, g) in cpu.report.groups.iter().zip(&gpu_block.report.groups) {
            eprintln!(
                "block {b} {:?}: ratio cpu {} gpu {}, loss cpu {:.6e} gpu {:.6e}",
                c.linears, c.best_ratio, g.best_ratio, c.loss_best, g.loss_best
            );
            let what = format!("{} block {b} {:?}", spec.model_type, c.linears);
            assert_eq!(c.best_ratio, g.best_ratio, "{what}: the GPU chose another ratio");
            assert!(((c.loss_best - g.loss_best) / c.loss_best).abs() < 1e-3, "block {b} {:?}: losses differ", c.linears);
        }
        for (c, g) in cpu.report.clips.iter().zip(&gpu_block.report.clips) {
            assert!((c.mean_clip_fraction - g.mean_clip_fraction).abs() < 1e-3, "block {b} {}: clip", c.linear);
        }
        let (mut codes, mut differ) = (0usize, 0usize);
        for ((_, pc, _), (_, pg, _)) in cpu.linears.iter().zip(&gpu_block.linears) {
            for (wc, wg) in pc.qweight.iter().zip(&pg.qweight) {
                codes += 8;
                differ += (0..8).filter(|k| (wc >> (4 * k)) & 0xF != (wg >> (4 * k)) & 0xF).count();
            }
        }
        assert_eq!(cpu.report.unrouted_experts, gpu_block.report.unrouted_experts, "block {b}: the same routing");
        eprintln!("{} block {b}: {differ} of {codes} codes differ", spec.model_type);
        assert!((differ as f64) < 1e-3 * codes as f64, "block {b}: {differ} of {codes} codes differ");
    }
}
