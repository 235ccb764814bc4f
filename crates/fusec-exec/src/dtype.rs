//! Rounding of `f32` values to the dtype a value has in the IR.
//!
//! The executor stores every float as `f32` and computes in `f32`; a value whose IR
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

/// Whether the executor can hold values of `dtype`: every dtype of the IR.
pub fn is_supported(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F32 | DType::F16 | DType::Bf16 | DType::I32 | DType::Fp8E4M3 | DType::Fp8E5M2
    )
}

/// `x` rounded to the float format `dtype` (unchanged for `f32` and non-floats).
#[inline]
pub fn round(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::Bf16 => bf16::from_f32(x).to_f32(),
        DType::Fp8E4M3 | DType::Fp8E5M2 => numerics::round_to(dtype, x),
        DType::F32 | DType::I32 => x,
    }
}

/// Rounds every value of `data` to `dtype`.
pub fn round_slice(dtype: DType, data: &mut [f32]) {
    match dtype {
        DType::F16 | DType::Bf16 | DType::Fp8E4M3 | DType::Fp8E5M2 => {
            data.iter_mut().for_each(|x| *x = round(dtype, *x))
        }
        DType::F32 | DType::I32 => {}
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
}
