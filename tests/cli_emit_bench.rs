//! `fusec compile --emit cuda`, `--emit ptx` and `fusec bench`, end to end through the
//! binary: what they write and print agrees with what the compiler predicts.

mod common;

use std::io::Write as _;

use common::{fusec, root, scratch};

fn tiny() -> String {
    root().join("examples/tiny.toml").display().to_string()
}

/// The launches of a launch plan file.
fn launches(path: &std::path::Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let plan: serde_json::Value = serde_json::from_str(&text).expect("launch plan is JSON");
    plan["launches"].as_array().expect("launches").len()
}

#[test]
fn emit_cuda_writes_kernels_and_plans_matching_the_predicted_launches() {
    let dir = scratch("emit-cuda");
    let json = dir.join("summary.json");
    let out = fusec(&[
        "compile",
        &tiny(),
        "--out",
        dir.to_str().expect("utf8"),
        "--emit",
        "cuda",
        "--report-json",
        json.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("summary")).expect("json");
    for (prefix, variant) in [("", "fused"), ("eager_", "eager")] {
        let source = std::fs::read_to_string(dir.join(format!("{prefix}kernels.cu")))
            .expect("kernels written");
        assert!(
            source.contains("__global__"),
            "{prefix}kernels.cu has kernels"
        );
        let plan = dir.join(format!("{prefix}launch_plan.json"));
        let predicted = summary[variant]["launches_total"]
            .as_u64()
            .expect("launches_total") as usize;
        assert_eq!(launches(&plan), predicted, "{variant}: plan vs cost model");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn emit_cuda_of_integer_weights_writes_the_integer_gemv() {
    // Q8_0, Q4_0 and Q4_1 codes: the GEMVs read them with `__dp4a` (`fu_dot_q8`,
    // `fu_dot_q4`, `fu_dot_u4`)
    // after quantizing their activations per block, and the plan streams the codes.
    for (precision, dot) in [
        ("int8", "fu_dot_q8("),
        ("int4", "fu_dot_q4("),
        ("q4_1", "fu_dot_u4("),
    ] {
        let dir = scratch(&format!("emit-cuda-{precision}"));
        let model = root().join("examples/llama-125m.toml");
        let out = fusec(&[
            "compile",
            model.to_str().expect("utf8"),
            "--precision",
            precision,
            "--out",
            dir.to_str().expect("utf8"),
            "--emit",
            "cuda",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{precision}: {stderr}");
        let cu = std::fs::read_to_string(dir.join("kernels.cu")).expect("kernels.cu");
        // q/k/v, the attention output, gate/up, down and the LM head.
        let gemvs = cu.lines().filter(|l| l.contains(dot)).count();
        assert!(gemvs >= 5, "{precision}: {gemvs} integer dot products");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn emit_cuda_of_k_quants_is_refused_as_bad_input() {
    // Q4_K has no CUDA kernel yet: the user's choice of precision, exit 2 naming the
    // node and the way out, not an internal error.
    let dir = scratch("emit-cuda-q4k");
    let model = root().join("examples/llama-125m.toml");
    let out = fusec(&[
        "compile",
        model.to_str().expect("utf8"),
        "--precision",
        "q4_k",
        "--out",
        dir.to_str().expect("utf8"),
        "--emit",
        "cuda",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("u8 has no CUDA kernels yet") && stderr.contains("fusec run"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn emit_ptx_compiles_every_kernel_or_says_nvrtc_is_missing() {
    let dir = scratch("emit-ptx");
    let out = fusec(&[
        "compile",
        &tiny(),
        "--out",
        dir.to_str().expect("utf8"),
        "--emit",
        "cuda,ptx",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // Without NVRTC: bad environment, exit 2, naming what was searched.
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("--emit ptx needs NVRTC"), "{stderr}");
        let line = "NVRTC NOT FOUND: `fusec compile --emit ptx` was NOT checked";
        assert!(
            std::env::var_os("FUSEC_REQUIRE_TOOLS").is_none(),
            "{line} (FUSEC_REQUIRE_TOOLS is set): {stderr}"
        );
        let _ = writeln!(std::io::stderr(), "\n{line}\n");
        return;
    }
    let sources = std::fs::read_to_string(dir.join("kernels.cu")).expect("kernels.cu");
    let kernels = sources.matches("__global__").count();
    for arch in ["sm_80", "sm_90"] {
        let ptx = std::fs::read_to_string(dir.join(format!("kernels.{arch}.ptx")))
            .unwrap_or_else(|e| panic!("kernels.{arch}.ptx: {e}"));
        assert!(ptx.contains(&format!(".target {arch}")), "{arch}");
        assert_eq!(
            ptx.matches(".entry").count(),
            kernels,
            "{arch}: every kernel"
        );
        // ptxas's figures per kernel, or a file that says ptxas is missing.
        let res = std::fs::read_to_string(dir.join(format!("kernels.{arch}.resources.txt")))
            .unwrap_or_else(|e| panic!("kernels.{arch}.resources.txt: {e}"));
        if res.contains("ptxas not found") {
            assert!(
                std::env::var_os("FUSEC_REQUIRE_TOOLS").is_none(),
                "ptxas NOT FOUND (FUSEC_REQUIRE_TOOLS is set)"
            );
            let _ = writeln!(std::io::stderr(), "\nptxas NOT FOUND: no resource table\n");
        } else {
            assert!(res.starts_with(&format!("# ptxas -v, {arch}")), "{res}");
            // One row per distinct kernel, each with its registers and an occupancy.
            let rows: Vec<&str> = res.lines().filter(|l| l.starts_with("fusec_k")).collect();
            assert_eq!(rows.len(), kernels, "{arch}: {res}");
            assert!(rows.iter().all(|r| r.contains('%')), "{res}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_times_every_variant_with_the_predicted_launches() {
    let out = fusec(&[
        "bench",
        &tiny(),
        "--steps",
        "2",
        "--rounds",
        "1",
        "--context",
        "4",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for variant in ["eager f32", "fused f32", "fused bf16", "fused fp8"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(variant))
            .unwrap_or_else(|| panic!("no row for {variant}:\n{stdout}"));
        let tokens_per_s: f64 = row[variant.len()..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("tokens/s of {variant}: {row}"));
        assert!(tokens_per_s > 0.0, "{row}");
    }
    // The launches per step it measures are the ones the compiler predicts.
    let dir = scratch("bench-summary");
    let json = dir.join("summary.json");
    let compiled = fusec(&[
        "compile",
        &tiny(),
        "--out",
        dir.to_str().expect("utf8"),
        "--report-json",
        json.to_str().expect("utf8"),
    ]);
    assert!(compiled.status.success());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("summary")).expect("json");
    let launches = |variant: &str| -> Option<u64> {
        let row = stdout.lines().find(|l| l.starts_with(variant))?;
        row[variant.len()..].split_whitespace().nth(5)?.parse().ok()
    };
    assert_eq!(
        launches("eager f32"),
        summary["eager"]["launches_total"].as_u64(),
        "{stdout}"
    );
    assert_eq!(
        launches("fused f32"),
        summary["fused"]["launches_total"].as_u64(),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(stdout.contains("fused f32 / eager f32:"), "{stdout}");
}

#[test]
fn bench_times_batched_decode_and_writes_json() {
    let dir = scratch("bench-batched");
    let json = dir.join("bench.json");
    let out = fusec(&[
        "bench",
        &tiny(),
        "--steps",
        "2",
        "--rounds",
        "1",
        "--context",
        "4",
        "--no-prefill",
        "--variant",
        "fused f32",
        "--batch",
        "1,3",
        "--json",
        json.to_str().expect("utf8"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for batch in ["batch 1 ", "batch 3 "] {
        assert!(
            stdout.lines().any(|l| l.starts_with(batch)),
            "no row for {batch}:\n{stdout}"
        );
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("json");
    let batched = v["batched"].as_array().expect("batched results");
    assert_eq!(batched.len(), 2, "{v}");
    assert_eq!(batched[1]["batch"].as_u64(), Some(3));
    assert!(batched[1]["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0));
    assert!(batched[1]["ratio_to_batch_1"]
        .as_f64()
        .is_some_and(|r| r > 0.0));
    assert_eq!(batched[0]["ratio_to_batch_1"].as_f64(), Some(1.0));
    assert!(v["variants"][0]["tokens_per_s"].as_f64().is_some());
    // An existing file is replaced only with --force; a batch of 0 is bad input.
    let again = fusec(&[
        "bench",
        &tiny(),
        "--steps",
        "1",
        "--rounds",
        "1",
        "--context",
        "2",
        "--no-prefill",
        "--variant",
        "fused f32",
        "--no-batch",
        "--json",
        json.to_str().expect("utf8"),
    ]);
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    let zero = fusec(&["bench", &tiny(), "--no-prefill", "--batch", "0"]);
    assert_eq!(zero.status.code(), Some(2), "{zero:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `fusec bench --serve` on the tiny model: the short decode run beside it, and the
/// serving options given.
fn bench_serve(extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "bench",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--context",
        "2",
        "--no-prefill",
        "--no-batch",
        "--variant",
        "fused f32",
    ];
    args.extend_from_slice(extra);
    let model = tiny();
    args.insert(1, &model);
    fusec(&args)
}

#[test]
fn bench_serve_finishes_every_request_with_every_token() {
    for engine in ["paged", "sessions"] {
        let dir = scratch(&format!("bench-serve-{engine}"));
        let json = dir.join("bench.json");
        let out = bench_serve(&[
            "--serve",
            "6",
            "--concurrency",
            "3",
            "--prompt-len",
            "5",
            "--output-len",
            "4",
            "--engine",
            engine,
            "--json",
            json.to_str().expect("utf8"),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("serving: {engine} engine (f32), 6 requests")),
            "{stdout}"
        );
        assert!(stdout.contains("6 finished, 24 output tokens"), "{stdout}");
        for row in ["TTFT", "ITL", "E2E"] {
            assert!(
                stdout.lines().any(|l| l.trim_start().starts_with(row)),
                "no {row} row:\n{stdout}"
            );
        }
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
                .expect("json");
        let s = &v["serving"];
        let n = |key: &str| s[key].as_u64().unwrap_or_else(|| panic!("{key}: {s}"));
        let f = |l: &str, key: &str| {
            s[l][key]
                .as_f64()
                .unwrap_or_else(|| panic!("{l}.{key}: {s}"))
        };
        assert_eq!(s["engine"].as_str(), Some(engine), "{s}");
        assert_eq!(
            (
                n("requests"),
                n("concurrency"),
                n("prompt_len"),
                n("output_len")
            ),
            (6, 3, 5, 4)
        );
        // No request lost, every one generated exactly --output-len tokens.
        assert_eq!(n("finished"), 6, "{s}");
        assert_eq!(n("output_tokens"), 24, "{s}");
        assert_eq!(n("prompt_tokens"), 30, "{s}");
        assert_eq!(s["ttft"]["samples"].as_u64(), Some(6), "{s}");
        assert_eq!(s["e2e"]["samples"].as_u64(), Some(6), "{s}");
        assert_eq!(s["itl"]["samples"].as_u64(), Some(6 * 3), "{s}");
        for l in ["ttft", "itl", "e2e"] {
            let (p50, p90, p99) = (f(l, "p50_ms"), f(l, "p90_ms"), f(l, "p99_ms"));
            assert!(p50 <= p90 && p90 <= p99, "{l}: {s}");
            assert!(f(l, "mean_ms") > 0.0, "{l}: {s}");
        }
        assert!(f("ttft", "p50_ms") > 0.0, "{s}");
        // The first token comes no later than the last.
        assert!(f("ttft", "p99_ms") <= f("e2e", "p99_ms"), "{s}");
        assert!(s["output_tokens_per_s"].as_f64().is_some_and(|t| t > 0.0));
        assert!(
            s["total_tokens_per_s"].as_f64() > s["output_tokens_per_s"].as_f64(),
            "{s}"
        );
        assert!(s["requests_per_s"].as_f64().is_some_and(|t| t > 0.0));
        assert_eq!(n("max_running"), 3, "{s}");
        assert_eq!(n("preemptions"), 0, "{s}");
        // Every token fed once: the prompts, and each generated token but the last.
        assert_eq!(n("tokens_fed"), 6 * (5 + 3), "{s}");
        assert!(n("steps") >= 8, "{s}");
        assert!(
            n("peak_kv_blocks") > 0 && n("peak_kv_blocks") <= n("kv_blocks"),
            "{s}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn bench_serve_refuses_bad_options_naming_them() {
    for (extra, named) in [
        (&["--serve", "0"][..], "--serve"),
        (&["--serve", "18446744073709551615"][..], "--serve"),
        (&["--serve", "2", "--concurrency", "0"][..], "--concurrency"),
        (&["--serve", "2", "--prompt-len", "0"][..], "--prompt-len"),
        (&["--serve", "2", "--output-len", "0"][..], "--output-len"),
        // The tiny model's context is 128 positions.
        (
            &["--serve", "2", "--prompt-len", "200"][..],
            "--prompt-len 200",
        ),
        (
            &["--serve", "2", "--prompt-len", "100", "--output-len", "29"][..],
            "--output-len 29",
        ),
    ] {
        let out = bench_serve(extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(named),
            "{extra:?}: {stderr}"
        );
        // Refused before any benchmark ran.
        assert!(out.stdout.is_empty(), "{extra:?}");
    }
    // The serving options need --serve.
    let out = bench_serve(&["--concurrency", "2"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn emit_cuda_with_prefill_writes_the_prefill_kernels() {
    // bf16: the prefill step's projections are tensor-core GEMMs, its attention the
    // causal prefill kernel; the decode step's files are written as without --prefill.
    let dir = scratch("emit-cuda-prefill");
    let out = fusec(&[
        "compile",
        &tiny(),
        "--out",
        dir.to_str().expect("utf8"),
        "--emit",
        "cuda",
        "--precision",
        "bf16",
        "--prefill",
        "16",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("kernels.cu").exists(), "the decode kernels");
    // The eager step is the checkpoint's f32, as the decode step's eager dump is.
    let eager = std::fs::read_to_string(dir.join("prefill_eager_kernels.cu")).expect("written");
    assert!(eager.contains("__global__"), "eager prefill kernels");
    let fused = std::fs::read_to_string(dir.join("prefill_fused_kernels.cu")).expect("written");
    assert!(fused.contains("fu_mma_bf16_16x8x16(acc0"), "a GEMM");
    assert!(
        fused.contains("// prefill_attention"),
        "the prefill attention"
    );
    assert!(launches(&dir.join("prefill_fused_launch_plan.json")) > 0);
    let _ = std::fs::remove_dir_all(&dir);

    // What has no prefill kernel is bad input (exit 2), as is a step of 0 tokens.
    let dir = scratch("emit-cuda-prefill-int8");
    let out = fusec(&[
        "compile",
        &root()
            .join("examples/llama-125m.toml")
            .display()
            .to_string(),
        "--out",
        dir.to_str().expect("utf8"),
        "--emit",
        "cuda",
        "--precision",
        "int8",
        "--prefill",
        "16",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no CUDA prefill kernels"), "{err}");
    let out = fusec(&[
        "compile",
        &tiny(),
        "--out",
        dir.to_str().expect("utf8"),
        "--prefill",
        "0",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
