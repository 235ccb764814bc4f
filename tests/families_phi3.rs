//! Phi-3 / Phi-3.5 mini (`model_type` `phi3`) through every stage:
//!
//! - the tiny Hugging Face reference `tests/fixtures/hf-tiny-phi3-s0`, whose
//!   checkpoint holds packed `qkv_proj` and `gate_up_proj` weights, decoded by `fusec
//!   run`, eager and fused, and accepted by `scripts/check_reference.py` (ids exact,
//!   logits within 1e-4 relative);
//! - the published configuration of Phi-3-mini-4k-instruct (`examples/phi-3-mini-4k`,
//!   sliding window 2047) in every precision: Llama's 5 launches per layer, within 2%
//!   of the memory floor, at contexts inside and beyond the window;
//! - FP8 compiled and run;
//! - what fusec does not implement (`longrope`, its older name `su`, a partial rotary
//!   factor): exit 2, naming the key.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fusec, misses_only_near_ties, path_str, root, scratch};
use fusec::exec::Weights;
use fusec::pipeline;

const PHI3: &str = "tests/fixtures/hf-tiny-phi3-s0";

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("readable")).expect("valid JSON")
}

fn ok(args: &[&str]) {
    let out = fusec(args);
    assert!(
        out.status.success(),
        "fusec {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn phi3_matches_hugging_face_eager_and_fused() {
    let dir = root().join(PHI3);
    let expected = dir.join("expected.json");
    for (name, extra) in [("eager", &["--no-fuse"][..]), ("fused", &[][..])] {
        let out = scratch(&format!("phi3-{name}")).join("out.json");
        let mut args = vec![
            "run",
            path_str(&dir),
            "--prompt-ids",
            "1,17,42,99,7",
            "--tokens",
            "16",
            "--json",
            path_str(&out),
        ];
        args.extend_from_slice(extra);
        ok(&args);
        let check = Command::new("python3")
            .arg(root().join("scripts/check_reference.py"))
            .arg(&expected)
            .arg(&out)
            .output()
            .expect("python3 runs: the reference check needs it");
        let stdout = String::from_utf8_lossy(&check.stdout).into_owned();
        assert!(check.status.success(), "{name}: {stdout}");
        let last = stdout.lines().last().unwrap_or_default();
        assert!(last.starts_with("ok: 16/16"), "{name}: {last}");
    }
}

/// The loader cuts the graph's q, k, v, gate and up weights out of the packed tensors,
/// rows in the order transformers slices the packed outputs.
#[test]
fn packed_weights_are_split_by_rows() {
    let spec = pipeline::load(&root().join(PHI3), None, None).expect("loads");
    let eager = pipeline::eager(&spec).expect("builds");
    let path = spec.weights.clone().expect("the fixture has weights");
    let w = Weights::load(&path, &eager).expect("loads the packed checkpoint");
    assert!(w.get("model.layers.0.self_attn.qkv_proj.weight").is_none());
    // The packed tensor as stored: safetensors is an 8-byte header length, a JSON
    // header with each tensor's byte range, and the data (F32 here).
    let packed = {
        let bytes = std::fs::read(path.join("model.safetensors")).expect("readable");
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let header: serde_json::Value =
            serde_json::from_slice(&bytes[8..8 + n]).expect("a JSON header");
        let t = &header["model.layers.1.mlp.gate_up_proj.weight"];
        assert_eq!(t["dtype"], "F32");
        let range = |i: usize| t["data_offsets"][i].as_u64().expect("an offset") as usize;
        bytes[8 + n + range(0)..8 + n + range(1)]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect::<Vec<f32>>()
    };
    let gate = w.get("model.layers.1.mlp.gate_proj.weight").expect("gate");
    let up = w.get("model.layers.1.mlp.up_proj.weight").expect("up");
    assert_eq!(gate.shape(), [176, 64]);
    assert_eq!(up.shape(), [176, 64]);
    let (g, u) = (gate.to_vec_f32(), up.to_vec_f32());
    assert_eq!(g[..], packed[..176 * 64]);
    assert_eq!(u[..], packed[176 * 64..]);
    let k = w.get("model.layers.0.self_attn.k_proj.weight").expect("k");
    assert_eq!(k.shape(), [32, 64], "2 KV heads of 16");
}

fn compile(model: &Path, precision: &str, context: &str) -> serde_json::Value {
    let dir = scratch(&format!("phi3-compile-{precision}-{context}"));
    let report = dir.join("report.json");
    let mut args = vec![
        "compile",
        path_str(model),
        "--out",
        path_str(&dir),
        "--emit",
        "ir,cuda",
        "--context",
        context,
        "--force",
        "--report-json",
        path_str(&report),
    ];
    if precision != "default" {
        args.extend(["--precision", precision]);
    }
    ok(&args);
    read_json(&report)
}

#[test]
fn phi3_mini_fuses_like_llama() {
    let model = root().join("examples/phi-3-mini-4k");
    for precision in ["default", "f32", "bf16", "fp8"] {
        for context in ["1024", "4096"] {
            let r = compile(&model, precision, context);
            assert_eq!(r["layers"], 32);
            let fused = &r["fused"];
            assert_eq!(fused["launches_per_layer"], 5.0, "{precision} {context}");
            let ratio = fused["floor_ratio"].as_f64().expect("a ratio");
            assert!(ratio <= 1.02, "{precision} {context}: {ratio}x the floor");
        }
    }
}

#[test]
fn fp8_runs_phi3() {
    let out = scratch("phi3-fp8").join("fp8.json");
    ok(&[
        "run",
        path_str(&root().join(PHI3)),
        "--prompt-ids",
        "1,17,42,99,7",
        "--tokens",
        "16",
        "--precision",
        "fp8",
        "--compare",
        "--json",
        path_str(&out),
    ]);
    let run = read_json(&out);
    assert_eq!(run["generated"].as_array().map(Vec::len), Some(16));
    let acc = &run["accuracy"];
    misses_only_near_ties(acc, "phi3");
    let kl = acc["mean_kl"].as_f64().expect("a number");
    assert!(kl < 0.05, "mean KL {kl}");
}

/// Phi-3's long-context RoPE (`longrope`, first published as `su`) and a partial
/// rotary factor are refused with exit 2, naming the key.
#[test]
fn unimplemented_phi3_settings_are_rejected_by_name() {
    let dir = scratch("phi3-reject");
    for (key, value, says) in [
        (
            "rope_scaling",
            r#"{"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}"#,
            "`longrope`",
        ),
        (
            "rope_scaling",
            r#"{"type": "su", "long_factor": [1.0], "short_factor": [1.0]}"#,
            "`su`",
        ),
        ("partial_rotary_factor", "0.75", "partial_rotary_factor"),
    ] {
        let case = dir.join(format!("{key}-{}", says.trim_matches('`')));
        let config = root().join("examples/phi-3-mini-4k/config.json");
        let (code, stderr) = common::compile_edited_config(&config, key, value, &case);
        assert_eq!(code, Some(2), "{key}: {stderr}");
        assert!(stderr.contains(key), "{key}: {stderr}");
        assert!(stderr.contains(says), "{key}: {stderr}");
    }
}
