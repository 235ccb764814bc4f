//! GGUF checkpoints end to end on a hand-built file: the Hugging Face tiny fixture's
//! weights written as llama.cpp's converter writes them (its tensor names, q/k rows
//! permuted, a byte-level vocabulary and a chat template), run by `fusec run` exactly
//! as the safetensors checkpoint runs, in ids and in text; and bad files, tokenizers
//! and templates giving exit code 2 with a message naming what is at fault.

mod common;

use std::path::Path;

use common::tiny_gguf::{fixture, tiny_gguf};
use common::{fusec, scratch};
use fusec::gguf::Value;

fn run_json(args: &[&str], json: &Path) -> serde_json::Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--json", json.to_str().expect("utf-8")]);
    let out = fusec(&all);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).expect("json")).expect("json")
}

#[test]
fn a_gguf_checkpoint_decodes_exactly_as_its_safetensors() {
    let dir = scratch("gguf-ids");
    let gguf = tiny_gguf(&dir, |_| {});
    let g = gguf.to_str().expect("utf-8");
    let ids = ["--prompt-ids", "1,17,42,99,7", "--tokens", "16"];
    let from_gguf = run_json(
        &[&["run", g][..], &ids[..]].concat(),
        &dir.join("gguf.json"),
    );
    let fixture = fixture();
    let f = fixture.to_str().expect("utf-8");
    let from_st = run_json(&[&["run", f][..], &ids[..]].concat(), &dir.join("st.json"));
    assert_eq!(from_gguf["generated"], from_st["generated"]);
    // Bit-identical logits: the same f32 weights, whatever the file format.
    assert_eq!(from_gguf["logits"], from_st["logits"]);
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("expected.json")).expect("expected"),
    )
    .expect("json");
    assert_eq!(from_gguf["generated"], expected["generated"]);
}

#[test]
fn text_in_text_out_through_the_gguf_vocabulary_and_template() {
    let dir = scratch("gguf-text");
    let gguf = tiny_gguf(&dir, |_| {});
    let g = gguf.to_str().expect("utf-8");
    let text = run_json(
        &[
            "run",
            g,
            "--prompt",
            "hello",
            "--tokens",
            "6",
            "--ignore-eos",
        ],
        &dir.join("text.json"),
    );
    // One byte a token: the prompt's ids are its bytes.
    assert_eq!(text["prompt"], serde_json::json!([104, 101, 108, 108, 111]));
    let ids = run_json(
        &[
            "run",
            g,
            "--prompt-ids",
            "104,101,108,108,111",
            "--tokens",
            "6",
        ],
        &dir.join("ids.json"),
    );
    assert_eq!(
        text["generated"], ids["generated"],
        "greedy text run = ids run"
    );
    // The text prompt prefilled in one chunk (the default), in chunks of two plus a
    // token, and token by token: the same ids.
    for chunk in ["1", "2"] {
        let chunked = run_json(
            &[
                "run",
                g,
                "--prompt",
                "hello",
                "--tokens",
                "6",
                "--ignore-eos",
                "--prefill-chunk",
                chunk,
            ],
            &dir.join(format!("text-{chunk}.json")),
        );
        assert_eq!(
            chunked["generated"], text["generated"],
            "--prefill-chunk {chunk}"
        );
        assert!(chunked["ttft_ms"].as_f64().is_some_and(|t| t > 0.0));
    }
    let generated: Vec<u8> = text["generated"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|i| i.as_u64().expect("id") as u8)
        .collect();
    assert_eq!(
        text["text"].as_str().expect("text"),
        String::from_utf8_lossy(&generated),
        "the streamed text is the ids' bytes"
    );

    let chat = run_json(
        &[
            "run",
            g,
            "--chat",
            "--prompt",
            " hi ",
            "--tokens",
            "2",
            "--ignore-eos",
        ],
        &dir.join("chat.json"),
    );
    assert_eq!(chat["prompt_text"], "<user>hi\n<assistant>");
    let system = run_json(
        &[
            "run", g, "--chat", "--system", "be brief", "--prompt", "hi", "--tokens", "1",
        ],
        &dir.join("system.json"),
    );
    assert_eq!(
        system["prompt_text"],
        "<system>be brief\n<user>hi\n<assistant>"
    );

    // Sampling is deterministic for a seed.
    let sample = |seed: &str, name: &str| {
        run_json(
            &[
                "run",
                g,
                "--prompt",
                "hello",
                "--tokens",
                "8",
                "--ignore-eos",
                "--temperature",
                "1.5",
                "--top-k",
                "50",
                "--seed",
                seed,
            ],
            &dir.join(name),
        )["generated"]
            .clone()
    };
    assert_eq!(sample("3", "s1.json"), sample("3", "s2.json"));
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = fusec(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: expected {n:?} in: {stderr}");
    }
}

#[test]
fn bad_gguf_files_tokenizers_and_templates_exit_2_naming_the_fault() {
    let dir = scratch("gguf-bad");
    let good = tiny_gguf(&dir, |_| {});
    let bytes = std::fs::read(&good).expect("read");
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).expect("write");
    let c = cut.to_str().expect("utf-8");
    // The last tensor in the file (in name order) is cut short.
    let last = ["cut.gguf", "truncated or corrupt", "`output_norm.weight`"];
    fails_with(&["compile", c], &last);
    fails_with(&["run", c, "--prompt-ids", "1,2"], &last);

    let sub = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("dir");
        d
    };
    let unigram = tiny_gguf(&sub("unigram"), |w| {
        w.meta("tokenizer.ggml.model", Value::String("t5".into()));
    });
    fails_with(
        &["run", unigram.to_str().expect("utf-8"), "--prompt", "hi"],
        &["unsupported tokenizer", "`tokenizer.ggml.model` is `t5`"],
    );
    let raising = tiny_gguf(&sub("raise"), |w| {
        w.meta(
            "tokenizer.chat_template",
            Value::String("{{ raise_exception('no system role here') }}".into()),
        );
    });
    fails_with(
        &[
            "run",
            raising.to_str().expect("utf-8"),
            "--chat",
            "--prompt",
            "hi",
        ],
        &["chat template failed to render", "no system role here"],
    );
    let qwen = tiny_gguf(&sub("arch"), |w| {
        w.meta("general.architecture", Value::String("mamba".into()));
    });
    fails_with(
        &["compile", qwen.to_str().expect("utf-8")],
        &["unsupported GGUF architecture `mamba`"],
    );
    // Sampling options are for text runs; ids runs are greedy references.
    let out = fusec(&[
        "run",
        good.to_str().expect("utf-8"),
        "--prompt-ids",
        "1",
        "--temperature",
        "0.5",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fails_with(
        &[
            "run",
            good.to_str().expect("utf-8"),
            "--prompt",
            "hi",
            "--temperature",
            "0.5",
            "--top-p",
            "2",
        ],
        &["--top-p must be in [0, 1]"],
    );
    // A template-less checkpoint cannot --chat.
    fails_with(
        &[
            "run",
            fixture().to_str().expect("utf-8"),
            "--chat",
            "--prompt",
            "hi",
        ],
        &["no tokenizer found"],
    );
}
