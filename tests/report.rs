//! `fusec report` end to end: snapshots of the text and JSON forms, the arithmetic the
//! report states (cost per million tokens, tokens/s, sweeps), the HTML page, GPU and
//! measurement files, and bad input giving exit code 2.
//!
//! Bless snapshot changes with `INSTA_UPDATE=always cargo test --test report` and review
//! the diff.

mod common;

use common::{fusec, fusec_in, scratch};

use std::process::Output;

use fusec::pipeline;
use fusec::report::{self, Variant};
use serde_json::Value;

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "fusec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf8 output")
}

fn example(name: &str) -> String {
    common::root()
        .join("examples")
        .join(name)
        .to_str()
        .expect("utf8 path")
        .to_string()
}

/// A GPU measurement of the tiny model, to show the predicted-vs-measured table. Its
/// figures are made up for the test and say so.
const MEASUREMENTS: &str = r#"
[[measurement]]
model = "tiny-llama"
gpu = "h100-sxm"
variant = "fused"
batch = 1
context = 64
us_per_token = 30.0
launches_per_step = 18
source = "test fixture, not a measurement"

[[measurement]]
model = "llama-3-8b"
gpu = "h100-sxm"
variant = "eager"
batch = 1
context = 4096
us_per_token = 10000.0
source = "test fixture for another model: ignored"
"#;

const TINY_ARGS: [&str; 8] = [
    "--precision",
    "fp8",
    "--context",
    "16,64,128",
    "--batch",
    "1,8,64",
    "--price-per-hour",
    "2.5",
];

#[test]
fn text_form_of_the_tiny_model() {
    let dir = scratch("text");
    // Read from the working directory by default, so the snapshot names it relatively.
    std::fs::write(dir.join("measurements.toml"), MEASUREMENTS).expect("write");
    let tiny = example("tiny.toml");
    let mut args = vec!["report", tiny.as_str()];
    args.extend(TINY_ARGS);
    let text = stdout(&fusec_in(&dir, &args));
    insta::assert_snapshot!("tiny.text", text);
}

#[test]
fn json_form_of_the_tiny_model() {
    let tiny = example("tiny.toml");
    let mut args = vec!["report", tiny.as_str(), "--format", "json"];
    args.extend(TINY_ARGS);
    let json = stdout(&fusec(&args));
    insta::assert_snapshot!("tiny.json", json);
}

/// The figures of a JSON report, parsed.
fn json_report(args: &[&str]) -> Value {
    serde_json::from_str(&stdout(&fusec(args))).expect("valid JSON")
}

fn f(v: &Value) -> f64 {
    v.as_f64().expect("a number")
}

