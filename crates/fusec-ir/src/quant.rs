//! The integer block formats of quantized weights: what each one stores, stated once.
//!
//! A weight `W [out, in]` in one of these formats is the `dequant{act=i8}` of two
//! weights: its integer codes `[out, in]` (the dtype of [`IntFormat::codes`]) and its
//! per-block side data (the type of [`IntFormat::scales`]), both cut from llama.cpp's
//! blocks (ggml-common.h) along the input dimension, each row its own blocks:
//!
//! | format | ggml block   | codes | side data per block of 32 inputs       | bits/weight |
//! |--------|--------------|-------|----------------------------------------|-------------|
//! | Q8_0   | `block_q8_0` | `i8`  | `f16` scale `d`: `w = d * q`           | 8.5         |
//! | Q4_0   | `block_q4_0` | `i4`  | `f16` scale `d`: `w = d * q`, q in -8..8 | 4.5       |
//! | Q4_1   | `block_q4_1` | `u4`  | `f16` scale `d` and minimum `m`: `w = d * q + m`, q in 0..16 | 5 |
//!
//! Nibble codes (`i4`, `u4`) pack two to a byte in each block of 32: byte `j` holds
//! element `j` in its low nibble and element `j + 16` in its high one
//! (`dequantize_row_q4_0`, `dequantize_row_q4_1` in ggml-quants.c).

use std::fmt;

use crate::{DType, Dim, Shape, TensorType};

/// Elements along the input dimension that share one scale: a block of llama.cpp's
/// Q8_0, Q4_0 and Q4_1 formats (`QK8_0`, `QK4_0`, `QK4_1` in ggml-common.h).
pub const BLOCK: u64 = 32;

/// An integer weight format (see the module documentation).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum IntFormat {
    /// 8-bit codes with one `f16` scale per block, llama.cpp's Q8_0.
    Q8_0,
    /// 4-bit codes `n - 8` with one `f16` scale per block, llama.cpp's Q4_0.
    Q4_0,
    /// 4-bit codes `n` with an `f16` scale and an `f16` minimum per block, Q4_1.
    Q4_1,
}

impl IntFormat {
    pub const ALL: [IntFormat; 3] = [IntFormat::Q8_0, IntFormat::Q4_0, IntFormat::Q4_1];

    /// ggml's name of the format (`q8_0`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            IntFormat::Q8_0 => "q8_0",
            IntFormat::Q4_0 => "q4_0",
            IntFormat::Q4_1 => "q4_1",
        }
    }

    /// The dtype of the codes.
    pub const fn codes(self) -> DType {
        match self {
            IntFormat::Q8_0 => DType::I8,
            IntFormat::Q4_0 => DType::I4,
            IntFormat::Q4_1 => DType::U4,
        }
    }

    /// The suffix of the codes' weight name (`W.q8_0`; the side data is `W.scale`).
    pub const fn suffix(self) -> &'static str {
        match self {
            IntFormat::Q8_0 => crate::step::Q8_0_SUFFIX,
            IntFormat::Q4_0 => crate::step::Q4_0_SUFFIX,
            IntFormat::Q4_1 => crate::step::Q4_1_SUFFIX,
        }
    }

    /// Bytes of one GGUF block of [`BLOCK`] weights (`sizeof(block_q8_0)`, ...).
    pub const fn block_bytes(self) -> u64 {
        match self {
            IntFormat::Q8_0 => 34,
            IntFormat::Q4_0 => 18,
            IntFormat::Q4_1 => 20,
        }
    }

    /// `f16` values of side data per block: a scale, or a scale and a minimum.
    pub const fn scales_per_block(self) -> u64 {
        match self {
            IntFormat::Q8_0 | IntFormat::Q4_0 => 1,
            IntFormat::Q4_1 => 2,
        }
    }

    /// The format whose codes are `codes`.
    pub fn of_codes(codes: DType) -> Option<IntFormat> {
        IntFormat::ALL.into_iter().find(|f| f.codes() == codes)
    }

    /// Checks that a row of `ins` inputs is whole blocks.
    pub fn check_width(self, ins: u64) -> Result<(), String> {
        if ins.is_multiple_of(BLOCK) {
            Ok(())
        } else {
            Err(format!(
                "{self} needs an input dimension that is a multiple of {BLOCK}, got {ins}"
            ))
        }
    }

    /// The type of the side data of a weight `[out, ins]`: `f16 [out, ins / 32]`, or
    /// `f16 [out, ins / 32, 2]` (scale, minimum) for Q4_1.
    pub fn scales(self, out: Dim, ins: u64) -> TensorType {
        let mut dims = vec![out, Dim::Fixed(ins / BLOCK)];
        if self.scales_per_block() > 1 {
            dims.push(Dim::Fixed(self.scales_per_block()));
        }
        TensorType::new(DType::F16, Shape(dims))
    }
}

impl fmt::Display for IntFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name().to_uppercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_agree_with_the_dtypes() {
        for f in IntFormat::ALL {
            assert_eq!(IntFormat::of_codes(f.codes()), Some(f));
            // The GGUF block is its codes and its f16 side data.
            assert_eq!(
                f.codes().bytes_for(BLOCK) + 2 * f.scales_per_block(),
                f.block_bytes()
            );
        }
        assert_eq!(
            IntFormat::Q4_1.scales(Dim::Fixed(3), 64).shape,
            Shape(vec![Dim::Fixed(3), Dim::Fixed(2), Dim::Fixed(2)])
        );
        assert!(IntFormat::Q4_1.check_width(40).is_err());
        assert_eq!(IntFormat::Q4_1.to_string(), "Q4_1");
    }
}
