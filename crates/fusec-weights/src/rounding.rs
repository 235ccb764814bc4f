//! Rounding of `f32` values to the dtype a value has in the IR, and the compact codes
//! (`f16`/`bf16` bits, E4M3 bytes) weights and caches are stored in.
//!
//! Weights are held as `f32` rounded to their dtype, and the executor stores every
//! float as `f32` and computes in `f32`; a value whose IR
//! dtype is `f16` or `bf16` is rounded to that format (to nearest, ties to even) after
//! every op, which is what PyTorch's CPU kernels for half types do: they compute in
//! float and round the result.
//!
//! A value whose IR dtype is `fp8e4m3` or `fp8e5m2` holds values already rounded to
//! that format as CUDA converts (`fusec_ir::numerics::round_to`: nearest-even, and
//! saturating to the largest finite value, as `__NV_SATFINITE` does). Storing them as
//! `f32` keeps every kernel generic; their byte counts still use the 1-byte size.

use fusec_ir::numerics;
use fusec_ir::DType;
use half::{bf16, f16};

/// Whether values of `dtype` can be held (by the weights and the executor): every
/// dtype of the IR.
#[inline]
pub fn is_supported(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F32
            | DType::F16
            | DType::Bf16
            | DType::I32
            | DType::Fp8E4M3
            | DType::Fp8E5M2
            | DType::I8
            | DType::I4
            | DType::U4
            | DType::U8
    )
}

/// `x` rounded to the float format `dtype` (unchanged for `f32` and non-floats).
///
/// Always inlined, and small for it (the `f16` and FP8 conversions are calls): every
/// elementwise loop of a half-precision graph rounds each value, and inlined, the
/// `f32` case costs nothing and a loop over one dtype can be unswitched and vectorized.
#[inline(always)]
pub fn round(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => round_f16(x),
        DType::Bf16 => round_bf16(x),
        DType::Fp8E4M3 => round_e4m3(x),
        DType::Fp8E5M2 | DType::I8 | DType::I4 | DType::U4 | DType::U8 => {
            numerics::round_to(dtype, x)
        }
        DType::F32 | DType::I32 => x,
    }
}

/// `numerics::round_to(Fp8E4M3, x)`, bit for bit, without its generic conversion
/// (which measured about a fifth of an FP8 decode step, in the activation quantization
/// every GEMV does): round to nearest even at 3 mantissa bits on the `f32` bits for
/// normal E4M3 values, and at the subnormal quantum `2^-9` below `2^-6`. Values
/// outside `[-448, 448]` and non-finite ones, which a row scaled by its own absolute
/// maximum only produces by rounding, take the generic path and its saturation.
#[inline]
pub fn round_e4m3(x: f32) -> f32 {
    let a = x.abs();
    if a.is_nan() || a > 448.0 {
        return numerics::round_to(DType::Fp8E4M3, x);
    }
    if a < 1.0 / 64.0 {
        // Scaling by a power of two is exact, so this rounds `x` to a multiple of
        // `2^-9`, ties to even, and keeps the sign of zero.
        return (x * 512.0).round_ties_even() * (1.0 / 512.0);
    }
    // Drop the low 20 of the 23 mantissa bits, rounding to nearest even; a carry into
    // the exponent is the correct next binade, and `a <= 448` keeps it in range.
    let bits = x.to_bits();
    let rounded = bits + 0x7_FFFF + ((bits >> 20) & 1);
    f32::from_bits(rounded & !0xF_FFFF)
}

/// `x` rounded to `bf16` (nearest, ties to even), bit for bit as
/// `half::bf16::from_f32(x).to_f32()` gives it, NaNs included (quieted, sign and top
/// payload bits kept), but without branches on the common path, so that a loop over a
/// slice vectorizes: every result of a `bf16` graph is rounded by it.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    let nan = (bits & 0xFFFF_0000) | 0x0040_0000;
    f32::from_bits(if x.is_nan() { nan } else { rounded })
}

/// `x` rounded to `f16`.
#[inline(never)]
fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Rounds every value of `data` to `dtype`.
#[inline]
pub fn round_slice(dtype: DType, data: &mut [f32]) {
    match dtype {
        DType::Bf16 => data.iter_mut().for_each(|x| *x = round_bf16(*x)),
        DType::F16
        | DType::Fp8E4M3
        | DType::Fp8E5M2
        | DType::I8
        | DType::I4
        | DType::U4
        | DType::U8 => data.iter_mut().for_each(|x| *x = round(dtype, *x)),
        DType::F32 | DType::I32 => {}
    }
}

