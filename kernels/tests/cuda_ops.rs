//! The CUDA ops against their CPU references, on a GPU.
//!
//! Each test draws random non-zero inputs from a fixed seed in awkward shapes (one row, widths that
//! are not multiples of a warp or a block, many rows), runs the op on the CPU and on `cuda:0`, and
//! compares `||cuda - cpu|| / ||cpu||` with a tolerance written next to the case, or the bits where
//! both sides do the same IEEE operations. Before each CUDA op the device's memory pool is filled with
//! NaN (`poison`), so an output element the kernel forgot to write shows up as NaN; after it, the
//! inputs are checked unchanged on the device (a stray write into a neighbouring buffer).
//!
//! These tests need a GPU, so `cargo test` skips them unless `AWQ_GPU_TESTS=1`; with it set (as
//! `gpu-bin/run-gpu-tests` does on the GPU machine) a missing GPU or driver is a failure. Without a
//! CUDA driver, `no_driver_is_a_clear_error_at_first_use` checks the error instead.
#![cfg(feature = "cuda")]

mod common;

use common::{down, gpu, randn, rel};

use awq_kernels::ops::{
    add, add_assign, apply_rope, clamp_groups, divide_rows, group_relative_abs_sums, max_abs_groups, cast, causal_attention, embedding, gated_activation, linear, linear_to, max_abs, mean_abs_columns,
    nll_sum, pseudo_quantize, quantize_packed, squared_distance, clip_thresholds, ClipGrid, quantize_groups, rms_norm, rms_norm_to, scale_columns, softcap, softmax_rows, embedding_scaled_at, AttentionShape, GatedActivation,
    GroupSize, QuantSpec, QuantizedGroups, RopeTable, gather_rows, scatter_add_rows,
};
use awq_kernels::rng::SplitMix64;
use awq_kernels::DType::{BF16, F16, F32};
use awq_kernels::{DType, Device, Error, Indices, Tensor};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];


/// Fills the device's memory pool with NaN: the stream-ordered allocator hands the freed block to
/// the next allocations, so an output element a kernel never writes reads back as NaN (best effort).
fn poison(device: Device, n_bytes: usize) {
    let nan = Tensor::from_f32(&[n_bytes.div_ceil(4) + 1024], vec![f32::NAN; n_bytes.div_ceil(4) + 1024]).unwrap();
    drop(nan.to_device(device).unwrap());
}

fn up(t: &Tensor, device: Device) -> Tensor {
    let d = t.to_device(device).unwrap();
    assert_eq!(d.device(), device);
    d
}


/// The device copies of the inputs still hold the host values (no kernel wrote into them).
fn inputs_untouched(host: &[&Tensor], dev: &[&Tensor], what: &str) {
    for (h, d) in host.iter().zip(dev) {
        assert_eq!(h.to_le_bytes().unwrap(), down(d).to_le_bytes().unwrap(), "{what}: an input changed on the device");
    }
}


/// A CUDA result (moved to the host) against the CPU's: same shape and dtype, and close.
fn check_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.device(), Device::Cpu);
    assert_eq!((got.shape(), got.dtype()), (want.shape(), want.dtype()), "{what}");
    let e = rel(got, want);
    assert!(e <= tol, "{what}: rel err {e:.3e} > {tol:.0e}");
}

/// A CUDA result against the CPU's, bit for bit.
fn check_bits(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!((got.shape(), got.dtype()), (want.shape(), want.dtype()), "{what}");
    if got.to_le_bytes().unwrap() != want.to_le_bytes().unwrap() {
        let (a, b) = (got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
        let bad: Vec<_> = a.iter().zip(&b).enumerate().filter(|(_, (x, y))| x.to_bits() != y.to_bits()).take(5).collect();
        let n_bad = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        panic!("{what}: {n_bad} of {} values differ, first (index, (cuda, cpu)): {bad:?}", a.len());
    }
}

/// 16 rows of `g` values spanning exactly [-1, 0.875] (scale 1.875 / 15 = 0.125, exact), the rest
/// k/16 - 1, which divide by the scale to k/2: every odd k is an exact .5 tie of the rounding.
fn tie_values(g: usize) -> Vec<f32> {
    let mut values = Vec::new();
    for row in 0..16 {
        for j in 0..g {
            let k = (row * 7 + j * 5) % 31;
            values.push(if j == 0 { -1.0 } else if j == 1 { 0.875 } else { -1.0 + k as f32 / 16.0 });
        }
    }
    values
}

/// The tolerance of an op whose CUDA and CPU versions compute the same f32 formula in a different
/// order (or with a different libm): the f32 difference is ~1e-6 relative; then each side rounds
/// its output once to the dtype, and an f32 difference that straddles a rounding boundary moves
/// that element by one ulp of the dtype (2^-11 relative for f16, 2^-8 for bf16). A few such flips
/// over thousands of elements stay well under these bounds; a wrong formula or index does not.
fn rounding_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
    }
}

#[test]
fn tensors_round_trip_and_report_their_device() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(1);
    for dtype in DTYPES {
        for shape in [&[0usize, 5][..], &[1], &[3, 7], &[257, 33]] {
            let t = randn(&mut rng, shape, 2.0, dtype);
            let d = up(&t, gpu);
            assert_eq!((d.shape(), d.dtype(), d.device()), (t.shape(), dtype, gpu));
            let back = down(&d);
            assert_eq!(back.device(), Device::Cpu);
            assert_eq!(back, t, "{dtype} {shape:?}");
            // Host accessors copy from the device.
            assert_eq!(d.to_le_bytes().unwrap(), t.to_le_bytes().unwrap());
            assert_eq!(d.to_f32_vec().unwrap(), t.to_f32_vec().unwrap());
            assert!(d.all_finite().unwrap());
            // Equality compares values; a device copy equals itself and the same values on the same device.
            assert_eq!(d, up(&t, gpu));
            assert_ne!(d, t, "tensors on different devices are not equal");
        }
        let t = randn(&mut rng, &[9, 4], 1.0, dtype);
        let d = up(&t, gpu);
        assert_eq!(down(&d.rows(2, 7).unwrap()), t.rows(2, 7).unwrap(), "rows on the device");
        assert_eq!(down(&d.rows(3, 3).unwrap()).shape(), &[0, 4]);
        assert_eq!(down(&d.clone().reshape(&[4, 9]).unwrap()), t.clone().reshape(&[4, 9]).unwrap());
        for to in DTYPES {
            check_bits(&format!("cast {dtype} -> {to}"), &down(&cast(&d, to).unwrap()), &cast(&t, to).unwrap());
            check_bits(&format!("into_dtype {dtype} -> {to}"), &down(&d.clone().into_dtype(to)), &t.clone().into_dtype(to));
        }
    }
}

