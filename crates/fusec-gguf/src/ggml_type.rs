//! The ggml tensor types fusec reads, with their block layouts (`enum ggml_type` in
//! ggml's `ggml.h`; block structs in `ggml/src/ggml-common.h`).

/// Weights per block of the 32-weight formats (`QK4_0`, `QK4_1`, `QK8_0`).
pub const QK: usize = 32;
/// Weights per super-block of the k-quants (`QK_K`).
pub const QK_K: usize = 256;
/// Bytes of the packed 6-bit scales and mins of Q4_K and Q5_K (`K_SCALE_SIZE`).
pub const K_SCALE_SIZE: usize = 12;

/// A tensor element type that fusec reads, named as ggml names it.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    /// The type of a `ggml_type` id, or `Err` with the id's name when fusec does not
    /// read it.
    pub fn from_id(id: u32) -> Result<GgmlType, &'static str> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            other => return Err(unsupported_name(other)),
        })
    }

    /// The `ggml_type` id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Weights per block (1 for the plain float types).
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => QK,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block: the `sizeof` of ggml-common.h's `block_*` structs.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            // block_q4_0: ggml_half d; uint8_t qs[QK4_0 / 2].
            GgmlType::Q4_0 => 2 + QK / 2,
            // block_q4_1: ggml_half d, m; uint8_t qs[QK4_1 / 2].
            GgmlType::Q4_1 => 4 + QK / 2,
            // block_q8_0: ggml_half d; int8_t qs[QK8_0].
            GgmlType::Q8_0 => 2 + QK,
            // block_q4_K: ggml_half d, dmin; uint8_t scales[K_SCALE_SIZE], qs[QK_K / 2].
            GgmlType::Q4_K => 4 + K_SCALE_SIZE + QK_K / 2,
            // block_q5_K: d, dmin; scales[K_SCALE_SIZE]; qh[QK_K / 8]; qs[QK_K / 2].
            GgmlType::Q5_K => 4 + K_SCALE_SIZE + QK_K / 8 + QK_K / 2,
            // block_q6_K: uint8_t ql[QK_K / 2], qh[QK_K / 4]; int8_t scales[QK_K / 16];
            // ggml_half d.
            GgmlType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Bytes of `elements` weights, or `None` when they do not fill whole blocks or
    /// their size does not fit in 64 bits.
    pub fn bytes_of(self, elements: u64) -> Option<u64> {
        let block = self.block_len() as u64;
        if !elements.is_multiple_of(block) {
            return None;
        }
        (elements / block).checked_mul(self.block_bytes() as u64)
    }
}

/// The name of a `ggml_type` id fusec does not read, for messages.
fn unsupported_name(id: u32) -> &'static str {
    match id {
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::GgmlType;

    /// A tensor's size in bytes: whole blocks only, and `None` rather than a wrapped
    /// count when it does not fit in 64 bits (found by the GGUF fuzz target).
    #[test]
    fn bytes_of_counts_whole_blocks_without_overflow() {
        assert_eq!(GgmlType::Q8_0.bytes_of(64), Some(2 * 34));
        assert_eq!(GgmlType::Q8_0.bytes_of(33), None);
        assert_eq!(GgmlType::F32.bytes_of(1 << 62), None);
        assert_eq!(GgmlType::F32.bytes_of(1 << 61), Some(1 << 63));
    }
}
