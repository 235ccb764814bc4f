//! Sliding-window attention that is real (Mistral; Qwen2's and Gemma's
//! `sliding_attention` layers), end to end:
//!
//! - the tiny Hugging Face reference `tests/fixtures/hf-tiny-mistral-window-s0`
//!   (window 8, a prompt of 5 and 16 generated tokens, so decoding runs 13 positions
//!   past the window) decoded by `fusec run`, eager and fused, accepted by
//!   `scripts/check_reference.py` (ids exact, logits within 1e-4 relative);
//! - the caches of windowed layers are rings of at most `W` positions: the state the
//!   session carries, the bytes the cost model predicts at every step (reading
//!   `min(S+1, W)` positions) and the bytes the CPU executor measures agree;
//! - `compile` and `run` both take contexts beyond the window;
//! - windowed and global layers mixed in one model (`layer_types`);
//! - FP8 and the real configuration (`examples/mistral-7b.toml`): 5 launches per layer,
//!   within 2% of the memory floor, a floor flat beyond the window.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fusec, path_str, root, scratch};
use fusec::exec::{Executor, Session, Weights};
use fusec::pipeline;
use fusec_ir::{cost, step, Graph, InputKind};
use fusec_model::frontend::{LayerType, ModelSpec, Precision};

const MISTRAL: &str = "tests/fixtures/hf-tiny-mistral-window-s0";
const WINDOW: u64 = 8;
const PROMPT: [i32; 5] = [1, 17, 42, 99, 7];

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

/// `fusec run` on the fixture with `extra` flags, then the shipped checker; returns the
/// checker's last line.
fn checked(name: &str, extra: &[&str]) -> String {
    let dir = root().join(MISTRAL);
    let expected_path = dir.join("expected.json");
    let out = scratch(&format!("window-{name}")).join("out.json");
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
        .arg(&expected_path)
        .arg(&out)
        .output()
        .expect("python3 runs: the reference check needs it");
    let stdout = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.status.success(),
        "{extra:?}: check_reference.py failed:\n{stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    stdout.lines().last().unwrap_or_default().to_string()
}

#[test]
fn mistral_matches_hugging_face_past_its_window_eager_and_fused() {
    let expected = read_json(&root().join(MISTRAL).join("expected.json"));
    let prompt = expected["prompt"].as_array().map_or(0, Vec::len) as u64;
    let new = expected["new_tokens"].as_u64().expect("a count");
    assert!(
        prompt + new > WINDOW + 8,
        "the reference must run past the window"
    );
    for (name, extra) in [("eager", &["--no-fuse"][..]), ("fused", &[][..])] {
        let last = checked(name, extra);
        assert!(last.starts_with("ok: 16/16"), "{name}: {last}");
    }
}

fn spec() -> ModelSpec {
    pipeline::load(&root().join(MISTRAL), None, None).expect("loads")
}

fn state_type(g: &Graph, name: &str) -> String {
    let (id, _, _) = g
        .inputs()
        .into_iter()
        .find(|(_, n, kind)| *n == name && *kind == InputKind::State)
        .unwrap_or_else(|| panic!("no state {name}"));
    g.ty(id).to_string()
}

/// Every step of a decode past the window: the caches the session carries hold
/// `min(S+1, W)` positions, and the bytes the executor measures are the bytes the
/// cost model predicts for that step, eager and fused.
#[test]
fn the_caches_are_rings_and_each_step_moves_the_predicted_bytes() {
    let spec = spec();
    let eager = pipeline::eager(&spec).expect("builds");
    assert_eq!(state_type(&eager, "past.0.key"), "f32[B,2,min(S,8),16]");
    let rules = pipeline::rules(&[]).expect("rules");
    let (fused, _) = pipeline::fuse(&spec, &eager, &rules).expect("fuses");
    assert_eq!(state_type(&fused, "past.1.value"), "f32[B,2,min(S,8),16]");
    let weights = Weights::load(spec.weights.as_deref().expect("weights"), &eager).expect("w");
    for (what, g) in [("eager", eager), ("fused", fused)] {
        let exec = Executor::new(g.clone(), &weights).expect("plans");
        let mut s = Session::with_capacity(exec, 1, 64).expect("session");
        for (pos, token) in (0..24).map(|p| (p, PROMPT[p % PROMPT.len()])) {
            let out = s.step(&[token]).expect("steps");
            for layer in 0..2 {
                let cache = s.state(&step::past_key(layer)).expect("a cache");
                assert_eq!(
                    cache.shape()[2],
                    (pos + 1).min(WINDOW as usize),
                    "{what} step {pos}"
                );
            }
            let predicted = cost::graph_cost(&g, &step::bindings(1, pos as u64)).expect("cost");
            let want: u64 = predicted.nodes.iter().map(|(_, c)| c.bytes()).sum();
            assert_eq!(out.stats.bytes(), want, "{what} step {pos}");
        }
        // A ring that has wrapped has no prefix to rewind to.
        let e = s.rewind(3).expect_err("refused");
        assert!(e.to_string().contains("sliding window"), "{e}");
    }
}