#[test]
fn mixed_devices_are_clear_errors() {
    let Some(gpu) = gpu() else { return };
    let t = Tensor::from_f32(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let d = up(&t, gpu);
    let shape = AttentionShape { n_heads: 1, n_kv_heads: 1, head_dim: 3, seq_len: 2, sliding_window: None };
    let err = causal_attention(&d, &t, &d, shape, 1.0).unwrap_err();
    assert!(matches!(err, Error::DeviceMismatch { op: "attention", .. }), "{err}");
    let err = add(&d, &t).unwrap_err();
    assert!(matches!(err, Error::DeviceMismatch { op: "add", .. }), "{err}");
    let err = Device::Cuda(999).check_available().unwrap_err();
    assert!(matches!(err, Error::NoSuchCudaDevice { ordinal: 999, .. }), "{err}");
}

#[test]
fn no_driver_is_a_clear_error_at_first_use() {
    if awq_kernels::cuda::driver_available() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    let err = Tensor::zeros(&[2], DType::F32).to_device(Device::Cuda(0)).unwrap_err();
    assert!(matches!(err, Error::CudaLibraryNotFound { what: "CUDA driver", .. }), "{err}");
    assert!(err.to_string().starts_with("CUDA driver not found"), "{err}");
    assert!(Device::Cuda(0).check_available().is_err());
}

#[test]
fn rms_norm_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(2);
    let pairs = [(F32, F32), (F16, F16), (BF16, BF16), (F32, F16), (F16, F32)];
    for &(r, d) in &[(1, 1), (1, 33), (3, 576), (37, 100), (5, 4096), (2, 1030), (300, 2048)] {
        for (xt, wt) in pairs {
            let x = randn(&mut rng, &[r, d], 3.0, xt);
            let w = randn(&mut rng, &[d], 1.0, wt);
            let want = rms_norm(&x, &w, 1e-5).unwrap();
            let (xd, wd) = (up(&x, gpu), up(&w, gpu));
            poison(gpu, r * d * 4);
            let got = rms_norm(&xd, &wd, 1e-5).unwrap();
            assert_eq!(got.device(), gpu);
            check_close(&format!("rms_norm [{r}, {d}] {xt}/{wt}"), &down(&got), &want, rounding_tol(xt));
            inputs_untouched(&[&x, &w], &[&xd, &wd], "rms_norm");
            // Into another dtype (an f32 residual stream read by f16 linears): the same rounding
            // as the CPU's, once.
            for out in [F16, BF16] {
                let want = rms_norm_to(&x, &w, 1e-5, out).unwrap();
                let got = rms_norm_to(&xd, &wd, 1e-5, out).unwrap();
                assert_eq!(got.dtype(), out);
                check_close(&format!("rms_norm_to [{r}, {d}] {xt}/{wt} -> {out}"), &down(&got), &want, rounding_tol(out));
            }
        }
    }
}

#[test]
fn gated_activation_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(3);
    let pairs = [(F32, F32), (F16, F16), (BF16, BF16), (F32, BF16), (BF16, F32)];
    for act in [GatedActivation::Silu, GatedActivation::GeluTanh] {
        for shape in [&[1usize, 1][..], &[7, 333], &[64, 1408], &[3, 5, 11]] {
            for (gt, ut) in pairs {
                let g = randn(&mut rng, shape, 2.0, gt);
                let u = randn(&mut rng, shape, 1.0, ut);
                let want = gated_activation(act, &g, &u).unwrap();
                let (gd, ud) = (up(&g, gpu), up(&u, gpu));
                poison(gpu, g.elem_count() * 4);
                let got = gated_activation(act, &gd, &ud).unwrap();
                // expf / tanhf differ from Rust's libm by an ulp or two: f32 needs 1e-5 like the rest.
                check_close(&format!("{act:?} {shape:?} {gt}/{ut}"), &down(&got), &want, rounding_tol(gt));
                inputs_untouched(&[&g, &u], &[&gd, &ud], "gated_activation");
            }
        }
    }
}

/// `x * factor` on the CPU, in `x`'s dtype (inputs that reach softcap's saturated range).
fn ops_scaled(x: &Tensor, factor: f32) -> Tensor {
    let values = x.to_f32_vec().unwrap().iter().map(|v| v * factor).collect();
    Tensor::from_f32_as(x.shape(), values, x.dtype()).unwrap()
}

