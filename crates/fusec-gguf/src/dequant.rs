//! Exact dequantization of ggml's block formats to `f32`.
//!
//! Each function follows ggml's `dequantize_row_*` in `ggml/src/ggml-quants.c` operation
//! for operation, in `f32` and in the same order (Rust never contracts `a * b + c` into
//! a fused multiply-add), so the values are bit-identical to ggml's scalar code and to
//! the `gguf` Python package's numpy dequantization, which transformers uses.

use half::{bf16, f16};

use crate::ggml_type::{GgmlType, K_SCALE_SIZE, QK, QK_K};

/// Dequantizes `bytes` of type `ty` into `out`, whose length must be the number of
/// weights the bytes hold (`ty.bytes_of(out.len()) == Some(bytes.len())`).
///
/// # Panics
/// If the lengths disagree; [`crate::GgufFile`] checks them before calling.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        ty.bytes_of(out.len() as u64),
        Some(bytes.len() as u64),
        "dequantize: {} bytes of {} do not hold {} weights",
        bytes.len(),
        ty.name(),
        out.len()
    );
    let blocks = bytes
        .chunks_exact(ty.block_bytes())
        .zip(out.chunks_exact_mut(ty.block_len()));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = half_at(b, 0)),
        GgmlType::BF16 => blocks
            .for_each(|(b, y)| y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| q6_k(b, y)),
    }
}

/// The little-endian IEEE half at `at`, widened (`GGML_FP16_TO_FP32`).
fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// `dequantize_row_q4_0`: byte j holds weight j (low nibble) and j + 16 (high);
/// y = (nibble - 8) * d.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qs = &b[2..2 + QK / 2];
    for (j, &q) in qs.iter().enumerate() {
        let x0 = i32::from(q & 0x0F) - 8;
        let x1 = i32::from(q >> 4) - 8;
        y[j] = x0 as f32 * d;
        y[j + QK / 2] = x1 as f32 * d;
    }
}

/// `dequantize_row_q4_1`: y = nibble * d + m.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qs = &b[4..4 + QK / 2];
    for (j, &q) in qs.iter().enumerate() {
        y[j] = f32::from(q & 0x0F) * d + m;
        y[j + QK / 2] = f32::from(q >> 4) * d + m;
    }
}

/// `dequantize_row_q8_0`: y = q * d.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, &q) in b[2..2 + QK].iter().enumerate() {
        y[j] = f32::from(q as i8) * d;
    }
}

/// `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` of a Q4_K or Q5_K
/// super-block, packed in 12 bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `dequantize_row_q4_K`: eight sub-blocks of 32; y = d * sc * nibble - dmin * m.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let min = half_at(b, 2);
    let scales = &b[4..4 + K_SCALE_SIZE];
    let qs = &b[4 + K_SCALE_SIZE..4 + K_SCALE_SIZE + QK_K / 2];
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc, m) = scale_min_k4(2 * chunk, scales);
        let (d1, m1) = (d * f32::from(sc), min * f32::from(m));
        let (sc, m) = scale_min_k4(2 * chunk + 1, scales);
        let (d2, m2) = (d * f32::from(sc), min * f32::from(m));
        for l in 0..32 {
            y[l] = d1 * f32::from(q[l] & 0xF) - m1;
            y[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// `dequantize_row_q5_K`: as Q4_K with a fifth bit per weight from `qh`.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let min = half_at(b, 2);
    let scales = &b[4..4 + K_SCALE_SIZE];
    let qh_at = 4 + K_SCALE_SIZE;
    let qh = &b[qh_at..qh_at + QK_K / 8];
    let ql = &b[qh_at + QK_K / 8..qh_at + QK_K / 8 + QK_K / 2];
    for (chunk, (ql, y)) in ql.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        let (sc, m) = scale_min_k4(2 * chunk, scales);
        let (d1, m1) = (d * f32::from(sc), min * f32::from(m));
        let (sc, m) = scale_min_k4(2 * chunk + 1, scales);
        let (d2, m2) = (d * f32::from(sc), min * f32::from(m));
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * f32::from((ql[l] & 0xF) + hi1) - m1;
            y[l + 32] = d2 * f32::from((ql[l] >> 4) + hi2) - m2;
        }
    }
}

