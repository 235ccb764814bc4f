//! The shipped reference checker, `scripts/check_reference.py`, accepts what `fusec run`
//! writes for the Hugging Face fixture, eager and fused: the same check the README
//! tells users to run. The checker is stdlib Python; a missing `python3` fails the test
//! (it is a dependency of the test suite, not an optional extra).

mod common;

use std::path::Path;
use std::process::Command;

use common::{fusec, root, scratch};

/// Runs the fixture's greedy decode with `extra` flags and the checker on the result;
/// returns the checker's last line.
fn checked(name: &str, extra: &[&str]) -> String {
    let fixture = root().join("tests/fixtures/hf-tiny-llama-s0");
    let expected_path = fixture.join("expected.json");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&expected_path).expect("the fixture's expected.json"),
    )
    .expect("valid JSON");
    let prompt: Vec<String> = expected["prompt"]
        .as_array()
        .expect("a prompt")
        .iter()
        .map(|t| t.to_string())
        .collect();
    let tokens = expected["new_tokens"].to_string();
    let out_path = scratch(&format!("reference-{name}")).join("out.json");
    let (fixture_s, out_s) = (path_str(&fixture), path_str(&out_path));
    let prompt = prompt.join(",");
    let mut args = vec![
        "run",
        fixture_s,
        "--prompt-ids",
        &prompt,
        "--tokens",
        &tokens,
        "--json",
        out_s,
    ];
    args.extend_from_slice(extra);
    let run = fusec(&args);
    assert!(
        run.status.success(),
        "fusec {args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let check = Command::new("python3")
        .arg(root().join("scripts/check_reference.py"))
        .arg(&expected_path)
        .arg(&out_path)
        .output()
        .expect("python3 runs: the reference check needs it");
    let stdout = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.status.success(),
        "check_reference.py failed:\n{stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    stdout.lines().last().unwrap_or_default().to_string()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn the_reference_checker_accepts_the_eager_run() {
    let last = checked("eager", &["--no-fuse"]);
    assert!(last.starts_with("ok:"), "{last}");
}

#[test]
fn the_reference_checker_accepts_the_fused_run() {
    let last = checked("fused", &[]);
    assert!(last.starts_with("ok:"), "{last}");
}

#[test]
fn the_reference_checker_rejects_a_wrong_run() {
    // The checker is the test's oracle: it must be able to fail. Compare the fixture's
    // own expectation with a copy whose first generated id is changed.
    let expected_path = root().join("tests/fixtures/hf-tiny-llama-s0/expected.json");
    let mut wrong: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&expected_path).expect("the fixture's expected.json"),
    )
    .expect("valid JSON");
    let first = wrong["generated"][0].as_u64().expect("an id");
    wrong["generated"][0] = serde_json::json!((first + 1) % 256);
    let path = scratch("reference-wrong").join("wrong.json");
    std::fs::write(&path, wrong.to_string()).expect("writes");
    let check = Command::new("python3")
        .arg(root().join("scripts/check_reference.py"))
        .arg(&expected_path)
        .arg(&path)
        .output()
        .expect("python3 runs: the reference check needs it");
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("FAIL:")),
        "{stdout}"
    );
}