#[test]
fn elementwise_ops_match_cpu_bit_for_bit() {
    // One IEEE f32 add or multiply per element on both sides, then the same rounding: equal bits.
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(4);
    for shape in [&[1usize, 1][..], &[5, 3], &[129, 1000]] {
        for at in DTYPES {
            for bt in DTYPES {
                let a = randn(&mut rng, shape, 1.0, at);
                let b = randn(&mut rng, shape, 1.0, bt);
                let (ad, bd) = (up(&a, gpu), up(&b, gpu));
                poison(gpu, a.elem_count() * 4);
                check_bits(&format!("add {shape:?} {at}+{bt}"), &down(&add(&ad, &bd).unwrap()), &add(&a, &b).unwrap());
                inputs_untouched(&[&a, &b], &[&ad, &bd], "add");
            }
            // add_assign: every target dtype (f32 in the AWQ engine, f16 in the serving runner), on
            // the device as on the CPU.
            for target in DTYPES {
                let b = randn(&mut rng, shape, 1.0, at);
                let a = randn(&mut rng, shape, 1.0, target);
                let (mut want, mut ad, bd) = (a.clone(), up(&a, gpu), up(&b, gpu));
                let alias = ad.clone(); // shares the buffer: add_assign must copy it first
                add_assign(&mut want, &b).unwrap();
                add_assign(&mut ad, &bd).unwrap();
                check_bits(&format!("add_assign {shape:?} {target}+={at}"), &down(&ad), &want);
                assert_eq!(down(&alias), a, "a clone kept its values through add_assign");
            }
            // scale_columns
            let x = randn(&mut rng, shape, 1.0, at);
            let cols = *shape.last().unwrap();
            let s: Vec<f32> = (0..cols).map(|_| rng.uniform(0.1, 4.0)).collect();
            let xd = up(&x, gpu);
            poison(gpu, x.elem_count() * 4);
            let (got, want) = (down(&scale_columns(&xd, &s).unwrap()), scale_columns(&x, &s).unwrap());
            check_bits(&format!("scale_columns {shape:?} {at}"), &got, &want);
            inputs_untouched(&[&x], &[&xd], "scale_columns");
            // divide_rows
            let d: Vec<f32> = (0..shape[0]).map(|_| rng.uniform(0.1, 4.0)).collect();
            poison(gpu, x.elem_count() * 4);
            let (got, want) = (down(&divide_rows(&xd, &d).unwrap()), divide_rows(&x, &d).unwrap());
            check_bits(&format!("divide_rows {shape:?} {at}"), &got, &want);
            inputs_untouched(&[&x], &[&xd], "divide_rows");
            // softcap: CUDA's tanhf against Rust's tanh, within a few ulps of f32 (and one rounding to
            // a half-precision dtype after).
            let big = ops_scaled(&x, 40.0);
            let bigd = up(&big, gpu);
            poison(gpu, x.elem_count() * 4);
            let (got, want) = (down(&softcap(&bigd, 30.0).unwrap()), softcap(&big, 30.0).unwrap());
            check_close(&format!("softcap {shape:?} {at}"), &got, &want, rounding_tol(at).max(1e-6));
        }
    }
}

#[test]
fn mean_abs_columns_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(5);
    // 3000 rows: several chunks of 256 rows in the first pass.
    for &(r, c) in &[(1, 1), (3, 5), (700, 333), (3000, 257), (512, 4096)] {
        for dtype in DTYPES {
            let x = randn(&mut rng, &[r, c], 2.0, dtype);
            let want = mean_abs_columns(&x).unwrap();
            let xd = up(&x, gpu);
            poison(gpu, r * c * 8);
            let got = mean_abs_columns(&xd).unwrap();
            // f64 sums in another order, then one rounding to f32: equal but for rare one-ulp flips.
            let (g, w) = (Tensor::from_f32(&[c], got).unwrap(), Tensor::from_f32(&[c], want).unwrap());
            check_close(&format!("mean_abs_columns [{r}, {c}] {dtype}"), &g, &w, 1e-6);
            inputs_untouched(&[&x], &[&xd], "mean_abs_columns");
        }
    }
    assert_eq!(mean_abs_columns(&up(&Tensor::zeros(&[0, 3], DType::F32), gpu)).unwrap(), vec![0.0; 3]);
}

#[test]
fn pseudo_quantize_matches_cpu_bit_for_bit() {
    // The same f32 formulas on both sides (IEEE division, round half to even, the same min/max), so
    // the codes, and the dequantized values built from them, are equal bit for bit; exact .5 ties
    // included, because both sides divide the same two floats with IEEE rounding before rounding the
    // quotient half to even (the tie case below forces many of them).
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(6);
    let mut cases = Vec::new();
    for &(rows, cols, g) in &[(1, 32, 32), (7, 256, 32), (7, 256, 64), (7, 256, 128), (3, 40, 8), (64, 4096, 128), (11, 384, 128)] {
        for zero_point in [true, false] {
            for bits in [4, 3, 8] {
                cases.push((rows, cols, QuantSpec { bits, group_size: GroupSize::new(g as u64).unwrap(), zero_point }));
            }
        }
    }
    for (rows, cols, spec) in cases {
        for dtype in DTYPES {
            let w = randn(&mut rng, &[rows, cols], 0.5, dtype);
            let want = pseudo_quantize(&w, spec).unwrap();
            let wd = up(&w, gpu);
            poison(gpu, w.elem_count() * 4);
            let got = pseudo_quantize(&wd, spec).unwrap();
            check_bits(&format!("pseudo_quantize [{rows}, {cols}] {spec:?} {dtype}"), &down(&got), &want);
            inputs_untouched(&[&w], &[&wd], "pseudo_quantize");
        }
    }
    // Ties: groups spanning exactly [-1, 0.875] have scale 1.875 / 15 = 0.125 (exact), and values
    // k/16 then divide to k/2: every odd k is an exact .5 tie.
    let g = 32;
    let values = tie_values(g);
    let w = Tensor::from_f32(&[16, g], values).unwrap();
    let spec = QuantSpec { bits: 4, group_size: GroupSize::new(g as u64).unwrap(), zero_point: true };
    check_bits("pseudo_quantize ties", &down(&pseudo_quantize(&up(&w, gpu), spec).unwrap()), &pseudo_quantize(&w, spec).unwrap());
}

