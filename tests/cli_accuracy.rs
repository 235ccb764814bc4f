//! `fusec accuracy` end to end: each precision against the f32 run over several
//! prompts, teacher-forced, agreeing prompt by prompt with `fusec run --compare`; text
//! prompts through the checkpoint's tokenizer (a file's, or the built-in ones); a
//! precision the model cannot take skipped with its reason; bad options exit 2.

mod common;

use std::path::{Path, PathBuf};

use common::{fusec, root, scratch};
use serde_json::Value;

fn fixture() -> String {
    root()
        .join("tests/fixtures/hf-tiny-llama-s0")
        .display()
        .to_string()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("written")).expect("JSON")
}

fn ok(args: &[&str]) -> std::process::Output {
    let out = fusec(args);
    assert!(
        out.status.success(),
        "fusec {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The precision's figures in the report.
fn figures<'a>(report: &'a Value, precision: &str) -> &'a Value {
    report["precisions"]
        .as_array()
        .expect("a list")
        .iter()
        .find(|p| p["precision"] == precision)
        .unwrap_or_else(|| panic!("{precision} in {report}"))
}

/// The tiny example with an MLP width of 128 (whole blocks of 32, so that the integer
/// formats apply) and seeded random weights.
fn blocky_model(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("examples/tiny.toml")).expect("example");
    let text = text
        .replace("intermediate_size = 176", "intermediate_size = 128")
        .replace(
            "[weights]\npath = \"../tests/fixtures/hf-tiny-llama-s0\"",
            "",
        );
    let path = dir.join("model.toml");
    std::fs::write(&path, text).expect("writes");
    path
}

