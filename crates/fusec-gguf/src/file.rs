//! The GGUF container (ggml's `docs/gguf.md`): a little-endian header (magic `GGUF`,
//! version, tensor count, metadata count), typed key/value metadata, the tensor
//! directory (name, dimensions innermost first, type, offset into the data section),
//! then the data section at the next multiple of `general.alignment` (default 32).
//!
//! [`GgufFile::open`] maps the file and checks everything it will later hand out: the
//! header, every metadata value, and that each tensor's bytes, by its type and
//! dimensions, lie whole inside the file. A truncated or corrupt file is an error that
//! names the key or tensor where it goes wrong.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::dequant;
use crate::error::Error;
use crate::ggml_type::GgmlType;
use crate::value::Value;

/// `general.alignment` when the file does not set it (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// One tensor of the directory.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions innermost first, as ggml's `ne` (a `[rows, cols]` matrix is `[cols,
    /// rows]`).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the first byte in the file.
    offset: u64,
    bytes: u64,
}

impl TensorInfo {
    /// The shape outermost first, as PyTorch and safetensors write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A memory-mapped GGUF file, its metadata and tensor directory checked.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
}

/// Maps `file` read-only.
///
/// Mapping is `unsafe` because another process could truncate or rewrite the file while
/// it is mapped. The bytes are only ever read as plain integers and floats, and every
/// range handed out was checked against the length at open; checkpoints are not
/// rewritten in place while a model loads.
#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: see the function documentation: read-only, bounds checked at open.
    unsafe { memmap2::Mmap::map(file) }
}

impl GgufFile {
    /// Opens and checks the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<GgufFile, Error> {
        let io = |source| Error::Io {
            file: path.to_path_buf(),
            source,
        };
        let handle = File::open(path).map_err(io)?;
        let map = map_file(&handle).map_err(io)?;
        let parsed = parse(path, &map)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Every metadata key and value, by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// `general.architecture`, which every GGUF model file has.
    pub fn architecture(&self) -> Result<&str, Error> {
        self.string("general.architecture")?
            .ok_or_else(|| Error::MissingKey {
                file: self.path.clone(),
                key: "general.architecture".into(),
            })
    }

    fn wrong(&self, key: &str, expected: &'static str, found: &Value) -> Error {
        Error::WrongKeyType {
            file: self.path.clone(),
            key: key.to_string(),
            expected,
            found: found.type_name(),
        }
    }

    /// A string key, if present; an error if present with another type.
    pub fn string(&self, key: &str) -> Result<Option<&str>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }

    /// A non-negative integer key, if present.
    pub fn uint(&self, key: &str) -> Result<Option<u64>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    /// A float key (integers widen), if present.
    pub fn float(&self, key: &str) -> Result<Option<f64>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    /// A boolean key, if present.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a bool", v)),
        }
    }

    /// An array of strings, if present.
    pub fn strings(&self, key: &str) -> Result<Option<Vec<&str>>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .and_then(|items| items.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "an array of strings", v)),
        }
    }

    /// An array of integers, if present.
    pub fn ints(&self, key: &str) -> Result<Option<Vec<i64>>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .and_then(|items| items.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "an array of integers", v)),
        }
    }

    /// The tensor directory, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor of this file (in bounds: checked at open).
    pub fn bytes(&self, tensor: &TensorInfo) -> &[u8] {
        &self.map[tensor.offset as usize..(tensor.offset + tensor.bytes) as usize]
    }

    /// The tensor `name` dequantized to `f32`, in ggml's order (innermost dimension
    /// fastest, which is row-major over [`TensorInfo::shape`]).
    pub fn dequantize(&self, name: &str) -> Result<(TensorInfo, Vec<f32>), Error> {
        let info = self.tensor(name).ok_or_else(|| Error::MissingTensor {
            file: self.path.clone(),
            tensor: name.to_string(),
        })?;
        let mut out = vec![0.0f32; info.elements() as usize];
        dequant::dequantize(info.ty, self.bytes(info), &mut out);
        Ok((info.clone(), out))
    }
}

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
}