#[test]
fn linear_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(7);
    let pairs = [(F32, F32), (F16, F16), (BF16, BF16), (F32, F16), (BF16, F32)];
    let shapes = [(1, 1, 1), (3, 5, 7), (17, 33, 65), (128, 96, 200), (1, 300, 129), (33, 1000, 513), (256, 2048, 1024)];
    for &(m, n, k) in &shapes {
        for (xt, wt) in pairs {
            let x = randn(&mut rng, &[m, k], 1.0, xt);
            let w = randn(&mut rng, &[n, k], 0.2, wt);
            let b = randn(&mut rng, &[n], 0.5, wt);
            let (xd, wd, bd) = (up(&x, gpu), up(&w, gpu), up(&b, gpu));
            for with_bias in [false, true] {
                let want = linear(&x, &w, with_bias.then_some(&b)).unwrap();
                poison(gpu, m * n * 4);
                let got = linear(&xd, &wd, with_bias.then_some(&bd)).unwrap();
                assert_eq!((got.device(), got.dtype()), (gpu, xt));
                // f32: SGEMM (no TF32) sums in another order than the CPU's gemm, ~1e-6 relative; a
                // TF32 product would miss 1e-5 by far. f16/bf16: f32 accumulation on both sides; the
                // output rounding dominates (see rounding_tol).
                check_close(&format!("linear {m}x{n}x{k} {xt}/{wt} bias={with_bias}"), &down(&got), &want, rounding_tol(xt));
                // f32 out (the LM head's logits): nothing rounds to the operands' dtype, so the f32
                // tolerance holds for every pair.
                let want = linear_to(&x, &w, with_bias.then_some(&b), F32).unwrap();
                poison(gpu, m * n * 4);
                let got = linear_to(&xd, &wd, with_bias.then_some(&bd), F32).unwrap();
                assert_eq!((got.device(), got.dtype()), (gpu, F32));
                check_close(&format!("linear_to f32 {m}x{n}x{k} {xt}/{wt} bias={with_bias}"), &down(&got), &want, 1e-5);
            }
            inputs_untouched(&[&x, &w, &b], &[&xd, &wd, &bd], "linear");
        }
    }
}

#[test]
fn rope_matches_cpu_bit_for_bit() {
    // Both sides use the same f32 cos/sin table (computed on the host) and round each product and
    // the sum separately (the kernel forbids FMA contraction), then round once to the dtype.
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(8);
    // (heads, head_dim, rotary_dim, seq_len, batch): full and partial rotary, one token, 130-token
    // sequences (not a multiple of any block), a 256-wide head.
    let cases =
        [(3, 64, 64, 17, 2), (2, 32, 16, 5, 3), (1, 8, 8, 1, 1), (32, 128, 128, 130, 2), (4, 80, 64, 33, 1), (2, 256, 256, 7, 3)];
    for &(heads, hd, rot, seq, batch) in &cases {
        // A scaled table (llama3-like: other frequencies than theta^(-2i/d)) goes through the same path.
        let scaled = RopeTable::from_inv_freq(RopeTable::new(rot, 500000.0).inv_freq().iter().map(|f| f / 8.0).collect());
        for table in [RopeTable::new(rot, 10000.0), scaled] {
            for dtype in DTYPES {
                let x = randn(&mut rng, &[seq * batch, heads * hd], 1.0, dtype);
                let want = apply_rope(&x, heads, hd, seq, &table).unwrap();
                let xd = up(&x, gpu);
                poison(gpu, x.elem_count() * 4);
                let got = apply_rope(&xd, heads, hd, seq, &table).unwrap();
                assert_eq!(got.device(), gpu);
                check_bits(&format!("rope {heads}x{hd} rot {rot} seq {seq} x{batch} {dtype}"), &down(&got), &want);
                inputs_untouched(&[&x], &[&xd], "rope");
            }
        }
    }
    let xd = up(&Tensor::zeros(&[4, 16], DType::F32), gpu);
    assert!(matches!(apply_rope(&xd, 2, 8, 3, &RopeTable::new(8, 10000.0)), Err(Error::Shape { op: "rope", .. })));
}