#[test]
fn each_precision_over_the_prompts_agrees_with_run_compare() {
    let dir = scratch("accuracy-fixture");
    let json = dir.join("accuracy.json");
    let prompts = ["1,17,42,99,7", "5,9,33"];
    ok(&[
        "accuracy",
        &fixture(),
        "--prompt-ids",
        prompts[0],
        "--prompt-ids",
        prompts[1],
        "--precisions",
        "bf16,fp8,int8",
        "--tokens",
        "6",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    let report = read_json(&json);
    assert_eq!(report["schema"], "fusec-accuracy/1");
    assert_eq!(report["prompts"][1], serde_json::json!([5, 9, 33]));
    for precision in ["bf16", "fp8"] {
        let f = figures(&report, precision);
        assert_eq!(f["steps"], 12, "{f}");
        assert!(f["top1_agreement"].as_u64().expect("count") <= 12);
        let per: Vec<f64> = f["prompts"]
            .as_array()
            .expect("per prompt")
            .iter()
            .map(|a| a["mean_kl"].as_f64().expect("a number"))
            .collect();
        let mean = f["mean_kl"].as_f64().expect("a number");
        assert!((mean - (per[0] + per[1]) / 2.0).abs() < 1e-12, "{f}");
        // Each prompt's figure is what `fusec run --compare` reports for it alone.
        for (prompt, kl) in prompts.iter().zip(&per) {
            let one = dir.join(format!("run-{precision}-{}.json", prompt.len()));
            ok(&[
                "run",
                &fixture(),
                "--prompt-ids",
                prompt,
                "--tokens",
                "6",
                "--precision",
                precision,
                "--compare",
                "--json",
                one.to_str().expect("utf-8"),
            ]);
            let run = read_json(&one);
            assert_eq!(
                run["accuracy"]["mean_kl"].as_f64(),
                Some(*kl),
                "{precision}, prompt {prompt}"
            );
        }
    }
    // bf16 costs far less than FP8 on this model.
    let kl = |p| figures(&report, p)["mean_kl"].as_f64().expect("a number");
    assert!(kl("bf16") * 10.0 < kl("fp8"), "{report}");
    // The fixture's MLP width (176) is no whole number of blocks: int8 is skipped.
    let int8 = figures(&report, "int8");
    assert!(
        int8["skipped"]
            .as_str()
            .is_some_and(|s| s.contains("multiple of 32")),
        "{int8}"
    );
}

#[test]
fn integer_formats_are_measured_where_the_widths_are_whole_blocks() {
    let dir = scratch("accuracy-blocky");
    let model = blocky_model(&dir);
    let json = dir.join("accuracy.json");
    ok(&[
        "accuracy",
        model.to_str().expect("utf-8"),
        "--prompt-ids",
        "1,17,42",
        "--precisions",
        "int8,int4",
        "--tokens",
        "4",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    let report = read_json(&json);
    let kl = |p| figures(&report, p)["mean_kl"].as_f64().expect("measured");
    // Four bits cost more than eight.
    assert!(kl("int8") < kl("int4"), "{report}");
    assert!(figures(&report, "int8").get("skipped").is_none());
}

#[test]
fn text_prompts_go_through_the_tokenizer() {
    let dir = scratch("accuracy-text");
    let model = root().join("examples/tiny-chat/model.toml");
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "# two prompts\nthe cat is\n\nhello world\n").expect("writes");
    let json = dir.join("file.json");
    ok(&[
        "accuracy",
        model.to_str().expect("utf-8"),
        "--prompts",
        prompts.to_str().expect("utf-8"),
        "--precisions",
        "bf16",
        "--tokens",
        "3",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    let report = read_json(&json);
    assert_eq!(report["prompts"].as_array().map(Vec::len), Some(2));
    // The built-in prompts: the lines of examples/accuracy-prompts.txt.
    let builtin = std::fs::read_to_string(root().join("examples/accuracy-prompts.txt"))
        .expect("the prompts")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .count();
    let json = dir.join("builtin.json");
    ok(&[
        "accuracy",
        model.to_str().expect("utf-8"),
        "--precisions",
        "bf16",
        "--tokens",
        "2",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    let report = read_json(&json);
    assert_eq!(report["prompts"].as_array().map(Vec::len), Some(builtin));
    assert_eq!(figures(&report, "bf16")["steps"], 2 * builtin as u64);
}

#[test]
fn bad_options_exit_2_naming_what_is_wrong() {
    let dir = scratch("accuracy-bad");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "# nothing\n\n").expect("writes");
    let chat = root().join("examples/tiny-chat/model.toml");
    let chat = chat.to_str().expect("utf-8");
    let fixture = fixture();
    let fixture = fixture.as_str();
    let cases: [(Vec<&str>, &str); 6] = [
        (
            vec![fixture, "--prompt-ids", "1,2", "--precisions", "bf16,f64"],
            "unknown precision `f64`",
        ),
        (
            vec![fixture, "--prompt-ids", "1,2", "--precisions", "f32"],
            "f32 is the reference",
        ),
        (vec![fixture, "--prompt-ids", "1,x"], "--prompt-ids 1"),
        (vec![fixture, "--prompt-ids", "1,9999"], "out of range"),
        (vec![fixture], "tokenizer"),
        (
            vec![chat, "--prompts", empty.to_str().expect("utf-8")],
            "no prompts",
        ),
    ];
    for (args, message) in cases {
        let mut all = vec!["accuracy"];
        all.extend(args);
        let out = fusec(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {stderr}");
        assert!(stderr.contains(message), "{all:?}: {stderr}");
    }
    // A model too large for the memory allowed, and a run past the context.
    let big = root().join("examples/llama-3-8b.toml");
    let big = big.to_str().expect("utf-8");
    for (args, message) in [
        (
            vec!["accuracy", big, "--prompt-ids", "1,2", "--max-memory", "2G"],
            "--max-memory",
        ),
        (
            vec![
                "accuracy",
                fixture,
                "--prompt-ids",
                "1,2",
                "--tokens",
                "18446744073709551615",
            ],
            "beyond max_seq_len",
        ),
    ] {
        let out = fusec(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    // Only precisions the model cannot take: nothing measured is an error too.
    let out = fusec(&[
        "accuracy",
        fixture,
        "--prompt-ids",
        "1,2",
        "--precisions",
        "int4",
    ]);
    assert_eq!(out.status.code(), Some(2));
}
