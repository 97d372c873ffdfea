//! GGML block formats to f32, exactly as llama.cpp's `ggml-quants.c` (`dequantize_row_*`) and
//! `ggml.c` (F16, BF16) define them.
//!
//! One function per block type turns one block of bytes into `block_len` f32 values; every
//! product is an f32 product in the order ggml's C code writes it (never fused into an FMA), so the
//! results equal the Python `gguf` package's `gguf.quants.dequantize` bit for bit (the e2e tests
//! check every type on random blocks). [`dequantize`] runs over whole rows. Pure: no I/O, no
//! threads (the importer splits tensors into chunks of blocks and runs them in parallel).
//!
//! Block layouts (`ggml-common.h`; `d`, `m`, `dmin` are f16 little-endian; QK_K = 256):
//!
//! | type | elements | bytes | layout |
//! | --- | --- | --- | --- |
//! | Q4_0 | 32 | 18 | d, qs[16]: element j is `(qs[j] & 15) - 8`, element j+16 is `(qs[j] >> 4) - 8`, times d |
//! | Q4_1 | 32 | 20 | d, m, qs[16]: as Q4_0 without the -8, `q * d + m` |
//! | Q5_0 | 32 | 22 | d, qh (u32), qs[16]: bit j of qh is the 5th bit of element j; `(q - 16) * d` |
//! | Q5_1 | 32 | 24 | d, m, qh, qs[16]: `q * d + m` |
//! | Q8_0 | 32 | 34 | d, qs[32] (i8): `q * d` |
//! | Q2_K | 256 | 84 | scales[16] (4-bit scale, 4-bit min), qs[64] (2 bits), d, dmin |
//! | Q3_K | 256 | 110 | hmask[32], qs[64] (2 bits), scales[12] (16 x 6 bits, offset 32), d |
//! | Q4_K | 256 | 144 | d, dmin, scales[12] (8 x 6-bit scale + 6-bit min), qs[128] |
//! | Q5_K | 256 | 176 | d, dmin, scales[12], qh[32], qs[128] |
//! | Q6_K | 256 | 210 | ql[128], qh[64], scales[16] (i8), d |

use half::{bf16, f16};

use super::GgmlType;

/// The types [`dequantize`] handles.
pub const SUPPORTED: [GgmlType; 13] = {
    use GgmlType::*;
    [F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K]
};

/// `ty` is a type [`dequantize`] does not handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsupported(pub GgmlType);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = SUPPORTED.iter().map(|t| t.name()).collect();
        write!(f, "tensor type {} is not supported (supported: {})", self.0, names.join(", "))
    }
}

/// `Ok` when [`dequantize`] handles `ty`.
pub fn check_supported(ty: GgmlType) -> Result<(), Unsupported> {
    if SUPPORTED.contains(&ty) {
        Ok(())
    } else {
        Err(Unsupported(ty))
    }
}

/// Dequantizes whole blocks: `data` holds `n` blocks of `ty`, `out` gets their `n * block_len`
/// values.
///
/// # Panics
/// When `data` is not a whole number of blocks or `out` does not have room for exactly their
/// values: callers size both from a checked tensor info.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), Unsupported> {
    use GgmlType::*;
    let (bl, bb) = (ty.block_len(), ty.block_bytes());
    assert!(
        data.len().is_multiple_of(bb) && data.len() / bb * bl == out.len(),
        "{} bytes of {ty} do not dequantize into {} values",
        data.len(),
        out.len()
    );
    match ty {
        F32 => blocks(data, out, |b: &[u8; 4], y: &mut [f32; 1]| y[0] = f32::from_le_bytes(*b)),
        F16 => blocks(data, out, |b: &[u8; 2], y: &mut [f32; 1]| y[0] = f16::from_le_bytes(*b).to_f32()),
        BF16 => blocks(data, out, |b: &[u8; 2], y: &mut [f32; 1]| y[0] = bf16::from_le_bytes(*b).to_f32()),
        Q4_0 => blocks(data, out, q4_0),
        Q4_1 => blocks(data, out, q4_1),
        Q5_0 => blocks(data, out, q5_0),
        Q5_1 => blocks(data, out, q5_1),
        Q8_0 => blocks(data, out, q8_0),
        Q2_K => blocks(data, out, q2_k),
        Q3_K => blocks(data, out, q3_k),
        Q4_K => blocks(data, out, q4_k),
        Q5_K => blocks(data, out, q5_k),
        Q6_K => blocks(data, out, q6_k),
        other => return Err(Unsupported(other)),
    }
    Ok(())
}

