//! Every block type fusec reads, dequantized bit for bit as the `gguf` Python package
//! (llama.cpp's gguf-py) dequantizes random blocks (tests/fixtures/gguf-blocks.json,
//! made by scripts/make_text_references.py).

use fusec_gguf::dequant::dequantize;
use fusec_gguf::GgmlType;

fn ty(name: &str) -> GgmlType {
    match name {
        "Q4_0" => GgmlType::Q4_0,
        "Q4_1" => GgmlType::Q4_1,
        "Q8_0" => GgmlType::Q8_0,
        "Q4_K" => GgmlType::Q4_K,
        "Q5_K" => GgmlType::Q5_K,
        "Q6_K" => GgmlType::Q6_K,
        "F16" => GgmlType::F16,
        "BF16" => GgmlType::BF16,
        other => panic!("unexpected type {other}"),
    }
}

#[test]
fn random_blocks_dequantize_as_gguf_py() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/gguf-blocks.json"
    );
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
    let cases = fixture["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 8, "every type fusec reads but F32");
    for case in cases {
        let name = case["type"].as_str().expect("type");
        let hex = case["hex"].as_str().expect("hex");
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let want: Vec<f32> = case["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect();
        let mut got = vec![0.0f32; want.len()];
        dequantize(ty(name), &bytes, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} vs {w}");
        }
    }
}