#[test]
fn causal_attention_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(9);
    // (n_heads, n_kv_heads, head_dim, seq_len, batch, sliding_window, q std). 130 tokens: four full
    // query tiles of 32 and a tail of 2; GQA 4:1 at head_dim 64 and 128, with and without a window
    // (37: not a multiple of the 32-key tile; 1: each token sees only itself); head widths that are
    // not a multiple of 32 (80, 96, 200, 8, 4) or of 4 (6); 200 and 256 (56 and 69 KiB of shared
    // memory: the opt-in path above 48 KiB); one-token sequences; a window longer than the
    // sequence; q std 4 for peaked softmax rows.
    let cases = [
        (8, 2, 64, 130, 2, None, 1.0),
        (8, 2, 128, 130, 2, None, 1.0),
        (8, 2, 64, 130, 2, Some(37), 1.0),
        (8, 2, 128, 130, 2, Some(64), 4.0),
        (8, 2, 128, 130, 1, Some(1), 1.0),
        (4, 4, 256, 70, 1, None, 1.0),
        (4, 1, 256, 33, 2, Some(5), 4.0),
        (2, 1, 80, 45, 3, None, 1.0),
        (2, 2, 200, 40, 1, Some(300), 1.0),
        (3, 3, 8, 33, 1, None, 1.0),
        (6, 1, 4, 10, 3, Some(4), 1.0),
        (2, 1, 6, 7, 2, None, 1.0),
        (1, 1, 8, 1, 1, None, 1.0),
        (4, 2, 96, 1, 5, None, 1.0),
    ];
    for &(n_heads, n_kv_heads, head_dim, seq_len, batch, sliding_window, q_std) in &cases {
        let shape = AttentionShape { n_heads, n_kv_heads, head_dim, seq_len, sliding_window };
        let rows = batch * seq_len;
        let scale = 1.0 / (head_dim as f32).sqrt();
        for dtype in DTYPES {
            let q = randn(&mut rng, &[rows, n_heads * head_dim], q_std, dtype);
            let k = randn(&mut rng, &[rows, n_kv_heads * head_dim], 1.0, dtype);
            let v = randn(&mut rng, &[rows, n_kv_heads * head_dim], 1.0, dtype);
            let want = causal_attention(&q, &k, &v, shape, scale).unwrap();
            let (qd, kd, vd) = (up(&q, gpu), up(&k, gpu), up(&v, gpu));
            poison(gpu, q.elem_count() * 4);
            let got = causal_attention(&qd, &kd, &vd, shape, scale).unwrap();
            assert_eq!(got.device(), gpu);
            // f32 accumulation on both sides, in another order (tensor-core GEMMs), the softmax's
            // probabilities rounded to the dtype before the second product (as flash attention
            // does), then the output rounding of the dtype (see rounding_tol).
            check_close(&format!("attention {shape:?} x{batch} {dtype}"), &down(&got), &want, rounding_tol(dtype));
            inputs_untouched(&[&q, &k, &v], &[&qd, &kd, &vd], "attention");
        }
    }
    // Calibration-sized: 512 tokens, GQA 4:1, heads of 128.
    let shape = AttentionShape { n_heads: 16, n_kv_heads: 4, head_dim: 128, seq_len: 512, sliding_window: None };
    let q = randn(&mut rng, &[1024, 2048], 1.0, F16);
    let (k, v) = (randn(&mut rng, &[1024, 512], 1.0, F16), randn(&mut rng, &[1024, 512], 1.0, F16));
    let want = causal_attention(&q, &k, &v, shape, 0.088).unwrap();
    let got = causal_attention(&up(&q, gpu), &up(&k, gpu), &up(&v, gpu), shape, 0.088).unwrap();
    check_close("attention 2 x 512 tokens f16", &down(&got), &want, rounding_tol(F16));

    // Mixed dtypes run on f32 copies: the same f32 inputs as the CPU's, one rounding to q's dtype.
    let shape = AttentionShape { n_heads: 4, n_kv_heads: 2, head_dim: 64, seq_len: 50, sliding_window: Some(20) };
    let q = randn(&mut rng, &[100, 256], 1.0, F16);
    let (k, v) = (randn(&mut rng, &[100, 128], 1.0, BF16), randn(&mut rng, &[100, 128], 1.0, F32));
    let want = causal_attention(&q, &k, &v, shape, 0.125).unwrap();
    let got = causal_attention(&up(&q, gpu), &up(&k, gpu), &up(&v, gpu), shape, 0.125).unwrap();
    check_close("attention f16/bf16/f32", &down(&got), &want, rounding_tol(F16));

    // Any head width (cuBLAS has no limit the old flash kernel had).
    let shape = AttentionShape { n_heads: 2, n_kv_heads: 1, head_dim: 257, seq_len: 9, sliding_window: None };
    let (q, kv) = (randn(&mut rng, &[18, 514], 1.0, F32), randn(&mut rng, &[18, 257], 1.0, F32));
    let want = causal_attention(&q, &kv, &kv, shape, 0.0625).unwrap();
    let got = causal_attention(&up(&q, gpu), &up(&kv, gpu), &up(&kv, gpu), shape, 0.0625).unwrap();
    check_close("attention heads of 257", &down(&got), &want, rounding_tol(F32));

    // More than 1 GiB of scores (33 sequences of 512 tokens x 32 heads): two chunks of sequences.
    let shape = AttentionShape { n_heads: 32, n_kv_heads: 8, head_dim: 32, seq_len: 512, sliding_window: None };
    let rows = 33 * 512;
    let q = randn(&mut rng, &[rows, 1024], 1.0, F16);
    let (k, v) = (randn(&mut rng, &[rows, 256], 1.0, F16), randn(&mut rng, &[rows, 256], 1.0, F16));
    let want = causal_attention(&q, &k, &v, shape, 0.177).unwrap();
    let got = causal_attention(&up(&q, gpu), &up(&k, gpu), &up(&v, gpu), shape, 0.177).unwrap();
    check_close("attention in two chunks f16", &down(&got), &want, rounding_tol(F16));
}

#[test]
fn embedding_matches_cpu_bit_for_bit() {
    // A gather plus one conversion to the output dtype on both sides: equal bits.
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(10);
    for &(vocab, d, n_ids) in &[(1, 1, 1), (7, 33, 5), (1000, 576, 300), (50, 4096, 3), (7, 33, 0)] {
        let ids: Vec<u32> = (0..n_ids).map(|_| rng.below(vocab) as u32).collect();
        for table_dtype in DTYPES {
            let table = randn(&mut rng, &[vocab, d], 1.0, table_dtype);
            let td = up(&table, gpu);
            for out_dtype in DTYPES {
                let want = embedding(&table, &ids, out_dtype).unwrap();
                poison(gpu, n_ids * d * 4);
                let got = embedding(&td, &ids, out_dtype).unwrap();
                assert_eq!(got.device(), gpu);
                check_bits(&format!("embedding [{vocab}, {d}] x{n_ids} {table_dtype} -> {out_dtype}"), &down(&got), &want);
                // Gemma's sqrt(hidden) scale: one f32 multiply before the rounding, on both sides.
                let (host_ids, dev_ids) = (Indices::host(ids.clone()), Indices::new(ids.clone(), gpu).unwrap());
                let want = embedding_scaled_at(&table, &host_ids, 25.3, out_dtype).unwrap();
                let got = embedding_scaled_at(&td, &dev_ids, 25.3, out_dtype).unwrap();
                check_bits(&format!("embedding x25.3 [{vocab}, {d}] x{n_ids} {table_dtype} -> {out_dtype}"), &down(&got), &want);
            }
            inputs_untouched(&[&table], &[&td], "embedding");
            let err = embedding(&td, &[0, vocab as u32], F32).unwrap_err();
            assert!(matches!(err, Error::Index { op: "embedding", index, len } if index == vocab && len == vocab), "{err}");
        }
    }
}

