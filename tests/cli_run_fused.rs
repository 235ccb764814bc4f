//! `fusec run` with fusion and precision: the fused graph by default and `--no-fuse`,
//! user rules, what `fusec compile` predicts against what `fusec run` measures,
//! `--precision` with `--compare`, and FP8 weights saved and loaded back.

mod common;

use common::{fusec, scratch};

use std::path::Path;

fn ok(args: &[&str]) -> String {
    let out = fusec(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "fusec {args:?}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> String {
    root()
        .join("tests/fixtures/hf-tiny-llama-s0")
        .to_string_lossy()
        .into_owned()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("readable")).expect("valid JSON")
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("a row")
                .iter()
                .map(|x| x.as_f64().expect("a number"))
                .collect()
        })
        .collect()
}

/// Runs the fixture's prompt and returns the JSON report.
fn run_json(name: &str, extra: &[&str]) -> serde_json::Value {
    let path = scratch(name).join("out.json");
    let f = fixture();
    let mut args = vec![
        "run",
        &f,
        "--prompt-ids",
        "1,17,42,99,7",
        "--tokens",
        "16",
        "--json",
        path.to_str().expect("utf-8"),
    ];
    args.extend(extra);
    ok(&args);
    read_json(&path)
}

fn max_rel_err(actual: &serde_json::Value, expected: &serde_json::Value) -> f64 {
    rows(&actual["logits"])
        .iter()
        .zip(rows(&expected["logits"]))
        .map(|(a, e)| {
            let num: f64 = a.iter().zip(&e).map(|(x, y)| (x - y).powi(2)).sum();
            let den: f64 = e.iter().map(|y| y * y).sum();
            (num / den).sqrt()
        })
        .fold(0.0, f64::max)
}

#[test]
fn run_fuses_by_default_and_no_fuse_runs_the_eager_graph() {
    let expected = read_json(&Path::new(&fixture()).join("expected.json"));
    let fused = run_json("fused", &[]);
    let eager = run_json("eager", &["--no-fuse"]);
    for (report, graph, launches) in [(&fused, "fused", 18), (&eager, "eager", 100)] {
        assert_eq!(report["graph"], graph);
        assert_eq!(report["precision"], "f32");
        assert_eq!(report["generated"], expected["generated"], "{graph}");
        let err = max_rel_err(report, &expected);
        assert!(err <= 1e-4, "{graph}: max relative L2 error {err}");
        assert_eq!(report["stats"]["launches_per_step"], launches, "{graph}");
    }
    // A user rule file is loaded as compile loads it.
    let rules = root().join("examples/rules/swiglu-up-first.rules");
    let with_rules = run_json("rules", &["--rules", rules.to_str().expect("utf-8")]);
    assert_eq!(with_rules["generated"], expected["generated"]);
    assert!(max_rel_err(&with_rules, &expected) <= 1e-4);
}

/// `fusec compile --context 11` predicts the step at S = 10 cached positions; 21
/// steps (S = 0..20) average to exactly that, since every count is linear in S.
#[test]
fn compile_predicts_what_run_measures() {
    let dir = scratch("predict");
    let f = fixture();
    for (precision, run_extra, compile_extra) in [
        ("f32", vec!["--no-fuse"], vec![]),
        ("f32", vec![], vec![]),
        (
            "bf16",
            vec!["--precision", "bf16"],
            vec!["--precision", "bf16"],
        ),
        (
            "fp8",
            vec!["--precision", "fp8"],
            vec!["--precision", "fp8"],
        ),
    ] {
        let report = dir.join(format!("compile-{precision}.json"));
        let mut args = vec![
            "compile",
            &f,
            "--context",
            "11",
            "--out",
            dir.to_str().expect("utf-8"),
            "--report-json",
            report.to_str().expect("utf-8"),
            // f32 is compiled twice, for the eager and the fused run.
            "--force",
        ];
        args.extend(&compile_extra);
        ok(&args);
        let predicted = read_json(&report);
        let eager_run = run_extra.contains(&"--no-fuse");
        let variant = if eager_run { "eager" } else { "fused" };
        let p = &predicted[variant];
        let out = dir.join(format!("run-{precision}-{variant}.json"));
        let mut args = vec![
            "run",
            &f,
            "--prompt-ids",
            "1,17,42,99,7",
            "--tokens",
            "17",
            "--json",
            out.to_str().expect("utf-8"),
            // Every step a decode step, as compile predicts them.
            "--prefill-chunk",
            "1",
        ];
        args.extend(&run_extra);
        ok(&args);
        let measured = read_json(&out);
        let stats = &measured["stats"];
        assert_eq!(stats["steps"], 21);
        assert_eq!(
            stats["launches_per_step"], p["launches_total"],
            "{precision} {variant}"
        );
        let bytes =
            p["bytes_read"].as_u64().expect("bytes") + p["bytes_written"].as_u64().expect("bytes");
        assert_eq!(stats["bytes_per_step"], bytes, "{precision} {variant}");
    }
}

