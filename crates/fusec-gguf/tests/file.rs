//! Hand-built GGUF files: read back exactly, and every truncation or corruption is an
//! error naming what is at fault, never a panic.

use fusec_gguf::{Error, GgmlType, GgufFile, GgufWriter, Value};
use half::f16;

fn sample() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("llama.block_count", Value::U32(2))
        .meta("llama.rope.freq_base", Value::F32(10000.0))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into()), Value::String("ü".into())]),
        )
        .meta(
            "tokenizer.ggml.scores",
            Value::Array(vec![Value::F32(0.5), Value::F32(-1.0)]),
        )
        .meta("general.size", Value::I64(-3));
    w.f32_tensor("norm.weight", &[3], &[1.0, -2.0, 0.25]);
    let halves: Vec<u8> = [0.5f32, -1.5, 2.0, 65504.0]
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
        .collect();
    w.tensor("proj.weight", &[2, 2], GgmlType::F16, halves);
    // One Q8_0 block: d = 0.5, q = -16..16.
    let mut q8 = f16::from_f32(0.5).to_bits().to_le_bytes().to_vec();
    q8.extend((-16i8..16).map(|q| q as u8));
    w.tensor("q8.weight", &[1, 32], GgmlType::Q8_0, q8);
    w
}

fn write(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).expect("write");
    (dir, path)
}

#[test]
fn reads_back_metadata_and_tensors() {
    let (_dir, path) = write(&sample().to_bytes());
    let f = GgufFile::open(&path).expect("opens");
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture().expect("arch"), "llama");
    assert_eq!(f.uint("llama.block_count").expect("u32"), Some(2));
    assert_eq!(f.float("llama.rope.freq_base").expect("f32"), Some(10000.0));
    assert_eq!(
        f.bool("tokenizer.ggml.add_bos_token").expect("bool"),
        Some(false)
    );
    assert_eq!(
        f.strings("tokenizer.ggml.tokens").expect("strings"),
        Some(vec!["a", "ü"])
    );
    assert_eq!(f.get("general.size"), Some(&Value::I64(-3)));
    assert!(matches!(
        f.uint("general.size"),
        Err(Error::WrongKeyType { ref key, .. }) if key == "general.size"
    ));
    assert_eq!(f.tensors().len(), 3);
    let (info, v) = f.dequantize("norm.weight").expect("f32");
    assert_eq!((info.shape(), v), (vec![3], vec![1.0, -2.0, 0.25]));
    let (info, v) = f.dequantize("proj.weight").expect("f16");
    assert_eq!(info.shape(), vec![2, 2]);
    assert_eq!(v, vec![0.5, -1.5, 2.0, 65504.0]);
    let (info, v) = f.dequantize("q8.weight").expect("q8_0");
    assert_eq!((info.shape(), info.ty), (vec![1, 32], GgmlType::Q8_0));
    assert_eq!(v, (-16..16).map(|q| q as f32 * 0.5).collect::<Vec<_>>());
}

#[test]
fn every_truncation_is_an_error_naming_its_place() {
    let bytes = sample().to_bytes();
    // The metadata and directory end before the data; cutting anywhere must fail
    // without a panic, and cutting inside the data must name the tensor cut off.
    let f = {
        let (_d, p) = write(&bytes);
        GgufFile::open(&p).expect("whole file opens")
    };
    let last = f.tensors().last().expect("tensors").name.clone();
    for len in 0..bytes.len() {
        let (_dir, path) = write(&bytes[..len]);
        let err = GgufFile::open(&path).expect_err("a truncated file is an error");
        let message = err.to_string();
        assert!(
            message.contains("truncated or corrupt") || matches!(err, Error::NotGguf { .. }),
            "cut at {len}: {message}"
        );
        assert!(message.contains("model.gguf"), "cut at {len}: {message}");
        if len + 1 == bytes.len() {
            assert!(message.contains(&format!("`{last}`")), "{message}");
        }
    }
}

#[test]
fn corrupt_headers_and_directories_are_named() {
    let good = sample().to_bytes();
    let open = |bytes: &[u8]| {
        let (_dir, path) = write(bytes);
        GgufFile::open(&path).expect_err("corrupt").to_string()
    };
    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGML");
    assert!(open(&bad).contains("not a GGUF file"));
    let mut bad = good.clone();
    bad[4] = 9;
    assert!(open(&bad).contains("GGUF version 9"));

    // A tensor of a type fusec does not read (Q2_K, id 10) is named with its type.
    let mut w = GgufWriter::new();
    w.tensor(
        "blk.0.attn_q.weight",
        &[1, 256],
        GgmlType::Q4_K,
        vec![0; 144],
    );
    let mut bytes = w.to_bytes();
    let at = bytes
        .windows(4)
        .rposition(|b| b == 12u32.to_le_bytes())
        .expect("type id");
    bytes[at..at + 4].copy_from_slice(&10u32.to_le_bytes());
    let message = open(&bytes);
    assert!(
        message.contains("`blk.0.attn_q.weight`") && message.contains("Q2_K"),
        "{message}"
    );

    // Rows that do not fill whole blocks.
    let mut w = GgufWriter::new();
    w.tensor("odd.weight", &[2, 16], GgmlType::Q8_0, vec![0; 34]);
    let message = open(&w.to_bytes());
    assert!(
        message.contains("`odd.weight`") && message.contains("blocks"),
        "{message}"
    );

    // An array claiming more items than the file holds.
    let mut w = GgufWriter::new();
    w.meta("tokenizer.ggml.tokens", Value::Array(vec![Value::U8(1)]));
    let mut bytes = w.to_bytes();
    // Header (24 bytes), key (8 + 21), value type (4), item type (4), then the length.
    let len_at = 24 + 8 + "tokenizer.ggml.tokens".len() + 4 + 4;
    bytes[len_at..len_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let message = open(&bytes);
    assert!(message.contains("`tokenizer.ggml.tokens`"), "{message}");
}