/// A mixture of experts' grouping: each "expert" gathers its rows, and its (random) output rows are
/// added back weighted, expert after expert into one accumulator, as the MoE forward does. A gather
/// copies and a scatter-add rounds its product and its sum apart on both sides: equal bits, for an
/// f32 accumulator (the runner's) and for half-precision ones; the source's rows are untouched.
#[test]
fn gather_and_scatter_add_rows_match_cpu_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(44);
    // (tokens, width, experts, experts per token): one token, widths off the warp and block sizes,
    // more experts than tokens (some get none), a prefill's worth of rows.
    for &(tokens, d, n_experts, k) in &[(1, 7, 4, 2), (5, 33, 8, 2), (300, 576, 8, 2), (64, 129, 16, 4)] {
        // Each token's k distinct experts, and a weight for each.
        let mut routes: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n_experts];
        for t in 0..tokens {
            let mut chosen: Vec<usize> = Vec::new();
            while chosen.len() < k {
                let e = rng.below(n_experts);
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            for e in chosen {
                routes[e].0.push(t as u32);
                routes[e].1.push(rng.uniform(0.0, 1.0));
            }
        }
        for (x_dtype, out_dtype) in [(F32, F32), (F16, F32), (BF16, F32), (F16, F16), (BF16, BF16)] {
            let x = randn(&mut rng, &[tokens, d], 1.0, x_dtype);
            let xd = up(&x, gpu);
            let (mut want, mut got) = (Tensor::zeros(&[tokens, d], out_dtype), up(&Tensor::zeros(&[tokens, d], out_dtype), gpu));
            for (e, (rows, weights)) in routes.iter().enumerate() {
                let what = format!("[{tokens}, {d}] expert {e} of {n_experts} ({} rows) {x_dtype} -> {out_dtype}", rows.len());
                let (host_rows, dev_rows) = (Indices::host(rows.clone()), Indices::new(rows.clone(), gpu).unwrap());
                let cpu_rows = gather_rows(&x, &host_rows).unwrap();
                poison(gpu, rows.len() * d * 4);
                let gpu_rows = gather_rows(&xd, &dev_rows).unwrap();
                check_bits(&format!("gather_rows {what}"), &down(&gpu_rows), &cpu_rows);
                // An expert's output: the gathered rows times a constant, in the rows' dtype.
                let y = randn(&mut rng, &[rows.len(), d], 1.0, x_dtype);
                scatter_add_rows(&mut want, &y, &host_rows, weights).unwrap();
                scatter_add_rows(&mut got, &up(&y, gpu), &dev_rows, weights).unwrap();
                check_bits(&format!("scatter_add_rows {what}"), &down(&got), &want);
            }
            inputs_untouched(&[&x], &[&xd], "gather_rows");
        }
        let mut acc = up(&Tensor::zeros(&[tokens, d], F32), gpu);
        let twice = Indices::new(vec![0, 0], gpu).unwrap();
        let err = scatter_add_rows(&mut acc, &up(&Tensor::zeros(&[2, d], F32), gpu), &twice, &[1.0, 1.0]).unwrap_err();
        assert!(matches!(err, Error::Shape { op: "scatter_add_rows", .. }), "{err}");
    }
}

#[test]
fn softmax_rows_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(11);
    // Rows narrower than a warp, wider than a block of 1024 threads, and a vocabulary-sized row.
    for &(r, c) in &[(1, 1), (3, 5), (37, 1000), (2, 1025), (300, 130), (4, 49152)] {
        for dtype in DTYPES {
            let x = randn(&mut rng, &[r, c], 3.0, dtype);
            let want = softmax_rows(&x).unwrap();
            let xd = up(&x, gpu);
            poison(gpu, r * c * 4);
            let got = softmax_rows(&xd).unwrap();
            assert_eq!(got.device(), gpu);
            // Same steps (f32 max and exp, f64 sum); expf and Rust's exp differ by an ulp or two.
            check_close(&format!("softmax [{r}, {c}] {dtype}"), &down(&got), &want, rounding_tol(dtype));
            inputs_untouched(&[&x], &[&xd], "softmax");
        }
    }
}

#[test]
fn nll_sum_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(12);
    for &(t, v) in &[(1, 1), (1, 2), (7, 333), (300, 1000), (2, 1025), (64, 49152)] {
        let targets: Vec<u32> = (0..t).map(|_| rng.below(v) as u32).collect();
        for dtype in DTYPES {
            let logits = randn(&mut rng, &[t, v], 3.0, dtype);
            let want = nll_sum(&logits, &targets).unwrap();
            let ld = up(&logits, gpu);
            poison(gpu, t * 8);
            let got = nll_sum(&ld, &targets).unwrap();
            // f64 throughout from the same f32 inputs: only the order of the sums and the last bit
            // of exp/ln differ (~1e-13 relative); a wrong row, target or maximum is off by far more.
            let tol = 1e-9 * want.abs().max(1.0);
            assert!((got - want).abs() <= tol, "nll [{t}, {v}] {dtype}: cuda {got}, cpu {want}");
            inputs_untouched(&[&logits], &[&ld], "nll");
        }
    }
    let ld = up(&randn(&mut rng, &[2, 5], 1.0, F32), gpu);
    assert!(matches!(nll_sum(&ld, &[0, 5]), Err(Error::Index { op: "nll", index: 5, len: 5 })));
    assert!(matches!(nll_sum(&ld, &[0]), Err(Error::Shape { op: "nll", .. })));
    assert_eq!(nll_sum(&up(&Tensor::zeros(&[0, 5], F32), gpu), &[]).unwrap(), 0.0);
}