/// The memory floor stops growing at the window: beyond it every step reads `W`
/// positions per windowed layer, whatever the context; `compile` and `run` both
/// accept contexts beyond the window.
#[test]
fn the_floor_is_flat_beyond_the_window_and_compile_agrees_with_run() {
    let spec = spec();
    let eager = pipeline::eager(&spec).expect("builds");
    let kv = |context: u64| {
        let c = cost::graph_cost(&eager, &step::bindings_for_context(1, context)).expect("c");
        (c.floor.kv_read_bytes, c.floor.kv_write_bytes)
    };
    // 2 layers x (k, v) x 2 KV heads x 16 dims x f32, per position.
    let per_position = 2 * 2 * 2 * 16 * 4;
    assert_eq!(kv(5).0, 4 * per_position);
    assert_eq!(kv(8).0, 7 * per_position);
    assert_eq!(kv(9).0, 8 * per_position);
    assert_eq!(kv(100), kv(9));
    // One position written per step, also into a full ring.
    assert_eq!(kv(100).1, per_position);
    let dir = scratch("window-compile");
    ok(&[
        "compile",
        path_str(&root().join(MISTRAL)),
        "--context",
        "100",
        "--out",
        path_str(&dir),
    ]);
}

/// `layer_types` mixes windowed and global layers: the windowed layer's caches are
/// rings, the global layer's grow; eager and fused decode alike past the window; a
/// model whose layers are all `full_attention` decodes as a model without a window
/// (differently from the windowed reference once the window is passed).
#[test]
fn windowed_and_global_layers_mix() {
    let base = spec();
    let with = |types: &[LayerType]| {
        let mut s = base.clone();
        s.model.layer_types = types.to_vec();
        s
    };
    let rules = pipeline::rules(&[]).expect("rules");
    let decode = |s: &ModelSpec, fuse: bool| {
        let eager = pipeline::eager(s).expect("builds");
        let weights =
            Weights::load(s.weights.as_deref().expect("weights"), &eager).expect("weights");
        let g = match fuse {
            true => pipeline::fuse(s, &eager, &rules).expect("fuses").0,
            false => eager,
        };
        let exec = Executor::new(g, &weights).expect("plans");
        Session::with_capacity(exec, 1, 32)
            .expect("session")
            .generate(&[PROMPT.to_vec()], 16)
            .expect("decodes")
    };
    let mixed = with(&[LayerType::Sliding, LayerType::Full]);
    let g = pipeline::eager(&mixed).expect("builds");
    assert_eq!(state_type(&g, "past.0.key"), "f32[B,2,min(S,8),16]");
    assert_eq!(state_type(&g, "past.1.key"), "f32[B,2,S,16]");
    let (e, f) = (decode(&mixed, false), decode(&mixed, true));
    assert_eq!(e.generated, f.generated);

    let windowed = decode(&base, false);
    let global = decode(&with(&[LayerType::Full, LayerType::Full]), false);
    let rows = |g: &fusec::exec::Generation| g.rows(0).map(<[f32]>::to_vec).collect::<Vec<_>>();
    let (w, gl) = (rows(&windowed), rows(&global));
    // Inside the window (the prompt's last position and the next 3) they agree.
    for i in 0..4 {
        assert_eq!(w[i], gl[i], "step {i}");
    }
    assert!(
        w[8..].iter().zip(&gl[8..]).any(|(a, b)| a != b),
        "past the window the global model must differ"
    );
}