/// Runs `f` on each block (monomorphised per type, so the block functions inline).
fn blocks<const BB: usize, const BL: usize>(data: &[u8], out: &mut [f32], f: impl Fn(&[u8; BB], &mut [f32; BL])) {
    for (b, y) in data.chunks_exact(BB).zip(out.chunks_exact_mut(BL)) {
        f(b.try_into().expect("chunks_exact gives BB bytes"), y.try_into().expect("chunks_exact gives BL values"));
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `dequantize_row_q4_0`
fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = half(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// `dequantize_row_q4_1`
fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// `dequantize_row_q5_0`
fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = half(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh_0 = ((qh >> j) << 4) & 0x10;
        let xh_1 = (qh >> (j + 12)) & 0x10;
        y[j] = (((qs[j] & 0x0F) as u32 | xh_0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as u32 | xh_1) as i32 - 16) as f32 * d;
    }
}

/// `dequantize_row_q5_1`
fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh_0 = ((qh >> j) << 4) & 0x10;
        let xh_1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((qs[j] & 0x0F) as u32 | xh_0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) as u32 | xh_1) as f32 * d + m;
    }
}

/// `dequantize_row_q8_0`
fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = half(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

/// `dequantize_row_q2_K`: 16 groups of 16, each with a 4-bit scale and a 4-bit min.
fn q2_k(b: &[u8; 84], y: &mut [f32; 256]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, min) = (half(b, 80), half(b, 82));
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half_idx in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0F) as f32;
                let ml = min * (sc >> 4) as f32;
                let base = n * 128 + j * 32 + half_idx * 16;
                for l in 0..16 {
                    y[base + l] = dl * ((q[half_idx * 16 + l] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// `dequantize_row_q3_K`: 16 groups of 16 with 6-bit signed scales; the high mask bit set means
/// "no -4 offset".
fn q3_k(b: &[u8; 110], y: &mut [f32; 256]) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d_all = half(b, 108);
    // Scale k: low 4 bits from byte k (k < 8) or the high nibble of byte k - 8; high 2 bits from
    // byte 8 + k % 4, at bit 2 * (k / 4).
    let scale = |k: usize| -> i32 {
        let low = if k < 8 { packed[k] & 0x0F } else { packed[k - 8] >> 4 };
        let high = (packed[8 + k % 4] >> (2 * (k / 4))) & 3;
        (low | (high << 4)) as i32 - 32
    };
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for j in 0..4 {
            let (shift, m) = (2 * j, 1u8 << (n * 4 + j));
            for half_idx in 0..2 {
                let dl = d_all * scale(is) as f32;
                is += 1;
                let base = n * 128 + j * 32 + half_idx * 16;
                for l in 0..16 {
                    let i = half_idx * 16 + l;
                    let low = ((q[i] >> shift) & 3) as i32;
                    let offset = if hmask[i] & m != 0 { 0 } else { 4 };
                    y[base + l] = dl * (low - offset) as f32;
                }
            }
        }
    }
}

/// `get_scale_min_k4`: scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K and
/// Q5_K (6 bits each; sub-blocks 4..8 keep their top 2 bits in the top bits of bytes 0..8).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// `dequantize_row_q4_K`: 8 sub-blocks of 32, `d * scale * q - dmin * min`.
fn q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let (d, min) = (half(b, 0), half(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (chunk, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// `dequantize_row_q5_K`: Q4_K plus a fifth bit per element from `qh`.
fn q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let (d, min) = (half(b, 0), half(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (chunk, ql) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
            out[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// `dequantize_row_q6_K`: 16 groups of 16 with i8 scales; 4 low bits in `ql`, 2 high bits in `qh`.
fn q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let (ql_all, qh_all, sc_all) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    for n in 0..2 {
        let (ql, qh, sc) = (&ql_all[n * 64..n * 64 + 64], &qh_all[n * 32..n * 32 + 32], &sc_all[n * 8..n * 8 + 8]);
        let out = &mut y[n * 128..n * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * sc[is] as i8 as f32 * q1 as f32;
            out[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            out[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            out[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Known answers worked out by hand from the block layouts above: each test fills a block so
    //! that every element's value tells where it came from, then checks positions and formulas.
    //! The e2e tests compare every type with `gguf.quants.dequantize` on random blocks.
    #![allow(clippy::needless_range_loop)] // element indices are what these tests are about

    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn run(ty: GgmlType, block: &[u8]) -> Vec<f32> {
        let mut out = vec![f32::NAN; block.len() / ty.block_bytes() * ty.block_len()];
        dequantize(ty, block, &mut out).unwrap();
        out
    }

    #[test]
    fn float_types() {
        let f32s = run(GgmlType::F32, &[1.5f32.to_le_bytes(), (-2.25f32).to_le_bytes()].concat());
        assert_eq!(f32s, vec![1.5, -2.25]);
        assert_eq!(run(GgmlType::F16, &[h(0.333), h(-65504.0)].concat()), vec![f16::from_f32(0.333).to_f32(), -65504.0]);
        // bf16 is the top half of an f32.
        let bf = [((1.0f32 + 2f32.powi(-7)).to_bits() >> 16) as u16, 0xC040];
        let bytes: Vec<u8> = bf.iter().flat_map(|b| b.to_le_bytes()).collect();
        assert_eq!(run(GgmlType::BF16, &bytes), vec![1.0 + 2f32.powi(-7), -3.0]);
    }

    #[test]
    fn q4_0_and_q4_1_low_nibbles_first_then_high() {
        // qs[j] = (15 - j) << 4 | j: element j gets nibble j, element j + 16 gets 15 - j.
        let qs: Vec<u8> = (0..16u8).map(|j| ((15 - j) << 4) | j).collect();
        let y = run(GgmlType::Q4_0, &[&h(0.5)[..], &qs].concat());
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
        }
        let y = run(GgmlType::Q4_1, &[&h(0.25)[..], &h(-1.0), &qs].concat());
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.25 - 1.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q5_0_and_q5_1_take_bit_j_of_qh_as_bit_4_of_element_j() {
        let qs = [0x21u8; 16]; // low nibble 1, high nibble 2
        let qh: u32 = 0b1010_0000_0000_0000_0000_0000_0000_0101; // elements 0, 2, 29, 31
        let y = run(GgmlType::Q5_0, &[&h(2.0)[..], &qh.to_le_bytes(), &qs].concat());
        for j in 0..32 {
            let low = if j < 16 { 1 } else { 2 };
            let high = if [0, 2, 29, 31].contains(&j) { 16 } else { 0 };
            assert_eq!(y[j], ((low + high) as f32 - 16.0) * 2.0, "element {j}");
        }
        let y = run(GgmlType::Q5_1, &[&h(2.0)[..], &h(0.5), &qh.to_le_bytes(), &qs].concat());
        for j in 0..32 {
            let low = if j < 16 { 1 } else { 2 };
            let high = if [0, 2, 29, 31].contains(&j) { 16 } else { 0 };
            assert_eq!(y[j], (low + high) as f32 * 2.0 + 0.5, "element {j}");
        }
    }

    #[test]
    fn q8_0_is_signed() {
        let qs: Vec<u8> = (0..32).map(|j| (j * 8 - 128) as i8 as u8).collect();
        let y = run(GgmlType::Q8_0, &[&h(0.125)[..], &qs].concat());
        for j in 0..32 {
            assert_eq!(y[j], (j as f32 * 8.0 - 128.0) * 0.125);
        }
    }

    /// The 12 packed bytes of Q4_K/Q5_K holding scales `sc` and mins `m` (6 bits each).
    fn pack_k4(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut q = [0u8; 12];
        for j in 0..4 {
            q[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            q[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            q[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
        }
        q
    }

    #[test]
    fn k4_scales_unpack_six_bits_each() {
        let (sc, m) = ([1, 20, 33, 63, 17, 48, 5, 62], [63, 0, 7, 40, 61, 16, 34, 3]);
        let q = pack_k4(sc, m);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (sc[j], m[j]), "sub-block {j}");
        }
    }

    #[test]
    fn q4_k_and_q5_k_sub_blocks() {
        let (sc, m) = ([1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]);
        // qs byte l of chunk c: low nibble (l % 16), high nibble 15 - (l % 16).
        let qs: Vec<u8> = (0..128).map(|i| (((15 - i % 16) << 4) | (i % 16)) as u8).collect();
        let (d, dmin) = (0.5f32, 0.25f32);
        let y = run(GgmlType::Q4_K, &[&h(d)[..], &h(dmin), &pack_k4(sc, m), &qs].concat());
        for i in 0..256 {
            let (chunk, within) = (i / 64, i % 64);
            let sub = 2 * chunk + within / 32;
            let l = within % 32;
            let q = if within < 32 { l % 16 } else { 15 - l % 16 };
            assert_eq!(y[i], d * sc[sub] as f32 * q as f32 - dmin * m[sub] as f32, "element {i}");
        }
        // Q5_K: bit 2c of qh[l] is the fifth bit of element l of sub-block 2c, bit 2c+1 of sub-block 2c+1.
        let qh: Vec<u8> = (0..32).map(|l| if l % 3 == 0 { 0b0100_0001 } else { 0b1000_0010 }).collect();
        let y = run(GgmlType::Q5_K, &[&h(d)[..], &h(dmin), &pack_k4(sc, m), &qh, &qs].concat());
        for i in 0..256 {
            let (chunk, within) = (i / 64, i % 64);
            let sub = 2 * chunk + within / 32;
            let l = within % 32;
            let low = if within < 32 { l % 16 } else { 15 - l % 16 };
            let high = if qh[l] >> sub & 1 == 1 { 16 } else { 0 };
            assert_eq!(y[i], d * sc[sub] as f32 * (low + high) as f32 - dmin * m[sub] as f32, "element {i}");
        }
    }

    #[test]
    fn q6_k_groups_and_bits() {
        // Element e = 128n + 32k + l (k = 0..4) has q = (e * 7) % 64 - 32 and scale group 8n + 2k + l/16.
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        let q_of = |e: usize| (e * 7) % 64;
        for n in 0..2 {
            for l in 0..32 {
                let [a, b, c, dd] = [0, 1, 2, 3].map(|k| q_of(128 * n + 32 * k + l) as u8);
                ql[64 * n + l] = (a & 0x0F) | ((c & 0x0F) << 4);
                ql[64 * n + l + 32] = (b & 0x0F) | ((dd & 0x0F) << 4);
                qh[32 * n + l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((dd >> 4) << 6);
            }
        }
        let scales: Vec<u8> = (0..16).map(|g: i32| (g * 9 - 70) as i8 as u8).collect();
        let y = run(GgmlType::Q6_K, &[&ql[..], &qh, &scales, &h(0.5)].concat());
        for e in 0..256 {
            let (n, k, l) = (e / 128, (e % 128) / 32, e % 32);
            let group = 8 * n + 2 * k + l / 16;
            let want = 0.5 * scales[group] as i8 as f32 * (q_of(e) as f32 - 32.0);
            assert_eq!(y[e], want, "element {e}");
        }
    }

    #[test]
    fn q2_k_groups_and_shifts() {
        // Element e = 128n + 32j + l has q = (e / 3) % 4 and group 8n + 2j + l/16.
        let q_of = |e: usize| ((e / 3) % 4) as u8;
        let mut qs = [0u8; 64];
        for e in 0..256 {
            let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
            qs[32 * n + l] |= q_of(e) << (2 * j);
        }
        let scales: Vec<u8> = (0..16u8).map(|g| ((g % 5) << 4) | (15 - g)).collect();
        let y = run(GgmlType::Q2_K, &[&scales[..], &qs, &h(0.5), &h(0.25)].concat());
        for e in 0..256 {
            let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
            let g = 8 * n + 2 * j + l / 16;
            let want = 0.5 * (scales[g] & 15) as f32 * q_of(e) as f32 - 0.25 * (scales[g] >> 4) as f32;
            assert_eq!(y[e], want, "element {e}");
        }
    }

    #[test]
    fn q3_k_groups_scales_and_high_mask() {
        let q_of = |e: usize| ((e / 5) % 4) as u8;
        let high_of = |e: usize| e % 7 < 3;
        let (mut qs, mut hmask) = ([0u8; 64], [0u8; 32]);
        for e in 0..256 {
            let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
            qs[32 * n + l] |= q_of(e) << (2 * j);
            if high_of(e) {
                hmask[l] |= 1 << (4 * n + j);
            }
        }
        let scale_of = |g: usize| (g * 4 + 1) as u8; // 6-bit values 1..61, stored with +0; meaning value - 32
        let mut packed = [0u8; 12];
        for k in 0..16 {
            let s = scale_of(k);
            if k < 8 {
                packed[k] |= s & 0x0F;
            } else {
                packed[k - 8] |= (s & 0x0F) << 4;
            }
            packed[8 + k % 4] |= (s >> 4) << (2 * (k / 4));
        }
        let y = run(GgmlType::Q3_K, &[&hmask[..], &qs, &packed, &h(0.5)].concat());
        for e in 0..256 {
            let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
            let g = 8 * n + 2 * j + l / 16;
            let q = q_of(e) as f32 - if high_of(e) { 0.0 } else { 4.0 };
            assert_eq!(y[e], 0.5 * (scale_of(g) as f32 - 32.0) * q, "element {e}");
        }
    }

    #[test]
    fn unsupported_types_are_named() {
        let mut out = vec![0.0; 256];
        let err = dequantize(GgmlType::IQ2_XXS, &[0; 66], &mut out).unwrap_err();
        assert_eq!(err, Unsupported(GgmlType::IQ2_XXS));
        assert!(err.to_string().starts_with("tensor type IQ2_XXS is not supported (supported: F32, F16, BF16, Q4_0"), "{err}");
    }
}