/// The bits of `x` as a `bf16`, if `x` is exactly a `bf16` value (NaNs have no
/// compact form here: a weight is finite).
#[inline]
pub fn bf16_bits(x: f32) -> Option<u16> {
    let b = bf16::from_f32(x);
    (b.to_f32().to_bits() == x.to_bits()).then_some(b.to_bits())
}

/// The bits of `x` as an `f16`, if `x` is exactly an `f16` value.
#[inline]
pub fn f16_bits(x: f32) -> Option<u16> {
    let h = f16::from_f32(x);
    (h.to_f32().to_bits() == x.to_bits()).then_some(h.to_bits())
}

/// The value of 16 stored bits of `dtype` (`f16`; anything else reads as `bf16`).
#[inline]
pub fn from_u16_bits(dtype: DType, bits: u16) -> f32 {
    if dtype == DType::F16 {
        f16::from_bits(bits).to_f32()
    } else {
        f32::from_bits(u32::from(bits) << 16)
    }
}

/// The value of an FP8 E4M3 byte: `s eeee mmm` with bias 7, subnormals at exponent
/// 0, and `s 1111 111` NaN (E4M3 has no infinities).
#[inline]
pub fn e4m3_value(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = u32::from((bits >> 3) & 0x0f);
    let m = u32::from(bits & 0x07);
    if bits & 0x7f == 0x7f {
        f32::NAN
    } else if e == 0 {
        // A subnormal: m * 2^-9, exact.
        sign * m as f32 * (1.0 / 512.0)
    } else {
        // A normal value: the exponent rebiased from 7 to 127, the three mantissa bits
        // on top of `f32`'s 23 (built from the bits: this runs once per weight when
        // FP8 weights are stored, and `powi` dominated loading them).
        sign * f32::from_bits(((e + 120) << 23) | (m << 20))
    }
}

/// The E4M3 byte of `x`, if `x` is exactly an E4M3 value. The byte is computed from
/// the `f32` fields and checked by decoding it back, so an inexact `x` gives `None`.
#[inline]
pub fn e4m3_bits(x: f32) -> Option<u8> {
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    let magnitude = if a == 0.0 {
        0
    } else {
        let exp = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        if exp < -6 {
            // A subnormal: a multiple of 2^-9 below 2^-6.
            let m = a * 512.0;
            if !(1.0..8.0).contains(&m) {
                return None;
            }
            m as u8
        } else if exp > 8 {
            return None;
        } else {
            (((exp + 7) as u8) << 3) | ((a.to_bits() >> 20) & 0x07) as u8
        }
    };
    let bits = sign | magnitude;
    (e4m3_value(bits).to_bits() == x.to_bits()).then_some(bits)
}

