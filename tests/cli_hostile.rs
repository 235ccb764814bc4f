//! Hostile input to the command line (issue 18): every case must end in exit 0 or in
//! exit 2 with a message that says where, never in a panic, an abort, a hang, a
//! silently wrong result or a lost file. One test per class, each with the examples
//! the issue found; `tests/fuzz_cli.rs` throws random sizes and arguments at it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{fusec, fusec_in, root, scratch};

fn fixture() -> PathBuf {
    root().join("tests/fixtures/hf-tiny-llama-s0")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit code 2, no panic, and a message that contains every one of `needles`.
fn assert_input_error(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2\nstdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing from: {err}");
    }
}

/// A copy of the tiny fixture checkpoint (config, weights) in a fresh directory.
fn checkpoint_copy(name: &str) -> PathBuf {
    let dir = scratch(name).join("ckpt");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join(f), dir.join(f)).expect("copy");
    }
    dir
}

/// `examples/tiny.toml` with `key = value` lines replaced, written to `dir`.
fn tiny_with(dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let src = std::fs::read_to_string(root().join("examples/tiny.toml")).expect("tiny");
    let mut text = String::new();
    for line in src.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        match edits.iter().find(|(k, _)| *k == key) {
            Some((k, v)) => text.push_str(&format!("{k} = {v}\n")),
            None => text.push_str(&format!("{line}\n")),
        }
    }
    // The weights path is relative to the file: point it at the fixture.
    let text = text.replace("../tests/fixtures/hf-tiny-llama-s0", s(&fixture()));
    let path = dir.join("model.toml");
    std::fs::write(&path, text).expect("write");
    path
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).expect("readable")
}

// ---- 1. Files ---------------------------------------------------------------------

