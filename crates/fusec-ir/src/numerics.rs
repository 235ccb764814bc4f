//! Numerics of the dtypes: rounding an f32 to a dtype as CUDA does, and the FP8
//! formats' constants.
//!
//! Conversions round to nearest, ties to even. FP8 conversions saturate to the largest
//! finite value (CUDA's `__NV_SATFINITE`) and keep NaN. The `float8` crate implements
//! CUDA's conversion routine, but its `MAX` constants are wrong (`E4M3::MAX` reads 416
//! and `E5M2::MAX` 49152, where the OCP 8-bit floating point specification, v1.0,
//! gives 448 and 57344), so the format limits are defined here.

use float8::{F8E4M3, F8E5M2};
use half::{bf16, f16};

use crate::dtype::DType;

/// Largest finite E4M3 value (S.1111.110 = 448).
pub const E4M3_MAX: f32 = 448.0;
/// Largest finite E5M2 value (S.11110.11 = 57344).
pub const E5M2_MAX: f32 = 57344.0;

/// The largest finite value of an FP8 dtype.
pub fn fp8_max(dtype: DType) -> Option<f32> {
    match dtype {
        DType::Fp8E4M3 => Some(E4M3_MAX),
        DType::Fp8E5M2 => Some(E5M2_MAX),
        _ => None,
    }
}

/// `x` rounded to the nearest value of `dtype` (f32 and i32 unchanged; the integer
/// codes `i8`, `i4` and `u4` to the nearest integer, ties to even, saturating to their range,
/// NaN to 0).
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 | DType::I32 => x,
        DType::I8 => saturate_int(x, -128.0, 127.0),
        DType::I4 => saturate_int(x, -8.0, 7.0),
        DType::U4 => saturate_int(x, 0.0, 15.0),
        DType::U8 => saturate_int(x, 0.0, 255.0),
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::Bf16 => bf16::from_f32(x).to_f32(),
        DType::Fp8E4M3 => F8E4M3::from_f32(x).to_f32(),
        DType::Fp8E5M2 => F8E5M2::from_f32(x).to_f32(),
    }
}

fn saturate_int(x: f32, lo: f32, hi: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.round_ties_even().clamp(lo, hi)
    }
}

/// The E4M3 code of `x`, saturating.
pub fn e4m3_encode(x: f32) -> u8 {
    F8E4M3::from_f32(x).to_bits()
}

/// The value of an E4M3 code.
pub fn e4m3_decode(code: u8) -> f32 {
    F8E4M3::from_bits(code).to_f32()
}

/// The E5M2 code of `x`, saturating.
pub fn e5m2_encode(x: f32) -> u8 {
    F8E5M2::from_f32(x).to_bits()
}

/// The value of an E5M2 code.
pub fn e5m2_decode(code: u8) -> f32 {
    F8E5M2::from_bits(code).to_f32()
}

/// Inputs that share one scale when a GEMV quantizes its activations to FP8
/// (`dequant{act=fp8e4m3}`): a block of 32 consecutive inputs of a row, the last block
/// of a row possibly shorter. Finer than one scale per token because activations have
/// outlier channels: one large value sets a token-wide scale that pushes the row's
/// small values into E4M3's subnormals or to zero, while a block's scale only
/// coarsens its own 32 neighbours (the 1x128 activation tiles of DeepSeek-V3's FP8
/// training, arXiv:2412.19437 §3.3, and the 32-value blocks of the OCP Microscaling
/// formats, here with an `f32` scale rather than a power of two). On SmolLM2-135M it
/// took FP8's mean KL from 0.057 to 0.041 nats (README.md, accuracy).
pub const FP8_ACT_BLOCK: usize = 32;

/// The scale of one block of activations quantized to the FP8 `dtype`:
/// [`scale_for`] of the block's largest magnitude, rounded up to 16 significant bits
/// (the low 8 bits of the `f32` mantissa cleared, carrying into the exponent). Then a
/// quantized activation `code * scale` (4 significant bits times 16) is exact in
/// `f32`, and so is its product with an E4M3 weight (20 bits times 4): the dot
/// products of every kernel, CPU or GPU, differ only in the order of their sums, and
/// the CPU's exact E4M3 path applies. Rounding up keeps `absmax / scale <= max`;
/// it costs at most 2^-15 of the scale.
pub fn act_block_scale(absmax: f32, dtype: DType) -> f32 {
    let bits = scale_for(absmax, dtype).to_bits();
    if bits & 0xFF == 0 {
        f32::from_bits(bits)
    } else {
        f32::from_bits((bits | 0xFF) + 1)
    }
}

