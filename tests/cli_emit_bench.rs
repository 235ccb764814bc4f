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
fn emit_cuda_of_integer_weights_is_refused_as_bad_input() {
    // Integer weight codes have no CUDA kernels: the user's choice of precision, exit 2
    // naming the node and the way out, not an internal error.
    let dir = scratch("emit-cuda-int8");
    let model = root().join("examples/llama-125m.toml");
    let out = fusec(&[
        "compile",
        model.to_str().expect("utf8"),
        "--precision",
        "int8",
        "--out",
        dir.to_str().expect("utf8"),
        "--emit",
        "cuda",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("i8 has no CUDA kernels yet") && stderr.contains("fusec run"),
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