#[test]
fn cost_per_million_tokens_follows_the_stated_price_and_rate() {
    let model = example("llama-3-8b.toml");
    let r = json_report(&[
        "report",
        &model,
        "--precision",
        "fp8",
        "--format",
        "json",
        "--price-per-hour",
        "3.6",
    ]);
    let batch = f(&r["batch"]);
    let price = f(&r["price_per_hour"]);
    assert_eq!(price, 3.6);
    let variants = r["variants"].as_array().expect("variants");
    let names: Vec<&str> = variants
        .iter()
        .map(|v| v["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["eager", "fused", "fused+fp8"]);
    for v in variants {
        let step_s = f(&v["per_step"]["us"]) * 1e-6;
        let tps = f(&v["tokens_per_s"]);
        assert!((tps - batch / step_s).abs() / tps < 1e-12);
        let expected = price / 3600.0 / tps * 1e6;
        let dollars = f(&v["dollars_per_million_tokens"]);
        assert!(
            (dollars - expected).abs() / expected < 1e-12,
            "{dollars} vs {expected}"
        );
        // MBU: the floor at the measured bandwidth over the step time.
        let bw = f(&r["cost_model"]["bandwidth_gbs"]) * 1e9;
        let mbu = f(&v["floor_bytes"]) / bw / step_s;
        assert!((f(&v["mbu"]) - mbu).abs() < 1e-12);
    }
    // Fusion and FP8 make each token cheaper.
    let cost: Vec<f64> = variants
        .iter()
        .map(|v| f(&v["dollars_per_million_tokens"]))
        .collect();
    assert!(cost[0] > cost[1] && cost[1] > cost[2], "{cost:?}");
}

#[test]
fn an_integer_precision_reports_its_lowered_variant() {
    // The integer precisions add their lowered graph, as fp8 adds fused+fp8, in the
    // decode figures and in the prefill sweep.
    let model = example("llama-125m.toml");
    let r = json_report(&[
        "report",
        &model,
        "--precision",
        "int4",
        "--format",
        "json",
        "--prompt-len",
        "64",
    ]);
    let variants = r["variants"].as_array().expect("variants");
    let names: Vec<&str> = variants
        .iter()
        .map(|v| v["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["eager", "fused", "fused+int4"]);
    let floor: Vec<f64> = variants.iter().map(|v| f(&v["floor_bytes"])).collect();
    // Q4_0's weights are 4.5 of 32 bits; the f32 KV cache stays (75 MB of the 514 MB
    // floor at the example's context).
    assert!(floor[2] < 0.3 * floor[1], "{floor:?}");
    let prefill = r["prefill"]["points"][0]["variants"]
        .as_array()
        .expect("prefill variants");
    let names: Vec<&str> = prefill
        .iter()
        .map(|v| v["variant"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["eager", "fused", "fused+int4"]);
}

#[test]
fn the_8b_page_has_every_variant_and_chart_and_a_growing_context_sweep() {
    let dir = scratch("html");
    let page = dir.join("r.html");
    let model = example("llama-3-8b.toml");
    let out = fusec(&[
        "report",
        &model,
        "--gpu",
        "h100-sxm",
        "--precision",
        "fp8",
        "--format",
        "html",
        "--out",
        page.to_str().expect("utf8"),
    ]);
    assert!(stdout(&out).contains("wrote"));
    let html = std::fs::read_to_string(&page).expect("page written");
    assert!(html.starts_with("<!DOCTYPE html>"));
    for id in ["roofline", "step-bars", "context-sweep", "batch-sweep"] {
        assert_eq!(html.matches(&format!("id=\"{id}\"")).count(), 1, "{id}");
    }
    for v in ["<th>eager</th>", "<th>fused</th>", "<th>fused+fp8</th>"] {
        assert!(html.contains(v), "{v}");
    }
    // Self-contained: no scripts, nothing fetched or linked.
    assert!(!html.contains("<script"));
    assert!(!html.contains("src=") && !html.contains("href="));

    let r = json_report(&["report", &model, "--precision", "fp8", "--format", "json"]);
    let points = r["context_sweep"]["points"].as_array().expect("points");
    assert_eq!(points.len(), 7, "128 to 8192");
    for i in 0..3 {
        let us: Vec<f64> = points
            .iter()
            .map(|p| f(&p["variants"][i]["us_per_token"]))
            .collect();
        assert!(us.windows(2).all(|w| w[1] > w[0]), "variant {i}: {us:?}");
    }
}

#[test]
fn same_input_same_bytes() {
    let model = example("llama-3-8b.toml");
    for format in ["text", "json", "md", "html"] {
        let a = stdout(&fusec(&["report", &model, "--format", format]));
        let b = stdout(&fusec(&["report", &model, "--format", format]));
        assert!(a == b, "{format} differs between runs");
    }
}

#[test]
fn the_report_agrees_with_the_compile_pipeline() {
    let spec = pipeline::load(&common::root().join("examples/llama-3-8b.toml"), None, None)
        .expect("valid example");
    let eager = pipeline::eager(&spec).expect("eager graph");
    let rules = pipeline::rules(&[]).expect("rules");
    let (fused, _) = pipeline::fuse(&spec, &eager, &rules).expect("fuses");
    let gpu = pipeline::target_gpu(&spec).expect("known gpu");
    let summary = fusec::summary::Summary::new(&spec, gpu, &eager, Some(&fused)).expect("summary");
    let variants = [
        Variant {
            name: "eager".into(),
            description: String::new(),
            graph: eager,
        },
        Variant {
            name: "fused".into(),
            description: String::new(),
            graph: fused,
        },
    ];
    let r = report::build(&report::Inputs {
        spec: &spec,
        variants: &variants,
        precision: "bf16",
        gpu,
        gpus: fusec_ir::hardware::GPUS,
        price_per_hour: 2.5,
        contexts: &[4096],
        batches: &[1],
        prefill: &[],
        prompts: &[],
        prefill_chunk: 512,
        measurements: &[],
        measurements_file: None,
        cpu: None,
        notes: &[],
    })
    .expect("report");
    let fused_summary = summary.fused.as_ref().expect("fused");
    for (v, s) in r.variants.iter().zip([&summary.eager, fused_summary]) {
        assert_eq!(v.per_step.launches, s.launches_total);
        assert_eq!(v.per_step.bytes_read, s.bytes_read);
        assert_eq!(v.per_step.flops, s.flops);
        assert!((v.us_per_token - s.est_us_per_token).abs() < 1e-9);
        // Per-kernel rows add up to the step.
        let launches: u64 = v.kernels.iter().map(|k| k.count).sum();
        assert_eq!(launches, v.per_step.launches);
        let us: f64 = v.kernels.iter().map(|k| k.total_us).sum();
        assert!((us - v.per_step.us).abs() / v.per_step.us < 1e-9);
    }
    // The eager kernels the fused kernels replaced, plus the kernels fusion kept, are
    // no more than the eager step launched: no eager op is claimed twice.
    let replaced: u64 = r.variants[1]
        .kernels
        .iter()
        .map(|k| k.count * k.replaced_kernels)
        .sum();
    let kept = r.variants[1]
        .kernels
        .iter()
        .filter(|k| k.replaced_kernels == 0)
        .map(|k| k.count)
        .sum::<u64>();
    assert!(replaced + kept <= r.variants[0].per_step.launches);
    assert!(replaced > 0);
}

#[test]
fn a_user_gpu_from_a_file() {
    let dir = scratch("gpu-file");
    let file = dir.join("my-gpus.toml");
    std::fs::write(
        &file,
        "[[gpu]]\nname = \"rtx-4090\"\ndescription = \"NVIDIA GeForce RTX 4090\"\n\
         hbm_gbs = 1008.0\nf32_tflops = 82.6\nbf16_tflops = 165.2\nfp8_tflops = 330.3\n\
         memory_gb = 24.0\nsource = \"Ada whitepaper (test)\"\n",
    )
    .expect("write");
    let model = example("llama-3-8b.toml");
    let text = stdout(&fusec(&[
        "report",
        &model,
        "--gpu-file",
        file.to_str().expect("utf8"),
        "--gpu",
        "rtx-4090",
        "--precision",
        "fp8",
    ]));
    assert!(text.contains("fusec report: llama-3-8b on rtx-4090"));
    assert!(text.contains("Ada whitepaper (test)"));
    assert!(text.contains("bandwidth 1008 GB/s (datasheet)"));
    assert!(text.contains("fusion chose its kernels with the cost model of h100-sxm"));
}

#[test]
fn the_cpu_profile_agrees_with_the_cost_model() {
    let tiny = example("tiny.toml");
    let r = json_report(&["report", &tiny, "--measure-cpu", "--format", "json"]);
    let cpu = &r["measured"]["cpu"];
    assert_eq!(cpu["counts_agree"], Value::Bool(true), "{cpu}");
    assert_eq!(cpu["context"], 64);
    assert_eq!(
        cpu["total"]["predicted_bytes"],
        cpu["total"]["measured_bytes"]
    );
    assert_eq!(
        cpu["total"]["measured_launches"],
        r["variants"][0]["per_step"]["launches"]
    );
}

/// Runs a report expected to fail with bad input; returns its message.
fn bad_input(args: &[&str]) -> String {
    let out = fusec(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    err
}

#[test]
fn bad_input_exits_2_with_a_clear_message() {
    let model = example("llama-3-8b.toml");
    let tiny = example("tiny.toml");
    let dir = scratch("bad");
    let bad_gpus = dir.join("bad-gpus.toml");
    std::fs::write(
        &bad_gpus,
        "[[gpu]]\nname = \"x\"\nhbm_gbs = 0.0\nf32_tflops = 1.0\nbf16_tflops = 1.0\nsource = \"s\"\n",
    )
    .expect("write");
    let bad_measurements = dir.join("m.toml");
    std::fs::write(&bad_measurements, "[[measurement]]\nmodel = 3\n").expect("write");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["report", &model, "--gpu", "b200"],
            "unknown GPU `b200`",
        ),
        (
            vec!["report", &model, "--context", "128,32768"],
            "context 32768 is beyond max_seq_len 8192",
        ),
        (
            vec!["report", &model, "--format", "pdf"],
            "invalid value 'pdf'",
        ),
        (
            vec!["report", &model, "--precision", "int3"],
            "unknown precision `int3`",
        ),
        (
            vec!["report", &model, "--gpu", "a100-sxm", "--precision", "fp8"],
            "a100-sxm has no FP8 tensor cores",
        ),
        (vec!["report", &model, "--batch", "0"], "--batch: 0"),
        (
            vec!["report", &model, "--prompt-len", "128,8192"],
            "--prompt-len: a prompt must be 1 to 8191 tokens (max_seq_len 8192, one position left for the first generated token), got 8192",
        ),
        (vec!["report", &model, "--prompt-len", "0"], "got 0"),
        (
            vec!["report", &model, "--prefill-chunk", "0"],
            "--prefill-chunk must be at least 1 token",
        ),
        (
            vec!["report", &model, "--no-prefill", "--prompt-len", "64"],
            "cannot be used with",
        ),
        (
            vec!["report", &model, "--price-per-hour", "0"],
            "--price-per-hour",
        ),
        (
            vec![
                "report",
                &model,
                "--gpu-file",
                bad_gpus.to_str().expect("utf8"),
            ],
            "bad-gpus.toml:3:11: `hbm_gbs` must be a positive number",
        ),
        (
            vec![
                "report",
                &tiny,
                "--measurements",
                bad_measurements.to_str().expect("utf8"),
            ],
            "m.toml:2:9",
        ),
        (
            vec!["report", &model, "--measure-cpu"],
            "--measure-cpu runs small models only",
        ),
    ];
    for (args, needle) in cases {
        let err = bad_input(&args);
        assert!(
            err.contains(needle),
            "{args:?}: expected `{needle}` in {err}"
        );
    }
}