/// The E4M3 byte of `x` as [`e4m3_bits`] gives it, except that any NaN becomes the E4M3
/// NaN of its sign (`s 1111 111`), whose value reads back as NaN: the storage of a KV
/// cache, where a NaN activation must stay NaN but its payload need not survive.
#[inline]
pub fn e4m3_bits_nan(x: f32) -> Option<u8> {
    if x.is_nan() {
        Some(if x.is_sign_negative() { 0xff } else { 0x7f })
    } else {
        e4m3_bits(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even() {
        // 1 + 2^-11 is halfway between two f16 values: ties go to the even one, 1.0.
        assert_eq!(round(DType::F16, 1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(
            round(DType::F16, 1.0 + 3.0 * 2f32.powi(-11)),
            1.0 + 2f32.powi(-9)
        );
        assert_eq!(round(DType::Bf16, 1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round(DType::F32, 0.1), 0.1);
        assert!(round(DType::F16, 1e6).is_infinite());
    }

    #[test]
    fn compact_bits_round_trip_exact_values_only() {
        for bits in 0..=255u8 {
            let v = e4m3_value(bits);
            if bits & 0x7f == 0x7f {
                assert!(v.is_nan());
                continue;
            }
            assert_eq!(round(DType::Fp8E4M3, v), v, "byte {bits:#04x}");
            let reference = fusec_ir::numerics::e4m3_decode(bits);
            assert_eq!(v.to_bits(), reference.to_bits(), "byte {bits:#04x}");
            assert_eq!(e4m3_value(e4m3_bits(v).expect("exact")), v);
        }
        assert_eq!(e4m3_bits(-0.0), Some(0x80));
        assert_eq!(e4m3_bits(0.3), None);
        assert_eq!(e4m3_bits(1000.0), None);
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-7)), Some(0x3f81));
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-9)), None);
        let h = round(DType::F16, 0.1);
        assert_eq!(from_u16_bits(DType::F16, f16_bits(h).expect("exact")), h);
    }

    #[test]
    fn fp8_rounds_to_nearest_even_and_saturates() {
        // E4M3 has 3 mantissa bits: 1 + 1/16 is halfway between 1 and 1.125.
        assert_eq!(round(DType::Fp8E4M3, 1.0 + 1.0 / 16.0), 1.0);
        assert_eq!(round(DType::Fp8E4M3, 1.0 + 3.0 / 16.0), 1.25);
        assert_eq!(round(DType::Fp8E4M3, 1e6), 448.0);
        assert_eq!(round(DType::Fp8E4M3, -1e6), -448.0);
        assert_eq!(round(DType::Fp8E5M2, 1e6), 57344.0);
        let mut v = [0.3f32, 500.0];
        round_slice(DType::Fp8E4M3, &mut v);
        assert_eq!(v, [0.3125, 448.0]);
    }

    #[test]
    fn fast_bf16_rounding_matches_half() {
        let check = |x: f32| {
            let fast = round_bf16(x);
            let slow = bf16::from_f32(x).to_f32();
            assert_eq!(fast.to_bits(), slow.to_bits(), "{x:e} ({:#x})", x.to_bits());
        };
        // A sweep over all bit patterns (both signs, subnormals, infinities, NaNs with
        // payloads), the ties and their neighbours around every `bf16` value near 1.
        for bits in (0..=u32::MAX).step_by(4099) {
            check(f32::from_bits(bits));
        }
        for hi in 0x3F00u32..0x4100 {
            for lo in [0x7FFF, 0x8000, 0x8001, 0xFFFF, 0] {
                check(f32::from_bits(hi << 16 | lo));
                check(-f32::from_bits(hi << 16 | lo));
            }
        }
        for x in [
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NAN,
            -f32::NAN,
            0.0,
            -0.0,
        ] {
            check(x);
        }
        check(f32::from_bits(0x7F7F_FFFF));
        check(f32::from_bits(0xFF80_0001));
    }

    fn same(x: f32) {
        let fast = round_e4m3(x);
        let slow = numerics::round_to(DType::Fp8E4M3, x);
        assert!(
            fast.to_bits() == slow.to_bits() || (fast.is_nan() && slow.is_nan()),
            "{x:e} ({:#x}): {fast:e} against {slow:e}",
            x.to_bits()
        );
    }

    #[test]
    fn fast_e4m3_rounding_matches_the_generic_one() {
        // Every E4M3 value, the midpoints between neighbours (the ties) and the `f32`
        // values on either side of each midpoint.
        let mut values: Vec<f32> = (0..=255u8)
            .map(e4m3_value)
            .filter(|v| v.is_finite() && *v >= 0.0)
            .collect();
        values.sort_by(f32::total_cmp);
        values.dedup();
        for pair in values.windows(2) {
            let mid = (pair[0] + pair[1]) / 2.0;
            for v in [pair[0], mid, pair[1]] {
                for x in [
                    v,
                    f32::from_bits(v.to_bits() + 1),
                    f32::from_bits(v.to_bits().max(1) - 1),
                ] {
                    same(x);
                    same(-x);
                }
            }
        }
        // A sweep over every magnitude up to past the saturation point, and the
        // special values.
        let top = 600.0f32.to_bits();
        for bits in (0..top).step_by(997) {
            let x = f32::from_bits(bits);
            same(x);
            same(-x);
        }
        for x in [0.0, -0.0, 448.0, 449.0, 464.0, 1e9, f32::INFINITY, f32::NAN] {
            same(x);
            same(-x);
        }
    }
}
