//! The W4A16 kernels against the CPU reference, on a GPU: every weight shape of the benchmark
//! (Llama-3-8B and -70B projections), every batch size from decode to prefill, every CUDA path,
//! f16 and bf16, with random codes, zero points and realistic scales, random activations.
//!
//! The CPU reference ([`w4a16_linear`] on the host) dequantizes exactly to f32 and multiplies in
//! f32; its own correctness against an f64 formula written from AWQ's format is a unit test of
//! `ops/w4a16/`. For large batches the reference is computed for a fixed set of activation rows
//! (first, last, a few between), which is enough: every output row depends on its own input row only.
//!
//! Skipped unless `AWQ_GPU_TESTS=1` (see tests/cuda_ops.rs); `gpu-bin/run-gpu-tests` sets it.
#![cfg(feature = "cuda")]

mod common;

use common::gpu;

use awq_kernels::ops::{w4a16_linear, w4a16_linear_with, Int4Weight, PackedLinear, W4A16Path, DECODE_MAX_ROWS, STREAM_MAX_ROWS};
use awq_kernels::rng::SplitMix64;
use awq_kernels::{DType, Device, Tensor};

/// The bound for f16 outputs: the kernels accumulate exact integer products in f32 and round
/// once to the output dtype (2^-11 relative for f16, 2^-8 for bf16).
fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F16 {
        2e-3
    } else {
        1e-2
    }
}

/// `||got - want|| / ||want||` over the given rows of two `[M, N]` tensors (`want` holds just those rows).
fn rel_rows(got: &[f32], n: usize, rows: &[usize], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, &r) in rows.iter().enumerate() {
        for (a, b) in got[r * n..(r + 1) * n].iter().zip(&want[i * n..(i + 1) * n]) {
            if !a.is_finite() {
                return f64::INFINITY;
            }
            num += (*a as f64 - *b as f64).powi(2);
            den += (*b as f64).powi(2);
        }
    }
    assert!(den > 0.0, "reference must not be all zero");
    (num / den).sqrt()
}

/// Rows whose CPU reference is computed once per weight; for a batch of M rows those below M are
/// checked, which always includes rows 0 and M - 1 for the batch sizes below.
const CHECKED_ROWS: [usize; 14] = [0, 1, 2, 3, 7, 15, 31, 63, 100, 127, 255, 600, 1023, 4095];

fn check_weight(gpu: Device, rng: &mut SplitMix64, (n, k, g): (usize, usize, usize), dtype: DType, batches: &[usize]) {
    let packed = PackedLinear::random(rng, n, k, g, (2e-3, 8e-3));
    let host = Int4Weight::from_awq(&packed, dtype).unwrap();
    let w = host.to_device(gpu).unwrap();
    assert_eq!(w.device(), gpu);
    let max_m = batches.iter().copied().max().unwrap();
    let x = Tensor::from_f32_as(&[max_m, k], rng.normal_vec(max_m * k, 1.0), dtype).unwrap();
    let bias = Tensor::from_f32_as(&[n], rng.normal_vec(n, 0.5), dtype).unwrap();
    let rows: Vec<usize> = CHECKED_ROWS.iter().copied().filter(|&r| r < max_m).collect();
    let x_rows = {
        let values = x.to_f32_vec().unwrap();
        let picked: Vec<f32> = rows.iter().flat_map(|&r| values[r * k..(r + 1) * k].to_vec()).collect();
        Tensor::from_f32_as(&[rows.len(), k], picked, dtype).unwrap()
    };
    let want = w4a16_linear(&x_rows, &host, None).unwrap().to_f32_vec().unwrap();
    let want_bias = w4a16_linear(&x_rows, &host, Some(&bias)).unwrap().to_f32_vec().unwrap();
    let (x_dev, bias_dev) = (x.to_device(gpu).unwrap(), bias.to_device(gpu).unwrap());
    for &m in batches {
        let xm = x_dev.rows(0, m).unwrap();
        let checked: Vec<usize> = rows.iter().copied().filter(|&r| r < m).collect();
        // Auto, and every other path that is a sensible choice for M rows (the benchmark times them).
        let mut paths = vec![W4A16Path::Auto];
        if m <= DECODE_MAX_ROWS {
            paths.extend([W4A16Path::Decode, W4A16Path::Stream]);
        }
        paths.extend([W4A16Path::DequantizeGemm, W4A16Path::Fused]);
        if m > STREAM_MAX_ROWS && m <= 1024 {
            paths.push(W4A16Path::Stream);
        }
        for path in paths {
            for with_bias in [false, true] {
                if with_bias && m > 16 && path != W4A16Path::Auto {
                    continue; // the epilogue is the same code at every size
                }
                let b = with_bias.then_some(&bias_dev);
                let y = w4a16_linear_with(&xm, &w, b, path).unwrap();
                assert_eq!((y.shape(), y.dtype(), y.device()), (&[m, n][..], dtype, gpu));
                let reference = if with_bias { &want_bias } else { &want };
                let e = rel_rows(&y.to_f32_vec().unwrap(), n, &checked, reference);
                let what = format!("[{n}, {k}] g{g} {dtype} M={m} {path:?} bias={with_bias}");
                assert!(e <= tolerance(dtype), "{what}: rel err {e:.3e}");
                eprintln!("{what}: rel err {e:.2e}");
            }
        }
    }
}

