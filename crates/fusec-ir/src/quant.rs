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
//! | Q4_K   | `block_q4_K` | `u4`  | per super-block of 256, 16 bytes: `f16` `d`, `dmin`, 12 bytes of 6-bit sub-block scales `sc` and minimums `m` (`get_scale_min_k4`): `w = d * sc * q - dmin * m` | 4.5 |
//!
//! Nibble codes (`i4`, `u4`) pack two to a byte in each block of 32: byte `j` holds
//! element `j` in its low nibble and element `j + 16` in its high one
//! (`dequantize_row_q4_0`, `dequantize_row_q4_1` in ggml-quants.c). Q4_K's file order
//! (byte `l` of each 64 weights holding `l` and `l + 32`, `dequantize_row_q4_K`) is
//! rearranged into this one when a GGUF file is read, so `u4` has one meaning.
//!
//! Q4_K's side data is `u8 [out, ceil(in / 256), 16]`: the first 16 bytes of each
//! `block_q4_K`, as the file stores them. A row whose length is not a multiple of 256
//! ends in a short super-block holding its last `(in mod 256) / 32` sub-blocks, laid
//! out as the first sub-blocks of a whole one: fusec's extension, for float
//! checkpoints whose widths ggml would refuse (SmolLM2's 576); GGUF files never hold
//! such rows.

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
    /// 4-bit codes `n` in super-blocks of 256 with 6-bit sub-block scales and
    /// minimums, llama.cpp's Q4_K.
    Q4K,
}

/// Weights of a K-quant super-block (`QK_K` in ggml-common.h).
pub const SUPER_BLOCK: u64 = 256;

/// Bytes of Q4_K's side data per super-block: `d`, `dmin`, `scales[12]`.
pub const Q4K_SIDE_BYTES: u64 = 16;

impl IntFormat {
    pub const ALL: [IntFormat; 4] = [
        IntFormat::Q8_0,
        IntFormat::Q4_0,
        IntFormat::Q4_1,
        IntFormat::Q4K,
    ];

    /// ggml's name of the format (`q8_0`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            IntFormat::Q8_0 => "q8_0",
            IntFormat::Q4_0 => "q4_0",
            IntFormat::Q4_1 => "q4_1",
            IntFormat::Q4K => "q4_k",
        }
    }

    /// The dtype of the codes.
    pub const fn codes(self) -> DType {
        match self {
            IntFormat::Q8_0 => DType::I8,
            IntFormat::Q4_0 => DType::I4,
            IntFormat::Q4_1 | IntFormat::Q4K => DType::U4,
        }
    }

    /// The suffix of the codes' weight name (`W.q8_0`; the side data is `W.scale`).
    pub const fn suffix(self) -> &'static str {
        match self {
            IntFormat::Q8_0 => crate::step::Q8_0_SUFFIX,
            IntFormat::Q4_0 => crate::step::Q4_0_SUFFIX,
            IntFormat::Q4_1 => crate::step::Q4_1_SUFFIX,
            IntFormat::Q4K => crate::step::Q4_K_SUFFIX,
        }
    }

    /// Weights of one GGUF block: [`BLOCK`], or [`SUPER_BLOCK`] for Q4_K.
    pub const fn block_weights(self) -> u64 {
        match self {
            IntFormat::Q4K => SUPER_BLOCK,
            _ => BLOCK,
        }
    }

    /// Bytes of one GGUF block (`sizeof(block_q8_0)`, ...): its side data first, then
    /// its codes.
    pub const fn block_bytes(self) -> u64 {
        match self {
            IntFormat::Q8_0 => 34,
            IntFormat::Q4_0 => 18,
            IntFormat::Q4_1 => 20,
            IntFormat::Q4K => 144,
        }
    }

    /// Bytes of side data leading each GGUF block.
    pub const fn side_bytes(self) -> u64 {
        match self {
            IntFormat::Q4K => Q4K_SIDE_BYTES,
            f => 2 * f.scales_per_block(),
        }
    }

    /// `f16` values of side data per block of 32 of the block-of-32 formats: a scale,
    /// or a scale and a minimum (none for Q4_K, whose side data is bytes).
    pub const fn scales_per_block(self) -> u64 {
        match self {
            IntFormat::Q8_0 | IntFormat::Q4_0 => 1,
            IntFormat::Q4_1 => 2,
            IntFormat::Q4K => 0,
        }
    }

    /// The format of codes `codes` with side data of dtype `side`.
    pub fn of(codes: DType, side: DType) -> Option<IntFormat> {
        IntFormat::ALL
            .into_iter()
            .find(|f| f.codes() == codes && f.side_dtype() == side)
    }

    /// The dtype of the side data: `f16` values, or Q4_K's bytes.
    pub const fn side_dtype(self) -> DType {
        match self {
            IntFormat::Q4K => DType::U8,
            _ => DType::F16,
        }
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

    /// The type of the side data of a weight `[out, ins]`: `f16 [out, ins / 32]`,
    /// `f16 [out, ins / 32, 2]` (scale, minimum) for Q4_1, `u8 [out, ceil(ins / 256),
    /// 16]` for Q4_K.
    pub fn scales(self, out: Dim, ins: u64) -> TensorType {
        let dims = match self {
            IntFormat::Q4K => vec![
                out,
                Dim::Fixed(ins.div_ceil(SUPER_BLOCK)),
                Dim::Fixed(Q4K_SIDE_BYTES),
            ],
            IntFormat::Q4_1 => vec![out, Dim::Fixed(ins / BLOCK), Dim::Fixed(2)],
            IntFormat::Q8_0 | IntFormat::Q4_0 => vec![out, Dim::Fixed(ins / BLOCK)],
        };
        TensorType::new(self.side_dtype(), Shape(dims))
    }
}

/// Sub-block `j`'s 6-bit scale and minimum from a Q4_K super-block's 12 packed bytes,
/// as `get_scale_min_k4` (ggml-quants.c) unpacks them: sub-blocks 0..4 in the low six
/// bits of bytes `j` and `j + 4`, sub-blocks 4..8 in the nibbles of byte `j + 4` with
/// their top two bits in the high bits of bytes `j - 4` and `j`.
#[inline]
pub fn q4k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
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
            assert_eq!(IntFormat::of(f.codes(), f.side_dtype()), Some(f));
            // The GGUF block is its side data and its codes.
            assert_eq!(
                f.codes().bytes_for(f.block_weights()) + f.side_bytes(),
                f.block_bytes()
            );
        }
        // 4.5 bits per weight: 144 bytes per 256.
        let side = IntFormat::Q4K.scales(Dim::Fixed(1), 512);
        assert_eq!(side.dtype.bytes_for(32) + DType::U4.bytes_for(512), 288);
        // A short last super-block.
        assert_eq!(
            IntFormat::Q4K.scales(Dim::Fixed(2), 576).shape,
            Shape(vec![Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(16)])
        );
        assert_eq!(
            IntFormat::Q4_1.scales(Dim::Fixed(3), 64).shape,
            Shape(vec![Dim::Fixed(3), Dim::Fixed(2), Dim::Fixed(2)])
        );
        assert!(IntFormat::Q4_1.check_width(40).is_err());
        assert_eq!(IntFormat::Q4_1.to_string(), "Q4_1");
    }
}