#[test]
fn group_ops_match_cpu_bit_for_bit() {
    // Maxima and clamps are exact; the relative sums add the same f32 terms in the same order (chunks
    // of 256 rows, then the chunks in order) on both sides.
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(12);
    for &(r, c, g) in &[(1, 32, 32), (3, 96, 32), (700, 256, 64), (300, 384, 128), (40, 96, 48)] {
        for dtype in DTYPES {
            let w = randn(&mut rng, &[r, c], 0.5, dtype);
            let wd = up(&w, gpu);
            poison(gpu, r * c * 8);
            let maxima = max_abs_groups(&wd, g).unwrap();
            assert_eq!(maxima, max_abs_groups(&w, g).unwrap(), "max_abs_groups [{r}, {c}] g{g} {dtype}");
            // Thresholds between half and all of each maximum: some values clamp, some don't.
            let thresholds: Vec<f32> = maxima.iter().map(|m| m * rng.uniform(0.5, 1.0)).collect();
            poison(gpu, r * c * 8);
            let got = down(&clamp_groups(&wd, &thresholds, g).unwrap());
            check_bits(&format!("clamp_groups [{r}, {c}] g{g} {dtype}"), &got, &clamp_groups(&w, &thresholds, g).unwrap());
            poison(gpu, r * c * 8);
            let sums = group_relative_abs_sums(&wd, g).unwrap();
            assert_eq!(sums, group_relative_abs_sums(&w, g).unwrap(), "group_relative_abs_sums [{r}, {c}] g{g} {dtype}");
            inputs_untouched(&[&w], &[&wd], "group ops");
        }
    }
    assert!(clamp_groups(&up(&Tensor::zeros(&[2, 64], F16), gpu), &[1.0; 3], 32).is_err());
}

#[test]
fn max_abs_matches_cpu_bit_for_bit() {
    // A maximum is exact whatever the order: equal bits.
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(13);
    // 1100 x 1000 values: more than the 1024 blocks of 256 threads cover in one stride.
    for shape in [&[1usize][..], &[3, 7], &[257, 1000], &[1100, 1000]] {
        for dtype in DTYPES {
            let n: usize = shape.iter().product();
            let mut values = randn(&mut rng, shape, 2.0, F32).to_f32_vec().unwrap();
            let spike = rng.below(n);
            values[spike] = if rng.below(2) == 0 { 50.0 } else { -60.0 };
            let x = Tensor::from_f32_as(shape, values, dtype).unwrap();
            let xd = up(&x, gpu);
            poison(gpu, 1024 * 4);
            let (got, want) = (max_abs(&xd).unwrap(), max_abs(&x).unwrap());
            assert_eq!(got.to_bits(), want.to_bits(), "max_abs {shape:?} {dtype}: cuda {got}, cpu {want}");
            inputs_untouched(&[&x], &[&xd], "max_abs");
        }
    }
    assert_eq!(max_abs(&up(&Tensor::zeros(&[0, 5], F32), gpu)).unwrap(), 0.0);
}

#[test]
fn squared_distance_matches_cpu() {
    // f64 sums in another order: equal to ~1e-15 relative.
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(14);
    for shape in [&[1usize][..], &[3, 7], &[257, 1000], &[1100, 1000]] {
        for dtype in DTYPES {
            let (a, b) = (randn(&mut rng, shape, 1.0, dtype), randn(&mut rng, shape, 1.0, dtype));
            let (ad, bd) = (up(&a, gpu), up(&b, gpu));
            let (got, want) = (squared_distance(&ad, &bd).unwrap(), squared_distance(&a, &b).unwrap());
            assert!(want > 0.0 && ((got - want) / want).abs() < 1e-12, "{shape:?} {dtype}: cuda {got}, cpu {want}");
            inputs_untouched(&[&a, &b], &[&ad, &bd], "squared_distance");
        }
    }
}

/// Codes, scales and zeros of the CUDA path against the CPU's, bit for bit (`==` on f32 would let
/// -0.0 pass for 0.0).
fn check_quantized(what: &str, got: &QuantizedGroups, want: &QuantizedGroups) {
    assert_eq!((got.out_features, got.in_features), (want.out_features, want.in_features), "{what}");
    if let Some(i) = got.codes.iter().zip(&want.codes).position(|(a, b)| a != b) {
        panic!("{what}: code {i} is {} on CUDA, {} on the CPU", got.codes[i], want.codes[i]);
    }
    for (name, g, w) in [("scale", &got.scales, &want.scales), ("zero", &got.zeros, &want.zeros)] {
        assert_eq!(g.len(), w.len(), "{what}: {name}s");
        if let Some(i) = g.iter().zip(w).position(|(a, b)| a.to_bits() != b.to_bits()) {
            panic!("{what}: {name} {i} is {} on CUDA, {} on the CPU", g[i], w[i]);
        }
    }
}

#[test]
fn quantize_groups_matches_cpu_bit_for_bit() {
    // The same f32 formulas as pseudo_quantize (see pseudo_quantize_matches_cpu_bit_for_bit), and
    // the same clamps and cast to i8 as Rust's f32::clamp and `as i8`: equal codes, scales, zeros.
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(14);
    for &(rows, cols, g) in &[(1, 32, 32), (7, 256, 32), (7, 256, 64), (7, 256, 128), (3, 40, 8), (64, 4096, 128), (11, 384, 128)] {
        for zero_point in [true, false] {
            // 8 bits only symmetric: with a zero point the codes (0..=255) do not fit i8 (refused below).
            for bits in [4, 3, 8] {
                if bits == 8 && zero_point {
                    continue;
                }
                let spec = QuantSpec { bits, group_size: GroupSize::new(g as u64).unwrap(), zero_point };
                for dtype in DTYPES {
                    let w = randn(&mut rng, &[rows, cols], 0.5, dtype);
                    let want = quantize_groups(&w, spec).unwrap();
                    let wd = up(&w, gpu);
                    poison(gpu, w.elem_count() * 4);
                    let got = quantize_groups(&wd, spec).unwrap();
                    check_quantized(&format!("quantize_groups [{rows}, {cols}] {spec:?} {dtype}"), &got, &want);
                    inputs_untouched(&[&w], &[&wd], "quantize_groups");
                }
            }
        }
    }
    // Ties (as in the pseudo_quantize test: scale 0.125, values k/16 divide to exact halves), and
    // groups of positive values only, whose zero is -round(min / scale) = -0.0 when min < scale / 2.
    let g = 32;
    let mut values = tie_values(g);
    for row in 0..4 {
        for j in 0..g {
            values.push(if j == 0 { 0.001 * row as f32 } else { 0.1 + (j as f32) / 64.0 });
        }
    }
    let w = Tensor::from_f32(&[20, g], values).unwrap();
    let spec = QuantSpec { bits: 4, group_size: GroupSize::new(g as u64).unwrap(), zero_point: true };
    check_quantized("quantize_groups ties", &quantize_groups(&up(&w, gpu), spec).unwrap(), &quantize_groups(&w, spec).unwrap());
    let bad = QuantSpec { bits: 4, group_size: GroupSize::new(48).unwrap(), zero_point: true };
    assert!(matches!(quantize_groups(&up(&w, gpu), bad), Err(Error::Shape { .. })));
}