#[test]
fn every_benchmark_shape_and_batch_size_matches_the_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(2026);
    let batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096];
    for (n, k) in [
        (4096, 4096),
        (6144, 4096),
        (28672, 4096),
        (4096, 14336),
        (8192, 8192),
        (10240, 8192),
        (57344, 8192),
        (8192, 28672),
    ] {
        check_weight(gpu, &mut rng, (n, k, 128), DType::F16, &batches);
    }
}

#[test]
fn odd_batches_group_sizes_and_bf16() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(7);
    let batches = [1, 3, 5, 9, 13, 17, 31, 37, 63, 65, 100, 127, 255];
    for (shape, dtype) in [
        ((16, 64, 64), DType::F16),
        ((48, 192, 32), DType::F16),
        ((272, 640, 64), DType::F16),
        ((4096, 4096, 128), DType::BF16),
        ((1040, 1088, 64), DType::BF16),
        ((512, 4096, 4096), DType::F16), // one group per row: AutoAWQ's group_size -1
    ] {
        check_weight(gpu, &mut rng, shape, dtype, &batches);
    }
}

/// The split-K kernels add their partial sums in a fixed order (K ranges, or the decode kernel's
/// blocks in order), never in the order blocks happen to finish: every call gives the same bits.
/// (The prefill kernel has no split; it is here so that it stays so.)
#[test]
fn every_kernel_gives_the_same_bits_every_call() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(11);
    // 28672 x 4096 at one block per SM: most row groups are shared by two blocks.
    let (n, k) = (28672, 4096);
    let packed = PackedLinear::random(&mut rng, n, k, 128, (2e-3, 8e-3));
    let w = Int4Weight::from_awq(&packed, DType::F16).unwrap().to_device(gpu).unwrap();
    for m in [1, 16] {
        let x = Tensor::from_f32_as(&[m, k], rng.normal_vec(m * k, 1.0), DType::F16).unwrap().to_device(gpu).unwrap();
        for path in [W4A16Path::Decode, W4A16Path::Stream, W4A16Path::Fused] {
            let bits = || w4a16_linear_with(&x, &w, None, path).unwrap().to_device(Device::Cpu).unwrap().to_le_bytes().unwrap();
            let first = bits();
            for _ in 0..5 {
                assert!(bits() == first, "M={m} {path:?}: a repeated call gave different bits");
            }
        }
    }
}

#[test]
fn device_dequantization_equals_the_host_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(9);
    for ((n, k, g), dtype) in [((48, 192, 32), DType::F16), ((4096, 4096, 128), DType::F16), ((1040, 1088, 64), DType::BF16)] {
        let packed = PackedLinear::random(&mut rng, n, k, g, (2e-3, 8e-3));
        let host = Int4Weight::from_awq(&packed, dtype).unwrap();
        let want = host.dequantize().unwrap();
        let got = host.to_device(gpu).unwrap().dequantize().unwrap();
        assert_eq!(got.device(), gpu);
        assert!(got.to_device(Device::Cpu).unwrap() == want, "[{n}, {k}] g{g} {dtype}");
        // And the weight comes back from the device unchanged.
        let back = host.to_device(gpu).unwrap().to_device(Device::Cpu).unwrap();
        assert_eq!(back.dequantize().unwrap(), want);
    }
}

/// Decode calls queued back to back (no host synchronisation between them) overlap on the GPU:
/// each call's blocks start, and stream their first weights, while the previous call's last blocks
/// finish (programmatic dependent launch). Here each call's input is the previous call's output,
/// so a call that read its activations too early, or touched the shared arrival counters and
/// partial sums before the previous call was done with them, would not match the reference.
#[test]
fn chained_decode_calls_each_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(13);
    let (n, k) = (8192, 8192); // square: each output is the next input
    let hosts: Vec<Int4Weight> = (0..2)
        .map(|_| Int4Weight::from_awq(&PackedLinear::random(&mut rng, n, k, 128, (2e-3, 8e-3)), DType::F16).unwrap())
        .collect();
    let weights: Vec<Int4Weight> = hosts.iter().map(|h| h.to_device(gpu).unwrap()).collect();
    for m in [1, 9] {
        let x0 = Tensor::from_f32_as(&[m, k], rng.normal_vec(m * k, 1.0), DType::F16).unwrap();
        // Queue every call first; read the results afterwards.
        let mut outputs: Vec<Tensor> = Vec::new();
        for i in 0..4 {
            let input = if i == 0 { x0.to_device(gpu).unwrap() } else { outputs[i - 1].clone() };
            outputs.push(w4a16_linear_with(&input, &weights[i % 2], None, W4A16Path::Decode).unwrap());
        }
        let rows: Vec<usize> = (0..m).collect();
        for i in 0..4 {
            let input = if i == 0 { x0.clone() } else { outputs[i - 1].to_device(Device::Cpu).unwrap() };
            let want = w4a16_linear(&input, &hosts[i % 2], None).unwrap().to_f32_vec().unwrap();
            let e = rel_rows(&outputs[i].to_f32_vec().unwrap(), n, &rows, &want);
            assert!(e <= tolerance(DType::F16), "M={m}, call {i}: rel err {e:.3e}");
        }
    }
}
