//! Random sizes and arguments thrown at the command line: every invocation must end
//! within a minute with exit 0 or exit 2 and no panic (exit 101) or abort (a signal).
//! `FUSEC_FUZZ_CASES` sets the number of invocations (default 24).

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use common::{root, scratch};

/// Numbers at and around the edges: zero, the limits, the integer widths.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (0u64..40).prop_map(|v| v.to_string()),
        1 => (0u64..=u64::MAX).prop_map(|v| v.to_string()),
        2 => proptest::sample::select(vec![
            "0", "1", "65536", "65537", "16777216", "16777217", "4294967296",
            "4611686018427387904", "9223372036854775807", "18446744073709551615",
            "18446744073709551616", "-1", "1e3", "",
        ])
        .prop_map(str::to_string),
    ]
}

/// One invocation: a subcommand on a bundled model with some of its size flags.
fn invocation() -> impl Strategy<Value = Vec<String>> {
    let model = proptest::sample::select(vec![
        "examples/tiny.toml",
        "tests/fixtures/hf-tiny-llama-s0",
        "examples/llama-3-8b.toml",
    ]);
    (
        0usize..5,
        model,
        proptest::collection::vec((0usize..6, number()), 0..4),
    )
        .prop_map(|(cmd, model, flags)| {
            let mut args: Vec<String> = vec![
                ["compile", "run", "bench", "report", "accuracy"][cmd].to_string(),
                root().join(model).display().to_string(),
            ];
            match cmd {
                0 => args.extend(["--out".into(), scratch("fuzz-cli").display().to_string()]),
                1 => args.extend([
                    "--prompt-ids".into(),
                    "1,2".into(),
                    "--max-memory".into(),
                    "2G".into(),
                ]),
                2 => args.extend([
                    "--max-memory".into(),
                    "2G".into(),
                    "--rounds".into(),
                    "1".into(),
                ]),
                4 => args.extend([
                    "--prompt-ids".into(),
                    "1,2".into(),
                    "--precisions".into(),
                    "bf16".into(),
                    "--max-memory".into(),
                    "2G".into(),
                ]),
                _ => {}
            }
            let names: &[&str] = match cmd {
                0 => &[
                    "--context",
                    "--batch",
                    "--context",
                    "--batch",
                    "--batch",
                    "--context",
                ],
                1 => &[
                    "--tokens",
                    "--tokens",
                    "--seed",
                    "--max-memory",
                    "--tokens",
                    "--seed",
                ],
                2 => &[
                    "--context",
                    "--steps",
                    "--rounds",
                    "--seed",
                    "--steps",
                    "--context",
                ],
                4 => &[
                    "--tokens",
                    "--seed",
                    "--tokens",
                    "--max-memory",
                    "--tokens",
                    "--seed",
                ],
                _ => &[
                    "--context",
                    "--batch",
                    "--price-per-hour",
                    "--context",
                    "--batch",
                    "--batch",
                ],
            };
            for (i, v) in flags {
                args.push(names[i].to_string());
                args.push(v);
            }
            args
        })
}

/// Runs fusec with a deadline; `None` if it had to be killed.
fn run_with_deadline(args: &[String], deadline: Duration) -> Option<(Option<i32>, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fusec"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fusec starts");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Some((status.code(), err));
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn random_sizes_end_in_exit_0_or_2() {
    let cases = std::env::var("FUSEC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&invocation(), |args| {
            let outcome = run_with_deadline(&args, Duration::from_secs(60));
            prop_assert!(outcome.is_some(), "hung: fusec {args:?}");
            if let Some((code, err)) = outcome {
                prop_assert!(
                    matches!(code, Some(0) | Some(2)),
                    "fusec {args:?} exited with {code:?}: {err}"
                );
                prop_assert!(!err.contains("panicked"), "fusec {args:?}: {err}");
            }
            Ok(())
        })
        .expect("no finding");
}
