//! One weight's values: a dtype, a row-major shape and a shared buffer, read as an
//! `ndarray` view.
//!
//! Float weights are held as `f32` values already rounded to their dtype (what
//! `torch_dtype` gives when a checkpoint loads), or compactly in the bits of their
//! dtype: `u16` for `f16` and `bf16`, `u8` for FP8 E4M3 and for the integer codes of
//! block-quantized weights (`i8` one per byte; `i4` and `u4` two per byte in GGUF's
//! Q4_0 and Q4_1 order, see [`nibble_code`]). The buffer is an
//! `Arc<Vec<_>>` so that the executor binds a weight into its own tensors by sharing
//! it, without a copy.

use std::sync::Arc;

use fusec_ir::DType;
use ndarray::{ArrayD, ArrayViewD, IxDyn};

use crate::error::Error;
use crate::rounding;

/// The buffer a [`WeightTensor`] holds.
#[derive(Clone, Debug)]
pub enum Storage {
    /// Values rounded to the tensor's dtype, as `f32`.
    F32(Arc<Vec<f32>>),
    /// The bits of `f16` or `bf16` values (which one is the tensor's dtype).
    U16(Arc<Vec<u16>>),
    /// FP8 E4M3 codes, `i8` codes (two's complement) or packed `i4`/`u4` codes.
    U8(Arc<Vec<u8>>),
}

