//! Element types of tensors.

use std::fmt;
use std::str::FromStr;

/// The element type of a tensor value.
///
/// The set is closed: it is what a Llama decode step needs in full precision (`f32`),
/// in the half formats (`f16`, `bf16`), in the two OCP FP8 formats, `i32` for token
/// ids and positions, and the integer codes of block-quantized weights: `i8` (the
/// values of llama.cpp's Q8_0 blocks), `i4` (4-bit codes `n - 8` for a nibble `n`,
/// Q4_0's) and `u4` (4-bit codes `n` for a nibble `n`, Q4_1's, which a per-block
/// minimum offsets), and `u8`, raw bytes: the packed side data of a K-quant
/// super-block (its `f16` scales and 6-bit sub-block scales and minimums). Integer
/// codes are only ever the values operand of a `dequant`, whose scales say what they
/// stand for ([`crate::quant::IntFormat`]).
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
    Fp8E4M3,
    Fp8E5M2,
    I32,
    I8,
    I4,
    U4,
    U8,
}

impl DType {
    /// Every dtype, in a fixed order (used by parsers and tests).
    pub const ALL: [DType; 10] = [
        DType::F32,
        DType::F16,
        DType::Bf16,
        DType::Fp8E4M3,
        DType::Fp8E5M2,
        DType::I32,
        DType::I8,
        DType::I4,
        DType::U4,
        DType::U8,
    ];

    /// Bits per element.
    pub const fn size_bits(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 32,
            DType::F16 | DType::Bf16 => 16,
            DType::Fp8E4M3 | DType::Fp8E5M2 | DType::I8 | DType::U8 => 8,
            DType::I4 | DType::U4 => 4,
        }
    }

    /// Bytes per element, rounded up to a whole byte (`i4` and `u4` pack two elements in one:
    /// count the bytes of several elements with [`DType::bytes_for`]).
    pub const fn size_bytes(self) -> u64 {
        self.size_bits().div_ceil(8)
    }

    /// Bytes `n` elements occupy, packed (`i4` and `u4` two to a byte), saturating.
    pub const fn bytes_for(self, n: u64) -> u64 {
        n.saturating_mul(self.size_bits()).div_ceil(8)
    }

    /// The canonical name used in the text IR and in configuration files.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::Fp8E4M3 => "fp8e4m3",
            DType::Fp8E5M2 => "fp8e5m2",
            DType::I32 => "i32",
            DType::I8 => "i8",
            DType::I4 => "i4",
            DType::U4 => "u4",
            DType::U8 => "u8",
        }
    }

    pub const fn is_float(self) -> bool {
        !matches!(
            self,
            DType::I32 | DType::I8 | DType::I4 | DType::U4 | DType::U8
        )
    }

    /// Whether this is the dtype of the integer codes of a block-quantized weight.
    pub const fn is_int_codes(self) -> bool {
        matches!(self, DType::I8 | DType::I4 | DType::U4)
    }

    /// Whether the codes are packed two to a byte (`i4`, `u4`).
    pub const fn is_nibbles(self) -> bool {
        matches!(self, DType::I4 | DType::U4)
    }

    pub const fn is_fp8(self) -> bool {
        matches!(self, DType::Fp8E4M3 | DType::Fp8E5M2)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error for a dtype name that is not one of [`DType::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown dtype `{0}` (expected one of f32, f16, bf16, fp8e4m3, fp8e5m2, i32, i8, i4, u4, u8)"
)]
pub struct UnknownDType(pub String);

impl FromStr for DType {
    type Err = UnknownDType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| UnknownDType(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>(), Ok(d));
        }
        assert!("float32".parse::<DType>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(DType::F32.size_bytes(), 4);
        assert_eq!(DType::Bf16.size_bytes(), 2);
        assert_eq!(DType::Fp8E4M3.size_bytes(), 1);
        assert_eq!(DType::I32.size_bytes(), 4);
        assert_eq!(DType::I8.bytes_for(32), 32);
        assert_eq!(DType::I4.bytes_for(32), 16);
        assert_eq!(DType::I4.bytes_for(3), 2);
        assert!(!DType::I4.is_float() && DType::I4.is_int_codes());
        assert_eq!(DType::U4.bytes_for(32), 16);
        assert!(!DType::U4.is_float() && DType::U4.is_int_codes() && DType::U4.is_nibbles());
    }
}
