//! A SentencePiece vocabulary in GGUF (`tokenizer.ggml.model` `llama`, scores and no
//! merges, as llama.cpp writes Llama 2's), written by gguf-py: encodings and decodings
//! equal transformers' (tests/fixtures/tiny-spm, made by
//! scripts/make_text_references.py).

use fusec_text::Tokenizer;

#[test]
fn sentencepiece_gguf_tokenizes_as_transformers() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny-spm");
    let path = std::path::Path::new(dir).join("tiny-spm.gguf");
    let tokenizer = Tokenizer::for_model(&path).expect("tokenizer");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(std::path::Path::new(dir).join("expected.json")).expect("read"),
    )
    .expect("json");
    let mut failures = Vec::new();
    for case in expected["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = case["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|i| i.as_u64().expect("id") as u32)
            .collect();
        let got = tokenizer.encode(text, true).expect("encodes");
        if got != want {
            failures.push(format!("{text:?}: {got:?} != {want:?}"));
        }
        let decoded = tokenizer.decode(&want, false).expect("decodes");
        if decoded != case["decoded"].as_str().expect("decoded") {
            failures.push(format!(
                "decode {text:?}: {decoded:?} != {}",
                case["decoded"]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(tokenizer.eos_ids(), &[2]);
}