#[test]
fn precision_runs_report_their_accuracy_against_f32() {
    let bf16 = run_json("bf16", &["--precision", "bf16", "--compare"]);
    assert_eq!(bf16["precision"], "bf16");
    let acc = &bf16["accuracy"];
    assert_eq!(acc["reference"], "f32");
    assert_eq!(acc["teacher_forced"], true);
    assert_eq!(acc["steps"].as_array().map(Vec::len), Some(16));
    assert_eq!(acc["forced_tokens"].as_array().map(Vec::len), Some(15));
    assert_eq!(acc["top1_agreement"], 16);
    assert!(acc["max_rel_l2"].as_f64().expect("a number") < 3e-2);

    let fp8 = run_json("fp8", &["--precision", "fp8", "--compare"]);
    let acc = &fp8["accuracy"];
    let agree = acc["top1_agreement"].as_u64().expect("a count");
    assert!(agree >= 13, "{agree}/16");
    let kl = acc["mean_kl"].as_f64().expect("a number");
    assert!(kl > 0.0 && kl < 0.2, "mean KL {kl}");
    let step = &acc["steps"][0];
    for key in ["rel_l2", "top1_agree", "kl", "reference_margin"] {
        assert!(!step[key].is_null(), "{key}");
    }
    let scales = fp8["kv_scales"].as_object().expect("calibrated scales");
    assert_eq!(scales.len(), 4);
    assert!(scales.contains_key("past.0.key.scale"));
    // FP8 moves fewer bytes per step than f32.
    let f32_run = run_json("f32", &[]);
    let bytes = |v: &serde_json::Value| v["stats"]["bytes_per_step"].as_u64().expect("bytes");
    assert!(bytes(&fp8) * 3 < bytes(&f32_run));
}

#[test]
fn saved_fp8_weights_load_back_with_identical_results() {
    let dir = scratch("save");
    let saved = dir.join("weights");
    let first = run_json(
        "save-first",
        &[
            "--precision",
            "fp8",
            "--weight-scales",
            "per-tensor",
            "--save-weights",
            saved.to_str().expect("utf-8"),
        ],
    );
    let file = saved.join("model.safetensors");
    let bytes = std::fs::read(&file).expect("saved");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("a header");
    let q = &header["model.layers.0.self_attn.q_proj.weight.fp8"];
    assert_eq!(q["dtype"], "F8_E4M3");
    let s = &header["model.layers.0.self_attn.q_proj.weight.scale"];
    assert_eq!(
        (s["dtype"].as_str(), s["shape"].as_array().map(Vec::len)),
        (Some("F32"), Some(0))
    );
    assert_eq!(header["past.1.value.scale"]["dtype"], "F32");
    assert_eq!(header["__metadata__"]["fusec.weight_scales"], "per-tensor");
    // Loading back takes the granularity from the metadata and needs no calibration.
    let second = run_json(
        "save-second",
        &[
            "--precision",
            "fp8",
            "--weights",
            saved.to_str().expect("utf-8"),
        ],
    );
    assert!(
        second["kv_scales"].is_null(),
        "the scales come from the file"
    );
    assert_eq!(first["generated"], second["generated"]);
    assert_eq!(first["logits"], second["logits"]);
}

#[test]
fn bad_precision_requests_exit_2() {
    let f = fixture();
    for (extra, needle) in [
        (vec!["--no-fuse", "--precision", "fp8"], "--no-fuse"),
        (vec!["--precision", "fp9"], "unknown precision"),
        (vec!["--precision", "fp8", "--keep", "frobs"], "frobs"),
    ] {
        let mut args = vec!["run", &f, "--prompt-ids", "1,2", "--tokens", "2"];
        args.extend(&extra);
        let out = fusec(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
    }
}