/// A cursor over the file's bytes whose reads fail, rather than panic, past the end.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "{n} bytes needed at offset {}, the file has {}",
                    self.at,
                    self.bytes.len()
                )
            })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("a string is not UTF-8: {e}"))
    }

    /// A value of `gguf_metadata_value_type` `ty`.
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("a bool is {b}, expected 0 or 1")),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth > 0 {
                    return Err("nested arrays are not supported".into());
                }
                let item_ty = self.u32()?;
                let len = self.u64()?;
                // Every item takes at least one byte: a length beyond the rest of the
                // file is corrupt, and must not reserve memory for it.
                let left = (self.bytes.len() - self.at) as u64;
                if len > left {
                    return Err(format!("an array of {len} items in {left} bytes"));
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed, Error> {
    let corrupt = |what: String| {
        move |message: String| Error::Corrupt {
            file: path.to_path_buf(),
            what: what.clone(),
            message,
        }
    };
    let mut c = Cursor { bytes, at: 0 };
    let magic: [u8; 4] = c.array().map_err(corrupt("the header".into()))?;
    if &magic != b"GGUF" {
        return Err(Error::NotGguf {
            file: path.to_path_buf(),
            found: magic,
        });
    }
    let version = c.u32().map_err(corrupt("the header".into()))?;
    if !(2..=3).contains(&version) {
        return Err(Error::Version {
            file: path.to_path_buf(),
            version,
        });
    }
    let tensor_count = c.u64().map_err(corrupt("the header".into()))?;
    let kv_count = c.u64().map_err(corrupt("the header".into()))?;

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = c
            .string()
            .map_err(corrupt(format!("the key of metadata entry {i}")))?;
        let value = c
            .u32()
            .and_then(|ty| c.value(ty, 0))
            .map_err(corrupt(format!("metadata key `{key}`")))?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| {
            corrupt("metadata key `general.alignment`".into())(format!(
                "{v:?} is not a power of two"
            ))
        })?,
    };

    let mut infos = Vec::new();
    for i in 0..tensor_count {
        let name = c
            .string()
            .map_err(corrupt(format!("the name of tensor {i}")))?;
        let tensor_err = |message: String| Error::CorruptTensor {
            file: path.to_path_buf(),
            tensor: name.clone(),
            message,
        };
        let n_dims = c.u32().map_err(tensor_err)?;
        if n_dims == 0 || n_dims > 4 {
            return Err(tensor_err(format!("{n_dims} dimensions (ggml has 1 to 4)")));
        }
        let dims = (0..n_dims)
            .map(|_| c.u64())
            .collect::<Result<Vec<u64>, String>>()
            .map_err(tensor_err)?;
        let type_id = c.u32().map_err(tensor_err)?;
        let offset = c.u64().map_err(tensor_err)?;
        let ty = GgmlType::from_id(type_id).map_err(|name_of| Error::UnsupportedType {
            file: path.to_path_buf(),
            tensor: name.clone(),
            type_id,
            name: name_of,
        })?;
        infos.push((name, dims, ty, offset));
    }
    let data_start = (c.at as u64).div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;

    let mut tensors = Vec::with_capacity(infos.len());
    for (name, dims, ty, offset) in infos {
        let tensor_err = |message: String| Error::CorruptTensor {
            file: path.to_path_buf(),
            tensor: name.clone(),
            message,
        };
        let elements = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| tensor_err(format!("dimensions {dims:?} overflow")))?;
        let bytes = ty.bytes_of(elements).ok_or_else(|| {
            tensor_err(format!(
                "{elements} weights do not fill whole {} blocks of {}, or take more than \
                 2^64 bytes",
                ty.name(),
                ty.block_len()
            ))
        })?;
        if !dims[0].is_multiple_of(ty.block_len() as u64) {
            return Err(tensor_err(format!(
                "rows of {} weights do not fill whole {} blocks of {}",
                dims[0],
                ty.name(),
                ty.block_len()
            )));
        }
        if !offset.is_multiple_of(alignment) {
            return Err(tensor_err(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let start = data_start
            .checked_add(offset)
            .filter(|s| s.checked_add(bytes).is_some_and(|e| e <= file_len))
            .ok_or_else(|| {
                tensor_err(format!(
                    "its {bytes} bytes at data offset {offset} end past the end of the file ({} bytes)",
                    c.bytes.len()
                ))
            })?;
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset: start,
            bytes,
        });
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
    })
}