/// `dequantize_row_q6_K`: 6-bit weights (4 low bits in `ql`, 2 high in `qh`) minus 32,
/// times d times a signed 8-bit scale per 16 weights.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[..QK_K / 2];
    let qh_all = &b[QK_K / 2..QK_K / 2 + QK_K / 4];
    let sc_at = QK_K / 2 + QK_K / 4;
    let sc_all = &b[sc_at..sc_at + QK_K / 16];
    let d = half_at(b, sc_at + QK_K / 16);
    for half in 0..QK_K / 128 {
        let ql = &ql_all[64 * half..];
        let qh = &qh_all[32 * half..];
        let sc = &sc_all[8 * half..];
        let y = &mut y[128 * half..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            let scale = |k: usize| d * f32::from(sc[is + k] as i8);
            y[l] = scale(0) * f32::from(q1);
            y[l + 32] = scale(2) * f32::from(q2);
            y[l + 64] = scale(4) * f32::from(q3);
            y[l + 96] = scale(6) * f32::from(q4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn half(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_bits().to_le_bytes()
    }

    #[test]
    fn q4_0_low_then_high_nibbles_minus_eight() {
        let mut b = half(0.5).to_vec();
        // Byte j = (j + 1) << 4 | j: weight j is j, weight j + 16 is j + 1.
        b.extend((0..16u8).map(|j| ((j + 1) % 16) << 4 | j));
        let mut y = [0.0; 32];
        dequantize(GgmlType::Q4_0, &b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], (((j + 1) % 16) as f32 - 8.0) * 0.5);
        }
    }

    #[test]
    fn q4_1_scale_and_min() {
        let mut b = half(0.25).to_vec();
        b.extend(half(-1.0));
        b.extend((0..16u8).map(|j| (15 - j) << 4 | j));
        let mut y = [0.0; 32];
        dequantize(GgmlType::Q4_1, &b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.25 - 1.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q8_0_signed_bytes() {
        let mut b = half(2.0).to_vec();
        b.extend((0..32i8).map(|j| (j * 4 - 64) as u8));
        let mut y = [0.0; 32];
        dequantize(GgmlType::Q8_0, &b, &mut y);
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as f32 * 4.0 - 64.0) * 2.0);
        }
    }

    /// Packs eight 6-bit (scale, min) pairs as `get_scale_min_k4` unpacks them
    /// (ggml-quants.c `quantize_row_q4_K_ref`'s packing).
    fn pack_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut q = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                q[j] = sc[j];
                q[j + 4] = m[j];
            } else {
                q[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
                q[j - 4] |= (sc[j] >> 4) << 6;
                q[j] |= (m[j] >> 4) << 6;
            }
        }
        q
    }

    #[test]
    fn k4_scales_round_trip_through_the_packing() {
        let sc = [1, 63, 17, 32, 45, 2, 60, 33];
        let m = [62, 0, 5, 48, 19, 63, 7, 40];
        let q = pack_scales(sc, m);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (sc[j], m[j]), "sub-block {j}");
        }
    }

    #[test]
    fn q4_k_and_q5_k_by_sub_block() {
        let sc = [1, 2, 3, 4, 5, 6, 7, 63];
        let m = [0, 1, 2, 3, 60, 5, 6, 7];
        let (d, dmin) = (0.125f32, 0.5f32);
        let nibble = |i: usize| ((i * 7) % 16) as u8;
        let mut qs = [0u8; 128];
        for chunk in 0..4 {
            for l in 0..32 {
                qs[chunk * 32 + l] = nibble(chunk * 64 + l) | nibble(chunk * 64 + 32 + l) << 4;
            }
        }
        let mut b4 = half(d).to_vec();
        b4.extend(half(dmin));
        b4.extend(pack_scales(sc, m));
        b4.extend(qs);
        let mut y = [0.0; 256];
        dequantize(GgmlType::Q4_K, &b4, &mut y);
        for (i, v) in y.iter().enumerate() {
            let s = i / 32;
            let want = d * f32::from(sc[s]) * f32::from(nibble(i)) - dmin * f32::from(m[s]);
            assert_eq!(*v, want, "weight {i}");
        }
        // Q5_K: the same nibbles, and the fifth bit set on every third weight.
        let high = |i: usize| i.is_multiple_of(3);
        let mut qh = [0u8; 32];
        for i in 0..256 {
            if high(i) {
                qh[i % 32] |= 1 << (i / 32);
            }
        }
        let mut b5 = half(d).to_vec();
        b5.extend(half(dmin));
        b5.extend(pack_scales(sc, m));
        b5.extend(qh);
        b5.extend(qs);
        dequantize(GgmlType::Q5_K, &b5, &mut y);
        for (i, v) in y.iter().enumerate() {
            let s = i / 32;
            let q = f32::from(nibble(i) + if high(i) { 16 } else { 0 });
            let want = d * f32::from(sc[s]) * q - dmin * f32::from(m[s]);
            assert_eq!(*v, want, "weight {i}");
        }
    }

    #[test]
    fn q6_k_six_bits_minus_32_by_scale() {
        let q = |i: usize| ((i * 11) % 64) as u8;
        let scales: [i8; 16] = [
            1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 15, -128,
        ];
        let d = 0.0625f32;
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        // Weight 128h + 32k + l: low 4 bits in ql[64h + l + 32(k%2)] (k >= 2: high
        // nibble), high 2 bits in qh[32h + l] at bit 2k.
        for i in 0..256 {
            let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
            let lo = q(i) & 0xF;
            let at = 64 * h + l + 32 * (k % 2);
            ql[at] |= if k >= 2 { lo << 4 } else { lo };
            qh[32 * h + l] |= (q(i) >> 4) << (2 * k);
        }
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(scales.iter().map(|&s| s as u8));
        b.extend(half(d));
        let mut y = [0.0; 256];
        dequantize(GgmlType::Q6_K, &b, &mut y);
        for (i, v) in y.iter().enumerate() {
            let want = d * f32::from(scales[i / 16]) * (f32::from(q(i)) - 32.0);
            assert_eq!(*v, want, "weight {i}");
        }
    }
}