#[test]
fn no_output_replaces_what_the_run_reads() {
    let ckpt = checkpoint_copy("inputs");
    let weights = read(&ckpt.join("model.safetensors"));
    // --save-weights into the checkpoint it has just read.
    let out = fusec(&[
        "run",
        s(&ckpt),
        "--precision",
        "fp8",
        "--prompt-ids",
        "1,2",
        "--tokens",
        "2",
        "--save-weights",
        s(&ckpt),
        "--force",
    ]);
    assert_input_error(&out, &["checkpoint directory"]);
    // --json onto the weights, through another spelling of the path.
    let other = ckpt.join("../ckpt/model.safetensors");
    let out = fusec(&[
        "run",
        s(&ckpt),
        "--weights",
        s(&ckpt.join("model.safetensors")),
        "--prompt-ids",
        "1",
        "--tokens",
        "2",
        "--json",
        s(&other),
        "--force",
    ]);
    assert_input_error(&out, &["which this run reads"]);
    // A compile dump onto the model file itself.
    let toml = tiny_with(&scratch("inputs"), &[]);
    let before = read(&toml);
    let out = fusec(&[
        "compile",
        s(&toml),
        "--out",
        s(toml.parent().expect("dir")),
        "--report-json",
        s(&toml),
        "--force",
    ]);
    assert_input_error(&out, &["which this run reads"]);
    assert_eq!(read(&toml), before);
    assert_eq!(
        read(&ckpt.join("model.safetensors")),
        weights,
        "the weights changed"
    );
    // The checkpoint still runs.
    let out = fusec(&["run", s(&ckpt), "--prompt-ids", "1", "--tokens", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn existing_outputs_are_replaced_only_with_force_and_keep_their_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("force");
    let saved = dir.join("saved");
    std::fs::create_dir_all(&saved).expect("dir");
    let target = saved.join("model.safetensors");
    std::fs::write(&target, "precious").expect("write");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let fixture = fixture();
    let args = [
        "run",
        s(&fixture),
        "--prompt-ids",
        "1",
        "--tokens",
        "2",
        "--save-weights",
        s(&saved),
    ];
    let out = fusec(&args);
    assert_input_error(&out, &["--force"]);
    assert_eq!(read(&target), b"precious");
    let out = fusec(&[&args[..], &["--force"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let meta = std::fs::metadata(&target).expect("written");
    assert_eq!(meta.permissions().mode() & 0o777, 0o640, "mode changed");
    assert!(meta.len() > 1000, "not the weights");
    // --json and report --out the same way; no temporary is left behind.
    let json = dir.join("out.json");
    std::fs::write(&json, "keep").expect("write");
    let out = fusec(&[
        "run",
        s(&fixture),
        "--prompt-ids",
        "1",
        "--tokens",
        "2",
        "--json",
        s(&json),
    ]);
    assert_input_error(&out, &["--force"]);
    let report = dir.join("report.txt");
    std::fs::write(&report, "keep").expect("write");
    let out = fusec(&["report", s(&fixture), "--out", s(&report)]);
    assert_input_error(&out, &["--force"]);
    assert_eq!(read(&json), b"keep");
    assert_eq!(read(&report), b"keep");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("fusec-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_failed_write_leaves_no_partial_file() {
    // A file-size limit of 8 KiB (with SIGXFSZ ignored, so that the write fails with
    // EFBIG rather than killing the process): eager.fir cannot be written whole.
    let dir = scratch("partial");
    std::fs::write(dir.join("eager.fir"), "old dump").expect("write");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 8 && exec '{}' compile '{}' --out '{}'",
            env!("CARGO_BIN_EXE_fusec"),
            root().join("examples/tiny.toml").display(),
            dir.display()
        ))
        .output()
        .expect("sh runs");
    assert_input_error(&out, &["eager.fir", "cannot write"]);
    assert_eq!(read(&dir.join("eager.fir")), b"old dump");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["eager.fir"], "a partial or temporary file is left");
}

#[test]
fn output_directories_stay_under_fusec_out() {
    let dir = scratch("names");
    let work = dir.join("a/b");
    std::fs::create_dir_all(&work).expect("dir");
    for name in ["\"../../x\"", "\"/tmp/fusec-abs-dir\"", "\"..\"", "\"a/b\""] {
        let model = tiny_with(&dir, &[("name", name)]);
        let out = fusec_in(&work, &["compile", s(&model)]);
        assert_input_error(&out, &["model.toml:", "name"]);
    }
    assert!(!dir.join("x").exists() && !Path::new("/tmp/fusec-abs-dir").exists());
    // Names taken from a file name are made plain instead.
    let odd = dir.join("my model (v2).toml");
    let text = std::fs::read_to_string(tiny_with(&dir, &[])).expect("read");
    std::fs::write(&odd, text.replace("name = \"tiny-llama\"\n", "")).expect("write");
    let out = fusec_in(&work, &["compile", s(&odd)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(work.join("fusec-out/my_model__v2_/eager.fir").is_file());
}

// ---- 2. Pipes and standard output -------------------------------------------------

#[test]
fn a_closed_pipe_ends_quietly_and_a_full_disk_is_an_error() {
    // A pipe whose reading end is closed before fusec writes: every write fails with
    // EPIPE, as with `fusec run ... | head -0`.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_fusec"))
        .args([
            "run",
            s(&fixture()),
            "--prompt-ids",
            "1,2",
            "--tokens",
            "3",
            "--profile",
        ])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    // Standard output on a full disk.
    for args in [
        vec!["report", s(&fixture())],
        vec!["run", s(&fixture()), "--prompt-ids", "1", "--tokens", "2"],
        vec!["compile", s(&fixture()), "--out", s(&scratch("full"))],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let out = Command::new(env!("CARGO_BIN_EXE_fusec"))
            .args(&args)
            .stdout(full)
            .output()
            .expect("runs");
        assert_input_error(&out, &["standard output"]);
    }
    // Standard error on a full disk: the exit code still tells bad input (2) from a
    // panic (101).
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = Command::new(env!("CARGO_BIN_EXE_fusec"))
        .args(["compile", "/no/such/model.toml"])
        .stderr(full)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

// ---- 3. Sizes -----------------------------------------------------------------------

#[test]
fn sizes_beyond_the_limits_are_refused_by_key_and_position() {
    let dir = scratch("sizes");
    let big = (1u64 << 62).to_string();
    for (key, value) in [
        ("hidden_size", big.as_str()),
        ("num_heads", big.as_str()),
        ("num_layers", "1000000"),
        ("vocab_size", big.as_str()),
        ("intermediate_size", big.as_str()),
        ("max_seq_len", big.as_str()),
        ("context", big.as_str()),
        ("batch", "9223372036854775807"),
    ] {
        let model = tiny_with(&dir, &[(key, value)]);
        for cmd in ["compile", "run"] {
            let args: Vec<&str> = if cmd == "run" {
                vec!["run", s(&model), "--prompt-ids", "1", "--tokens", "1"]
            } else {
                vec!["compile", s(&model), "--out", s(&dir)]
            };
            let out = fusec(&args);
            assert_input_error(&out, &["model.toml:", key]);
        }
    }
    // Products of sizes each within its limit.
    let model = tiny_with(
        &dir,
        &[
            ("num_layers", "4096"),
            ("hidden_size", "1048576"),
            ("intermediate_size", "4194304"),
        ],
    );
    let out = fusec(&["compile", s(&model), "--out", s(&dir)]);
    assert_input_error(&out, &["model.toml:", "limit"]);
    // A cache whose capacity (what generated kernels allocate) is beyond the limits,
    // though the decoded context is short.
    let model = tiny_with(
        &dir,
        &[
            ("batch", "32768"),
            ("max_seq_len", "16777216"),
            ("head_dim", "16384"),
        ],
    );
    let out = fusec(&["compile", s(&model), "--out", s(&dir)]);
    assert_input_error(&out, &["model.toml:", "max_seq_len", "at max_seq_len"]);
    // The command line's sizes.
    let tiny = root().join("examples/tiny.toml");
    for args in [
        vec![
            "compile",
            s(&tiny),
            "--out",
            s(&dir),
            "--batch",
            "9223372036854775807",
        ],
        vec![
            "compile",
            s(&tiny),
            "--out",
            s(&dir),
            "--context",
            "4611686018427387904",
        ],
        vec!["report", s(&tiny), "--batch", "9223372036854775807"],
        vec!["report", s(&tiny), "--context", "18446744073709551615"],
        vec![
            "run",
            s(&tiny),
            "--prompt-ids",
            "1",
            "--tokens",
            "18446744073709551615",
        ],
        vec!["bench", s(&tiny), "--context", "18446744073709551615"],
        vec![
            "bench",
            s(&tiny),
            "--context",
            "18446744073709551000",
            "--steps",
            "1000",
        ],
        vec!["bench", s(&tiny), "--steps", "18446744073709551615"],
        vec!["bench", s(&tiny), "--rounds", "0"],
    ] {
        let out = fusec(&args);
        assert_input_error(&out, &[]);
    }
}

#[test]
fn a_run_that_cannot_fit_in_memory_is_refused_before_it_allocates() {
    let out = fusec(&[
        "bench",
        s(&root().join("examples/llama-3-8b.toml")),
        "--max-memory",
        "8G",
    ]);
    assert_input_error(&out, &["memory", "--max-memory"]);
    let out = fusec(&[
        "run",
        s(&root().join("examples/llama-3-8b.toml")),
        "--prompt-ids",
        "1",
        "--tokens",
        "1",
        "--max-memory",
        "1G",
    ]);
    assert_input_error(&out, &["memory"]);
    // report --measure-cpu of a small model at a batch whose KV cache cannot fit.
    let model = tiny_with(
        &scratch("memory"),
        &[
            ("batch", "32768"),
            ("hidden_size", "4096"),
            ("head_dim", "1024"),
        ],
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 4000000 && exec '{}' report '{}' --measure-cpu",
            env!("CARGO_BIN_EXE_fusec"),
            model.display()
        ))
        .output()
        .expect("sh runs");
    assert_input_error(&out, &["--measure-cpu", "memory"]);
    // The machine's own limit: an address space too small for the weights.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 4000000 && exec '{}' run '{}' --prompt-ids 1 --tokens 1",
            env!("CARGO_BIN_EXE_fusec"),
            root().join("examples/llama-3-8b.toml").display()
        ))
        .output()
        .expect("sh runs");
    assert_input_error(&out, &["memory", "ulimit"]);
}

// ---- 4. Numerics ------------------------------------------------------------------

#[test]
fn non_finite_logits_stop_the_run_naming_the_step_and_the_op() {
    let ckpt = checkpoint_copy("nonfinite");
    // One row of lm_head set to 3e38: finite, so loading accepts it, but its GEMV
    // overflows.
    let path = ckpt.join("model.safetensors");
    let mut bytes = read(&path);
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let start = header["lm_head.weight"]["data_offsets"][0]
        .as_u64()
        .expect("offset") as usize;
    for i in 0..64 {
        let at = 8 + n + start + 4 * i;
        bytes[at..at + 4].copy_from_slice(&3e38f32.to_le_bytes());
    }
    std::fs::write(&path, bytes).expect("write");
    let json = scratch("nonfinite").join("out.json");
    let _ = std::fs::remove_file(&json);
    // Token by token, the last prompt position's logits are those of graph run 3.
    let out = fusec(&[
        "run",
        s(&ckpt),
        "--prompt-ids",
        "1,17,42",
        "--tokens",
        "4",
        "--json",
        s(&json),
        "--prefill-chunk",
        "1",
    ]);
    assert_input_error(
        &out,
        &[
            "decode step 3",
            "not a finite number",
            "fused.rms_norm_linear",
        ],
    );
    assert!(!json.exists(), "a JSON of NaN logits was written");
    // Prefilled in one chunk, they are those of graph run 1.
    let out = fusec(&[
        "run",
        s(&ckpt),
        "--prompt-ids",
        "1,17,42",
        "--tokens",
        "4",
        "--json",
        s(&json),
    ]);
    assert_input_error(
        &out,
        &[
            "decode step 1",
            "not a finite number",
            "fused.rms_norm_linear",
        ],
    );
    assert!(!json.exists(), "a JSON of NaN logits was written");
    let out = fusec(&[
        "run",
        s(&ckpt),
        "--prompt-ids",
        "1,17,42",
        "--tokens",
        "4",
        "--no-fuse",
        "--check-finite",
    ]);
    assert_input_error(&out, &["decode step 1: %", "linear", "of its result is"]);
}

#[test]
fn model_maths_out_of_range_is_refused() {
    let dir = scratch("maths");
    for (key, value) in [
        ("rope_theta", "1e-300"),
        ("rope_theta", "1.0"),
        ("rope_theta", "inf"),
        ("rope_theta", "1e300"),
        ("rms_norm_eps", "2.0"),
        ("rms_norm_eps", "nan"),
        ("rms_norm_eps", "1e-300"),
    ] {
        let model = tiny_with(&dir, &[(key, value)]);
        let out = fusec(&["run", s(&model), "--prompt-ids", "1", "--tokens", "2"]);
        assert_input_error(&out, &["model.toml:", key]);
    }
    // Decoding past Mistral's sliding window is real: the windowed layers attend to the
    // last 8 positions through a ring-buffer cache (tests/families_window.rs checks the
    // values against transformers).
    let mistral = tiny_with(
        &dir,
        &[
            ("architecture", "\"mistral\"\nsliding_window = 8"),
            ("context", "8"),
        ],
    );
    let out = fusec(&[
        "run",
        s(&mistral),
        "--prompt-ids",
        "1,17,42,99,7",
        "--tokens",
        "16",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = fusec(&["run", s(&mistral), "--prompt-ids", "1,17", "--tokens", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

// ---- 5. Rules ---------------------------------------------------------------------

#[test]
fn malformed_rules_are_refused_at_load_with_name_and_line() {
    let dir = scratch("rules");
    let deep = format!("{}?x{}", "(unary.neg ".repeat(20_000), ")".repeat(20_000));
    for (name, body, needle) in [
        (
            "arity",
            "(binary.mul ?x) => ?x".to_string(),
            "takes 2 operands",
        ),
        (
            "arity-rhs",
            "(binary.mul ?x ?y) => (unary.neg ?x ?y)".to_string(),
            "takes 1 operand",
        ),
        (
            "leaf-arity",
            "(unary.neg binary.add) => (unary.neg binary.add)".to_string(),
            "takes 2",
        ),
        (
            "cond-args",
            "(binary.mul ?x ?y) => (binary.mul ?y ?x) if (is-state ?x ?y)".to_string(),
            "takes 1 argument",
        ),
        (
            "cond-kind",
            "(binary.mul ?x ?y) => (binary.mul ?y ?x) if (has-dtype ?x 3)".to_string(),
            "must be a dtype",
        ),
        (
            "bare-if",
            "(binary.mul ?x ?y) => (binary.mul ?y ?x) if".to_string(),
            "`if`",
        ),
        (
            "huge",
            "(binary.mul ?x (scalar{value=1e999})) => ?x".to_string(),
            "not a finite",
        ),
        (
            "nan",
            "(binary.mul ?x (scalar{value=NaN})) => ?x".to_string(),
            "not a finite",
        ),
        ("deep", format!("{deep} => ?x"), "deeper than"),
    ] {
        let file = dir.join(format!("{name}.rules"));
        std::fs::write(&file, format!("# some algebra\nrule {name}\n  {body}\n")).expect("write");
        let out = fusec(&[
            "compile",
            s(&root().join("examples/tiny.toml")),
            "--out",
            s(&dir),
            "--rules",
            s(&file),
        ]);
        assert_input_error(
            &out,
            &[&format!("{name}.rules:"), &format!("`{name}`"), needle],
        );
    }
}

#[test]
fn an_ill_typed_rule_result_is_reported_by_name_with_exit_2() {
    let dir = scratch("ill-typed");
    let file = dir.join("bad.rules");
    std::fs::write(
        &file,
        "# not an identity at all\nrule shrink\n  (unary.neg ?x) => (reduce.sum{axis=-1,keepdim=true} ?x)\n",
    )
    .expect("write");
    let out = fusec(&[
        "compile",
        s(&root().join("examples/tiny.toml")),
        "--out",
        s(&dir),
        "--rules",
        s(&file),
    ]);
    assert_input_error(&out, &["bad.rules:2", "`shrink`", "type"]);
    assert!(!stderr(&out).contains("internal error"), "{}", stderr(&out));
}

// ---- 6. Errors that say where -----------------------------------------------------

#[test]
fn errors_name_the_file_and_position() {
    let dir = scratch("where");
    let model = tiny_with(&dir, &[("gpu", "\"h900\"")]);
    for cmd in ["compile", "report"] {
        let out = fusec(&[cmd, s(&model)]);
        assert_input_error(&out, &["model.toml:28:7", "h900"]);
    }
    let out = fusec(&[
        "run",
        s(&fixture()),
        "--weights",
        "/dev/null",
        "--prompt-ids",
        "1",
        "--tokens",
        "1",
    ]);
    assert_input_error(&out, &["/dev/null", "not a checkpoint"]);
    let model = tiny_with(&dir, &[("num_heads", "4611686018427387904")]);
    let out = fusec(&["compile", s(&model), "--out", s(&dir)]);
    assert_input_error(&out, &["model.toml:9:13", "num_heads"]);
}

// ---- Config semantics -------------------------------------------------------------

/// Keys that change the model's maths are implemented or rejected by name, in every
/// spelling transformers reads: the 4.x `rope_scaling.type`, a numeric `rope_type`, a
/// `factor` without a type, biases, other activations.
#[test]
fn config_keys_that_change_the_maths_are_rejected_by_name() {
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("config.json")).expect("config"),
    )
    .expect("json");
    for (i, (patch, needle)) in [
        (
            r#"{"rope_scaling": {"type": "linear", "factor": 2.0}}"#,
            "rope_scaling.type",
        ),
        (
            r#"{"rope_scaling": {"rope_type": 3, "factor": 2.0}}"#,
            "rope_scaling.rope_type",
        ),
        (
            r#"{"rope_scaling": {"factor": 2.0}}"#,
            "rope_scaling.factor",
        ),
        (
            r#"{"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}"#,
            "dynamic",
        ),
        (r#"{"hidden_act": "gelu"}"#, "hidden_act"),
        (r#"{"attention_bias": true}"#, "attention_bias"),
        (r#"{"mlp_bias": true}"#, "mlp_bias"),
        (r#"{"partial_rotary_factor": 0.5}"#, "partial_rotary_factor"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut config = base.clone();
        let patch: serde_json::Value = serde_json::from_str(patch).expect("patch");
        for (k, v) in patch.as_object().expect("object") {
            config[k] = v.clone();
        }
        let dir = scratch("config-keys").join(format!("m{i}"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("config.json"), config.to_string()).expect("write");
        let out = fusec(&["compile", s(&dir), "--out", s(&scratch("config-keys"))]);
        assert_input_error(&out, &["config.json:", needle]);
    }
}