/// The scale that maps `absmax` onto the largest finite value of `dtype`
/// (`absmax / max`), or 1 for an all-zero tensor so that zeros stay zeros.
pub fn scale_for(absmax: f32, dtype: DType) -> f32 {
    let max = fp8_max(dtype).unwrap_or(1.0);
    if absmax > 0.0 && absmax.is_finite() {
        absmax / max
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn act_block_scales_round_up_to_16_bits_and_make_codes_times_scale_exact() {
        assert_eq!(act_block_scale(448.0, DType::Fp8E4M3), 1.0);
        assert_eq!(act_block_scale(0.0, DType::Fp8E4M3), 1.0);
        assert_eq!(act_block_scale(f32::NAN, DType::Fp8E4M3), 1.0);
        let mut absmax = 1e-30f32;
        while absmax < 1e30 {
            let s = act_block_scale(absmax, DType::Fp8E4M3);
            let exact = scale_for(absmax, DType::Fp8E4M3);
            assert!(s >= exact && f64::from(s) <= f64::from(exact) * (1.0 + 1.0 / 32768.0));
            assert_eq!(s.to_bits() & 0xFF, 0, "{absmax}: {s}");
            // The largest code and a few others, times the scale, exact in f32.
            for code in [448.0f32, -240.0, 1.75, 0.013_671_875, 0.001_953_125] {
                let p = f64::from(code) * f64::from(s);
                assert_eq!(f64::from(code * s), p, "{code} x {s}");
            }
            absmax *= 1.37;
        }
    }

    #[test]
    fn all_e4m3_codes_round_trip() {
        for code in 0u8..=255 {
            let v = e4m3_decode(code);
            if code & 0x7F == 0x7F {
                assert!(v.is_nan(), "{code:#x} is NaN in E4M3");
                continue;
            }
            assert!(v.is_finite(), "E4M3 has no infinities: {code:#x}");
            assert_eq!(e4m3_encode(v), code, "{code:#x} -> {v}");
        }
        assert_eq!(e4m3_decode(0x7E), E4M3_MAX);
        assert_eq!(e4m3_decode(0xFE), -E4M3_MAX);
        assert_eq!(e4m3_decode(0x01), 2f32.powi(-9), "smallest subnormal");
    }

    #[test]
    fn all_e5m2_codes_round_trip() {
        for code in 0u8..=255 {
            let v = e5m2_decode(code);
            match code & 0x7F {
                0x7C => assert!(v.is_infinite(), "{code:#x} is inf"),
                0x7D..=0x7F => assert!(v.is_nan(), "{code:#x} is NaN"),
                _ => assert_eq!(e5m2_encode(v), code, "{code:#x} -> {v}"),
            }
        }
        assert_eq!(e5m2_decode(0x7B), E5M2_MAX);
        assert_eq!(e5m2_decode(0x01), 2f32.powi(-16), "smallest subnormal");
    }

    #[test]
    fn conversions_saturate_and_round_to_even() {
        assert_eq!(round_to(DType::Fp8E4M3, 1e6), E4M3_MAX);
        assert_eq!(round_to(DType::Fp8E4M3, -1e6), -E4M3_MAX);
        assert_eq!(round_to(DType::Fp8E5M2, 1e9), E5M2_MAX);
        assert!(round_to(DType::Fp8E4M3, f32::NAN).is_nan());
        // Between 1.0 (mantissa 000) and 1.125 (001), the tie goes to the even 1.0;
        // between 1.125 and 1.25 (010) it goes to 1.25.
        assert_eq!(round_to(DType::Fp8E4M3, 1.0625), 1.0);
        assert_eq!(round_to(DType::Fp8E4M3, 1.1875), 1.25);
        assert_eq!(round_to(DType::Fp8E4M3, 1.07), 1.125);
        assert_eq!(round_to(DType::Bf16, 1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round_to(DType::F16, 65520.0), f32::INFINITY);
        assert_eq!(scale_for(896.0, DType::Fp8E4M3), 2.0);
        assert_eq!(scale_for(0.0, DType::Fp8E4M3), 1.0);
    }
}