impl Storage {
    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(b) => b.len(),
            Storage::U16(b) => b.len(),
            Storage::U8(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A dense, row-major weight of one float dtype; cloning shares the buffer.
#[derive(Clone, Debug)]
pub struct WeightTensor {
    dtype: DType,
    shape: Vec<usize>,
    storage: Storage,
}

/// Elements of `dtype` along one block of packed `i4` or `u4` codes
/// ([`fusec_ir::quant::BLOCK`]).
pub const I4_BLOCK: usize = fusec_ir::quant::BLOCK as usize;

/// The nibble at index `i` of a packed buffer, in GGUF's Q4_0 and Q4_1 block order
/// (`dequantize_row_q4_0`, `dequantize_row_q4_1` in ggml-quants.c): in each block of
/// 32 elements, byte `j` holds element `j` in its low nibble and element `j + 16` in
/// its high one.
#[inline]
pub fn nibble(packed: &[u8], i: usize) -> u8 {
    let (block, k) = (i / I4_BLOCK, i % I4_BLOCK);
    let byte = packed[block * (I4_BLOCK / 2) + k % 16];
    if k < 16 {
        byte & 0x0F
    } else {
        byte >> 4
    }
}

/// The `i4` code at index `i` of a packed buffer: its [`nibble`] `n` is the code
/// `n - 8` (Q4_0).
#[inline]
pub fn i4_code(packed: &[u8], i: usize) -> i8 {
    nibble(packed, i) as i8 - 8
}

/// The code at index `i` of packed nibble codes of `dtype`: `n - 8` for `i4`, `n` for
/// `u4` (Q4_1).
#[inline]
pub fn nibble_code(dtype: DType, packed: &[u8], i: usize) -> i8 {
    match dtype {
        DType::U4 => nibble(packed, i) as i8,
        _ => i4_code(packed, i),
    }
}

/// Stored elements of a buffer holding `numel` values of `dtype`.
pub fn stored_len(dtype: DType, numel: usize) -> usize {
    if dtype.is_nibbles() {
        numel.div_ceil(2)
    } else {
        numel
    }
}

fn check_len(shape: &[usize], len: usize) -> Result<(), Error> {
    if shape.iter().product::<usize>() == len {
        Ok(())
    } else {
        Err(Error::Length {
            shape: shape.to_vec(),
            len,
        })
    }
}

impl WeightTensor {
    /// A weight of `dtype` from row-major `f32` values, rounded to `dtype`.
    pub fn from_f32(dtype: DType, shape: &[usize], mut data: Vec<f32>) -> Result<Self, Error> {
        if !dtype.is_float() {
            return Err(Error::Storage {
                dtype,
                what: "f32 storage",
            });
        }
        check_len(shape, data.len())?;
        rounding::round_slice(dtype, &mut data);
        Ok(WeightTensor {
            dtype,
            shape: shape.to_vec(),
            storage: Storage::F32(Arc::new(data)),
        })
    }

    /// A weight of `dtype` from an array (any layout; read in logical order), rounded
    /// to `dtype`.
    pub fn from_array(dtype: DType, array: ArrayD<f32>) -> Result<Self, Error> {
        let shape = array.shape().to_vec();
        let n = array.len();
        let data = if array.is_standard_layout() {
            // Dense from the offset on: drop what lies before it and after the last.
            let (mut data, offset) = array.into_raw_vec_and_offset();
            data.drain(..offset.unwrap_or(0));
            data.truncate(n);
            data
        } else {
            array.iter().copied().collect()
        };
        WeightTensor::from_f32(dtype, &shape, data)
    }

    /// A weight stored compactly: `f16` or `bf16` bits, or E4M3 codes, per `storage`.
    pub fn from_storage(dtype: DType, shape: &[usize], storage: Storage) -> Result<Self, Error> {
        let fits = match &storage {
            Storage::F32(_) => dtype.is_float(),
            Storage::U16(_) => matches!(dtype, DType::F16 | DType::Bf16),
            Storage::U8(_) => matches!(dtype, DType::Fp8E4M3 | DType::U8) || dtype.is_int_codes(),
        };
        if !fits {
            return Err(Error::Storage {
                dtype,
                what: "this storage",
            });
        }
        let numel: usize = shape.iter().product();
        if dtype.is_nibbles() && !numel.is_multiple_of(I4_BLOCK) {
            return Err(Error::Storage {
                dtype,
                what: "a count of elements that is not whole blocks of 32",
            });
        }
        if stored_len(dtype, numel) != storage.len() {
            return Err(Error::Length {
                shape: shape.to_vec(),
                len: storage.len(),
            });
        }
        Ok(WeightTensor {
            dtype,
            shape: shape.to_vec(),
            storage,
        })
    }

    /// A rank-0 `f32` weight (a scale).
    pub fn scalar(value: f32) -> WeightTensor {
        WeightTensor {
            dtype: DType::F32,
            shape: Vec::new(),
            storage: Storage::F32(Arc::new(vec![value])),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The shared buffer, for a consumer that binds it without a copy.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The values as an array view, when they are held as `f32`.
    pub fn view(&self) -> Option<ArrayViewD<'_, f32>> {
        match &self.storage {
            Storage::F32(b) => ArrayViewD::from_shape(IxDyn(&self.shape), b.as_slice()).ok(),
            Storage::U16(_) | Storage::U8(_) => None,
        }
    }

    /// The values as an `f32` array, decoded from compact storage.
    pub fn to_array(&self) -> ArrayD<f32> {
        let values = self.to_vec_f32();
        // The length is the shape's element count by construction.
        ArrayD::from_shape_vec(IxDyn(&self.shape), values)
            .unwrap_or_else(|_| ArrayD::zeros(IxDyn(&[0])))
    }

    /// The values in row-major order as `f32`.
    pub fn to_vec_f32(&self) -> Vec<f32> {
        match &self.storage {
            Storage::F32(b) => b.to_vec(),
            Storage::U16(b) => b
                .iter()
                .map(|&v| rounding::from_u16_bits(self.dtype, v))
                .collect(),
            Storage::U8(b) => match self.dtype {
                DType::I8 => b.iter().map(|&v| f32::from(v as i8)).collect(),
                DType::U8 => b.iter().map(|&v| f32::from(v)).collect(),
                DType::I4 | DType::U4 => (0..self.numel())
                    .map(|i| f32::from(nibble_code(self.dtype, b, i)))
                    .collect(),
                _ => b.iter().map(|&v| rounding::e4m3_value(v)).collect(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_rounded_and_viewed_as_arrays() {
        let w = WeightTensor::from_f32(DType::Fp8E4M3, &[1, 2], vec![0.3, 1e4]).expect("fits");
        assert_eq!(w.to_vec_f32(), [0.3125, 448.0]);
        let v = w.view().expect("f32 storage");
        assert_eq!(v.shape(), &[1, 2]);
        assert_eq!(v[[0, 1]], 448.0);
        assert!(WeightTensor::from_f32(DType::F32, &[2, 2], vec![0.0; 3]).is_err());
        assert!(WeightTensor::from_f32(DType::I32, &[1], vec![0.0]).is_err());
        let t = ndarray::array![[1.0f32, 2.0], [3.0, 4.0]]
            .reversed_axes()
            .into_dyn();
        let w = WeightTensor::from_array(DType::F32, t).expect("fits");
        assert_eq!(w.to_vec_f32(), [1.0, 3.0, 2.0, 4.0]);
    }

    #[test]
    fn compact_storage_decodes() {
        let codes = Storage::U8(Arc::new(vec![0x38, 0xb8]));
        let w = WeightTensor::from_storage(DType::Fp8E4M3, &[2], codes).expect("fits");
        assert_eq!(w.to_array().as_slice(), Some(&[1.0f32, -1.0][..]));
        assert!(w.view().is_none());
        let bits = Storage::U16(Arc::new(vec![0x3f80]));
        assert!(WeightTensor::from_storage(DType::Fp8E4M3, &[1], bits.clone()).is_err());
        let w = WeightTensor::from_storage(DType::Bf16, &[1], bits).expect("fits");
        assert_eq!(w.to_vec_f32(), [1.0]);
        let codes = Storage::U8(Arc::new(vec![0x80, 0x7f]));
        let w = WeightTensor::from_storage(DType::I8, &[2], codes).expect("fits");
        assert_eq!(w.to_vec_f32(), [-128.0, 127.0]);
        // Byte j of a Q4_0 block: element j low, element j + 16 high, nibble - 8.
        let mut packed = vec![0x88u8; 16];
        packed[0] = 0xf0;
        packed[15] = 0x1e;
        let w = WeightTensor::from_storage(DType::I4, &[32], Storage::U8(Arc::new(packed)))
            .expect("fits");
        let v = w.to_vec_f32();
        assert_eq!(
            (v[0], v[16], v[15], v[31], v[1]),
            (-8.0, 7.0, 6.0, -7.0, 0.0)
        );
        let short = Storage::U8(Arc::new(vec![0u8; 8]));
        assert!(WeightTensor::from_storage(DType::I4, &[16], short).is_err());
    }
}