/// FP8 lowers a windowed model: the FP8 caches are rings too, and its decode past the
/// window stays close to the f32 one.
#[test]
fn fp8_lowers_a_windowed_model() {
    let spec = pipeline::in_precision(&spec(), Precision::Fp8);
    let rules = pipeline::rules(&[]).expect("rules");
    let (g, _) =
        pipeline::fused_in(&spec, Precision::Fp8, &rules, &Default::default()).expect("lowers");
    assert_eq!(
        state_type(&g, "past.0.key"),
        "fp8e4m3[B,2,min(S,8),16]",
        "the FP8 cache is a ring"
    );
    let out = scratch("window-fp8").join("fp8.json");
    ok(&[
        "run",
        path_str(&root().join(MISTRAL)),
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
    // Teacher-forced against f32: the fixture's logits have small margins (some
    // under 0.03), so a few top-1s flip; the distributions stay close (0.0023).
    let acc = &run["accuracy"];
    let agree = acc["top1_agreement"].as_u64().expect("a count");
    assert!(agree >= 11, "{agree}/16");
    let kl = acc["mean_kl"].as_f64().expect("a number");
    assert!(kl < 0.01, "mean KL {kl}");
}

fn compile(model: &Path, precision: &str, context: &str, tag: &str) -> serde_json::Value {
    let dir = scratch(&format!("window-compile-{tag}-{precision}-{context}"));
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

/// Mistral 7B compiles at contexts up to its `max_seq_len` (beyond its 4096 window)
/// with Llama's 5 launches per layer, within 2% of its floor in every precision, and
/// its bytes per step stop growing at the window.
#[test]
fn mistral_7b_fuses_like_llama_at_every_context() {
    let model: PathBuf = root().join("examples/mistral-7b.toml");
    for precision in ["default", "f32", "bf16", "fp8"] {
        for context in ["1024", "4096", "32768"] {
            let r = compile(&model, precision, context, "mistral");
            let fused = &r["fused"];
            assert_eq!(fused["launches_per_layer"], 5.0, "{precision} {context}");
            let ratio = fused["floor_ratio"].as_f64().expect("a ratio");
            assert!(ratio <= 1.02, "{precision} {context}: {ratio}x the floor");
        }
    }
    let bytes = |context: &str| {
        compile(&model, "bf16", context, "mistral")["fused"]["bytes_read"]
            .as_u64()
            .expect("bytes")
    };
    let (at, past, far) = (bytes("1024"), bytes("4097"), bytes("32768"));
    assert!(at < past, "{at} < {past}");
    // Beyond the window only the whole-cache mask of the step's inputs grows (2
    // bytes per position in bf16), which no windowed layer reads.
    assert!(far - past < 64 * 1024, "{past} vs {far}");
}

/// `model.toml` spells the same window (`sliding_window`, `layer_types`): the Mistral
/// fixture's shape pointed at its weights decodes as transformers does; a
/// `layer_types` of the wrong length or with an unknown type is refused with exit 2,
/// naming the key, from `model.toml` and from `config.json` alike.
#[test]
fn model_toml_and_config_json_spell_windows_alike() {
    let dir = scratch("window-toml");
    let fixture = root().join(MISTRAL);
    let toml = |extra: &str| {
        format!(
            "[model]\nname = \"tiny-mistral\"\narchitecture = \"mistral\"\nhidden_size = 64\n\
             num_layers = 2\nnum_heads = 4\nnum_kv_heads = 2\nhead_dim = 16\n\
             intermediate_size = 176\nvocab_size = 256\nrope_theta = 10000.0\n\
             rms_norm_eps = 1e-5\nmax_seq_len = 128\ndtype = \"f32\"\nsliding_window = 8\n\
             {extra}\n[weights]\npath = \"{}\"\n",
            fixture.display()
        )
    };
    let model = dir.join("mistral.toml");
    std::fs::write(
        &model,
        toml("layer_types = [\"sliding_attention\", \"sliding_attention\"]"),
    )
    .expect("writes");
    let out = dir.join("out.json");
    ok(&[
        "run",
        path_str(&model),
        "--prompt-ids",
        "1,17,42,99,7",
        "--tokens",
        "16",
        "--json",
        path_str(&out),
    ]);
    let check = Command::new("python3")
        .arg(root().join("scripts/check_reference.py"))
        .arg(fixture.join("expected.json"))
        .arg(&out)
        .output()
        .expect("python3 runs");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    for (i, (types, says)) in [
        (
            "[\"sliding_attention\"]",
            "lists 1 layer type(s) for 2 layers",
        ),
        (
            "[\"sliding_attention\", \"chunked_attention\"]",
            "unsupported layer type",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let bad = dir.join(format!("bad{i}.toml"));
        std::fs::write(&bad, toml(&format!("layer_types = {types}"))).expect("writes");
        let text = std::fs::read_to_string(fixture.join("config.json")).expect("config");
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
        v["layer_types"] = serde_json::from_str(types).expect("a JSON value");
        let case = dir.join(format!("json{i}"));
        std::fs::create_dir_all(&case).expect("dir");
        let config = case.join("config.json");
        std::fs::write(&config, serde_json::to_string_pretty(&v).expect("prints")).expect("w");
        for path in [&bad, &config] {
            let out = fusec(&["compile", path_str(path), "--out", path_str(&dir)]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{path:?}: {stderr}");
            assert!(stderr.contains("layer_types"), "{path:?}: {stderr}");
            assert!(stderr.contains(says), "{path:?}: {stderr}");
        }
    }
}

/// `fusec report` states the window and what it does, and its context sweep shows it:
/// KV bytes read and the memory held are the same at every context beyond the window.
#[test]
fn the_report_states_the_window_and_its_sweep_is_flat_beyond_it() {
    let model = root().join("examples/mistral-7b.toml");
    let args = |format: &str| {
        let out = fusec(&[
            "report",
            path_str(&model),
            "--context",
            "1024,8192,32768",
            "--format",
            format,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = args("text");
    assert!(
        text.contains("Sliding window: 32 of 32 layers attend to the last 4096 positions"),
        "{text}"
    );
    let r: serde_json::Value = serde_json::from_str(&args("json")).expect("json");
    assert_eq!(r["model"]["window"]["positions"], 4096);
    let points = r["context_sweep"]["points"].as_array().expect("points");
    let fused = |i: usize, key: &str| {
        points[i]["variants"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["variant"] == "fused"))
            .map(|v| v[key].as_u64().expect("a count"))
            .expect("the fused variant")
    };
    assert!(fused(0, "kv_read_bytes") < fused(1, "kv_read_bytes"));
    assert_eq!(fused(1, "kv_read_bytes"), fused(2, "kv_read_bytes"));
    assert_eq!(fused(1, "resident_bytes"), fused(2, "resident_bytes"));
}