#[test]
fn quantize_packed_matches_cpu_bit_for_bit() {
    // The codes, zeros and scales equal the CPU's (quantize_groups_matches_cpu_bit_for_bit); the
    // packing moves bits and rounds scales to f16 the same way on both sides.
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(31);
    for &(out_f, in_f, g) in &[(8, 32, 32), (24, 96, 32), (40, 384, 128), (136, 320, 64)] {
        for dtype in DTYPES {
            for zero_point in [true, false] {
                let spec = QuantSpec { bits: 4, group_size: GroupSize::new(g as u64).unwrap(), zero_point };
                let w = randn(&mut rng, &[out_f, in_f], 0.05, dtype);
                let wd = up(&w, gpu);
                poison(gpu, out_f * in_f * 8);
                let got = quantize_packed(&wd, spec).unwrap();
                assert_eq!(got, quantize_packed(&w, spec).unwrap(), "quantize_packed [{out_f}, {in_f}] g{g} {dtype} zero_point {zero_point}");
                inputs_untouched(&[&w], &[&wd], "quantize_packed");
            }
        }
    }
    let refused = quantize_packed(&up(&Tensor::zeros(&[12, 64], F16), gpu), QuantSpec { bits: 4, group_size: GroupSize::G32, zero_point: true });
    assert!(refused.is_err(), "12 outputs do not fill whole words");
}

#[test]
fn clip_thresholds_choose_what_the_cpu_chooses() {
    // The CUDA loss is d^T G d, the CPU's the partial products: equal up to f32 rounding, so a
    // choice may differ only between near-equal candidates. Real weights and activations (with
    // salient channels) are what this is for.
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(15);
    let grid = ClipGrid { n_grid: 20, max_shrink: 0.5 };
    let (mut total, mut differ) = (0usize, 0usize);
    for (out_f, in_f, t, g, zero_point) in
        [(96, 256, 512, 128, true), (130, 192, 200, 64, true), (64, 128, 37, 32, false), (256, 512, 512, 128, false)]
    {
        for dtype in [F32, F16] {
            let w = randn(&mut rng, &[out_f, in_f], 0.05, dtype);
            let mut xv = randn(&mut rng, &[t, in_f], 1.0, F32).to_f32_vec().unwrap();
            for row in xv.chunks_exact_mut(in_f) {
                row[3] *= 25.0;
                row[in_f / 2 + 1] *= 10.0;
            }
            let x = Tensor::from_f32_as(&[t, in_f], xv, dtype).unwrap();
            let spec = QuantSpec { bits: 4, group_size: GroupSize::new(g as u64).unwrap(), zero_point };
            let want = clip_thresholds(&w, &x, spec, grid).unwrap();
            let (wd, xd) = (up(&w, gpu), up(&x, gpu));
            let got = clip_thresholds(&wd, &xd, spec, grid).unwrap();
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert!(a.is_finite() && *a > 0.0, "{out_f}x{in_f} g{g}: threshold {a}");
                total += 1;
                differ += (a != b) as usize;
            }
            inputs_untouched(&[&w, &x], &[&wd, &xd], "clip_thresholds");
        }
    }
    eprintln!("clip thresholds: {differ} of {total} differ from the CPU's");
    assert!((differ as f64) < 0.01 * total as f64, "{differ} of {total} clip thresholds differ");
}

#[test]
fn staged_uploads_equal_plain_copies_and_survive_the_buffer_being_refilled() {
    let Some(device) = gpu() else { return };
    let mut rng = SplitMix64::new(41);
    let mut staging = awq_kernels::HostStaging::new(device);
    // Several tensors through one buffer, each refill right after the previous upload was queued
    // behind a long queue of device work: no upload may read bytes of the next tensor.
    let busy = randn(&mut rng, &[2048, 2048], 1.0, F32);
    let busy = up(&busy, device);
    let mut uploaded = Vec::new();
    for (i, dtype) in DTYPES.iter().cycle().take(9).enumerate() {
        for _ in 0..4 {
            drop(linear(&busy, &busy, None).unwrap());
        }
        let t = randn(&mut rng, &[33 + i, 700 + 3 * i], 1.0, *dtype);
        let bytes = t.to_le_bytes().unwrap();
        staging.buffer(bytes.len()).unwrap().copy_from_slice(&bytes);
        let on_device = staging.upload(*dtype, t.shape()).unwrap();
        assert_eq!(on_device.device(), device);
        uploaded.push((t, on_device));
    }
    for (i, (host, dev)) in uploaded.iter().enumerate() {
        assert_eq!(down(dev).to_le_bytes().unwrap(), host.to_le_bytes().unwrap(), "upload {i} ({})", host.dtype());
    }
    assert!(matches!(staging.upload(F32, &[1 << 24]), Err(Error::StagingTooShort { .. })));
}
