//! Fuzz targets for every parser, on the stable toolchain (the text IR, `model.toml`,
//! `config.json`, rule files, safetensors headers, GGUF files, GPU files and measurement
//! files):
//! property tests that mutate
//! the seed corpus in `tests/fuzz/corpus/` (and the bundled examples) and assert that
//! parsing never panics, that every rejection is a typed error that says where, and
//! that what a parser accepts goes through the next stages (graph building, the cost
//! model, fusion, the weight loader) without a panic either. This is Cranelift's
//! approach of fuzzing its parsers and verifier, with proptest's mutations instead of
//! libFuzzer's.
//!
//! `cargo test` runs each target on `FUSEC_FUZZ_CASES` inputs (default 48, seconds in
//! CI); a longer session is `FUSEC_FUZZ_CASES=20000 cargo test --release --test
//! fuzz_parsers`. A finding is shrunk by proptest and printed as the failing input.

mod common;

use std::path::{Path, PathBuf};

use fusec::ir::cost::graph_cost;
use fusec::ir::step::bindings_for_context;
use fusec::ir::text;
use fusec::model::Registry;
use fusec::rewrite::RuleSet;
use fusec::weights::Weights;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use common::root;

/// Values that broke parsers before: huge, negative, non-finite, empty, deep.
const INTERESTING: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "-0.0",
    "1e999",
    "-1e999",
    "1e-300",
    "3e38",
    "NaN",
    "nan",
    "inf",
    "65536",
    "1048577",
    "4611686018427387904",
    "9223372036854775807",
    "18446744073709551615",
    "340282366920938463463374607431768211456",
    "\"\"",
    "\"../../x\"",
    "\"/abs/dir\"",
    "\"linear\"",
    "null",
    "true",
    "[]",
    "{}",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "=",
    ",",
    "\n",
    "%",
    "?x",
    "$d",
    "_",
    "=>",
    "if",
    "rule r",
    "#",
    ";",
    "\u{0}",
    "\u{fffd}",
];

fn cases() -> u32 {
    std::env::var("FUSEC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// The seed files of one kind: `tests/fuzz/corpus/<kind>/*` plus `extra`.
fn seeds(kind: &str, extra: &[PathBuf]) -> Vec<String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fuzz/corpus").join(kind))
        .expect("corpus directory")
        .map(|e| e.expect("entry").path())
        .collect();
    paths.extend_from_slice(extra);
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("seed"))
        .collect()
}

/// One edit of a seed.
#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the token (a run of alphanumerics, `.`, `-`, `+`) around a position.
    Token(usize, usize),
    /// Insert an interesting string.
    Insert(usize, usize),
    /// Delete a byte range.
    Delete(usize, usize),
    /// Repeat a byte range many times (deep nesting, long lists).
    Repeat(usize, usize, usize),
    /// Set one byte.
    Byte(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let n = INTERESTING.len();
    prop_oneof![
        4 => (any::<usize>(), 0..n).prop_map(|(a, b)| Mutation::Token(a, b)),
        2 => (any::<usize>(), 0..n).prop_map(|(a, b)| Mutation::Insert(a, b)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(a, b)| Mutation::Delete(a, b)),
        1 => (any::<usize>(), 1usize..24, 1usize..3000).prop_map(|(a, b, c)| Mutation::Repeat(a, b, c)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Byte(a, b)),
    ]
}

/// The byte at or after `at` that starts a character.
fn boundary(s: &[u8], at: usize) -> usize {
    let mut i = at.min(s.len());
    while i < s.len() && (s[i] & 0xC0) == 0x80 {
        i += 1;
    }
    i
}

fn apply(seed: &str, muts: &[Mutation]) -> String {
    let mut s = seed.as_bytes().to_vec();
    for m in muts {
        let len = s.len().max(1);
        match *m {
            Mutation::Token(at, v) => {
                let at = at % len;
                let word =
                    |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'_');
                let (mut a, mut b) = (at.min(s.len()), at.min(s.len()));
                while a > 0 && word(s[a - 1]) {
                    a -= 1;
                }
                while b < s.len() && word(s[b]) {
                    b += 1;
                }
                s.splice(a..b, INTERESTING[v].bytes());
            }
            Mutation::Insert(at, v) => {
                let at = boundary(&s, at % len);
                s.splice(at..at, INTERESTING[v].bytes());
            }
            Mutation::Delete(at, n) => {
                let a = boundary(&s, at % len);
                let b = boundary(&s, a + n);
                s.drain(a..b);
            }
            Mutation::Repeat(at, n, times) => {
                let a = boundary(&s, at % len);
                let b = boundary(&s, a + n);
                let piece = s[a..b].to_vec();
                let repeated: Vec<u8> = piece
                    .iter()
                    .copied()
                    .cycle()
                    .take(piece.len() * times)
                    .collect();
                s.splice(a..a, repeated);
            }
            Mutation::Byte(at, v) => {
                if !s.is_empty() {
                    let at = at % s.len();
                    s[at] = v;
                }
            }
        }
    }
    String::from_utf8_lossy(&s).into_owned()
}

fn inputs(seeds: Vec<String>) -> impl Strategy<Value = String> {
    let n = seeds.len();
    (0..n, proptest::collection::vec(mutation(), 1..6))
        .prop_map(move |(i, muts)| apply(&seeds[i], &muts))
}

/// A graph the frontends accept must build, verify and cost without a panic; its
/// depth is bounded so that a case stays fast.
fn downstream(spec: &fusec::model::ModelSpec) {
    if spec.model.num_layers > 64 {
        return;
    }
    let Ok(graph) = fusec::pipeline::eager(spec) else {
        return;
    };
    let b = bindings_for_context(spec.decode.batch, spec.decode.context);
    let cost = graph_cost(&graph, &b).expect("bound symbols");
    // No count wrapped around: the eager step moves at least its memory floor.
    assert!(
        cost.total.bytes() >= cost.floor.total() && cost.floor.total() > 0,
        "{}: {} bytes against a floor of {}",
        spec.model.name,
        cost.total.bytes(),
        cost.floor.total()
    );
}

#[test]
fn fuzz_model_toml() {
    let extra: Vec<PathBuf> = common::examples()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    let path = root().join("examples/fuzz.toml");
    runner()
        .run(&inputs(seeds("toml", &extra)), |src| {
            match Registry::builtin().parse_model_toml(&path, &src) {
                Ok(spec) => downstream(&spec),
                Err(e) => prop_assert!(e.to_string().starts_with(&*path.to_string_lossy()), "{e}"),
            }
            Ok(())
        })
        .expect("no finding");
}

#[test]
fn fuzz_config_json() {
    let extra: Vec<PathBuf> = common::examples()
        .into_iter()
        .filter(|p| p.is_dir())
        .map(|p| p.join("config.json"))
        .collect();
    let path = root().join("examples/fuzz/config.json");
    runner()
        .run(&inputs(seeds("json", &extra)), |src| {
            match Registry::builtin().parse_hf_config(&path, &src) {
                Ok(spec) => downstream(&spec),
                Err(e) => prop_assert!(e.to_string().starts_with(&*path.to_string_lossy()), "{e}"),
            }
            Ok(())
        })
        .expect("no finding");
}

#[test]
fn fuzz_text_ir() {
    runner()
        .run(&inputs(seeds("fir", &[])), |src| {
            match text::parse(&src) {
                Ok(graph) => {
                    // Whatever parses prints, and its costs are computed, without a
                    // panic; a graph that verifies round-trips.
                    let printed = text::print(&graph);
                    if fusec::ir::verify(&graph).is_ok() {
                        let printed = printed.expect("a verified graph prints");
                        let again = text::parse(&printed).expect("printed text parses");
                        prop_assert_eq!(text::print(&again).expect("prints"), printed);
                        let _ = graph_cost(&graph, &bindings_for_context(3, 9));
                    }
                }
                Err(e) => prop_assert!(e.to_string().contains(':'), "{e}"),
            }
            Ok(())
        })
        .expect("no finding");
}

#[test]
fn fuzz_rule_files() {
    let extra: Vec<PathBuf> = std::fs::read_dir(root().join("crates/fusec-rewrite/rules"))
        .expect("rules")
        .map(|e| e.expect("entry").path())
        .collect();
    let spec = fusec::pipeline::load(&root().join("examples/tiny.toml"), None, None).expect("tiny");
    runner()
        .run(&inputs(seeds("rules", &extra)), |src| {
            let mut set = RuleSet::builtin().expect("built-in rules");
            match set.add_file("fuzz.rules", &src) {
                // Accepted rules fuse the tiny model: a rule that misbehaves where it
                // matches is a typed error, never a panic.
                Ok(()) => {
                    let eager = fusec::pipeline::eager(&spec).expect("tiny builds");
                    let _ = fusec::pipeline::fuse(&spec, &eager, &set);
                }
                Err(e) => prop_assert!(e.to_string().starts_with("fuzz.rules:"), "{e}"),
            }
            Ok(())
        })
        .expect("no finding");
}

/// The fixture's safetensors with its JSON header mutated (the tensor data kept).
#[test]
fn fuzz_safetensors_headers() {
    let fixture = root().join("tests/fixtures/hf-tiny-llama-s0");
    let bytes = std::fs::read(fixture.join("model.safetensors")).expect("fixture");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).expect("utf-8 header");
    let data = bytes[8 + n..].to_vec();
    let spec = fusec::pipeline::load(&fixture, None, None).expect("fixture");
    let graph = fusec::pipeline::eager(&spec).expect("builds");
    let dir = common::scratch("fuzz-safetensors");
    let file = dir.join("model.safetensors");
    let write = |header: &str, lie: Option<u64>, path: &Path| {
        let mut out = lie.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&data);
        std::fs::write(path, out).expect("write");
    };
    let lies = prop_oneof![
        4 => Just(None),
        1 => any::<u64>().prop_map(Some),
    ];
    runner()
        .run(&(inputs(vec![header]), lies), |(h, lie)| {
            write(&h, lie, &file);
            if let Err(e) = Weights::load(&file, &graph) {
                prop_assert!(e.to_string().contains("model.safetensors"), "{e}");
            }
            let _ = Weights::metadata(&file);
            Ok(())
        })
        .expect("no finding");
}

/// One edit of a GGUF file's bytes.
#[derive(Clone, Debug)]
enum ByteEdit {
    /// Set one byte (a type code, a length's low byte, a character).
    Byte(usize, u8),
    /// Write a little-endian `u64` (a count, length, offset or dimension) at a position.
    Word(usize, u64),
    /// Cut the file at a position.
    Truncate(usize),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    let word = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(1 << 32),
        Just(1 << 62),
        any::<u64>(),
    ];
    prop_oneof![
        6 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Byte(i, b)),
        3 => (any::<usize>(), word).prop_map(|(i, w)| ByteEdit::Word(i, w)),
        1 => any::<usize>().prop_map(ByteEdit::Truncate),
    ]
}

/// The tiny fixture as a GGUF file (tests/common/tiny_gguf.rs) with its bytes edited,
/// mostly in the header and metadata where the lengths and counts live: opening,
/// reading the model config, the tokenizer and the weights never panic, and every
/// rejection names the file.
#[test]
fn fuzz_gguf_files() {
    let dir = common::scratch("fuzz-gguf");
    let seed = std::fs::read(common::tiny_gguf::tiny_gguf(&dir, |_| {})).expect("seed");
    // The metadata and tensor infos end where the first tensor's data starts; edits
    // land there nine times in ten.
    let header = seed.len().min(8 << 10);
    let file = dir.join("fuzzed.gguf");
    let name = file.to_string_lossy().into_owned();
    let edits = proptest::collection::vec((byte_edit(), 0u8..10), 1..6);
    runner()
        .run(&edits, |edits| {
            let mut bytes = seed.clone();
            for (edit, in_header) in edits {
                let span = if in_header < 9 { header } else { bytes.len() };
                let at = |i: usize| i % span.clamp(1, bytes.len().max(1));
                match edit {
                    ByteEdit::Byte(i, b) => {
                        let i = at(i);
                        if let Some(x) = bytes.get_mut(i) {
                            *x = b;
                        }
                    }
                    ByteEdit::Word(i, w) => {
                        let i = at(i);
                        let end = (i + 8).min(bytes.len());
                        bytes[i..end].copy_from_slice(&w.to_le_bytes()[..end - i]);
                    }
                    ByteEdit::Truncate(i) => bytes.truncate(at(i)),
                }
            }
            std::fs::write(&file, &bytes).expect("write");
            let names_file = |e: &dyn std::fmt::Display| e.to_string().contains(&name);
            match fusec::gguf::GgufFile::open(&file) {
                Err(e) => prop_assert!(names_file(&e), "{e}"),
                Ok(_) => {
                    let _ = fusec::text::Tokenizer::for_model(&file);
                    match fusec::pipeline::load(&file, None, None) {
                        Err(e) => prop_assert!(names_file(&e), "{e}"),
                        Ok(spec) if spec.model.num_layers <= 64 => {
                            if let Ok(graph) = fusec::pipeline::eager(&spec) {
                                if let Err(e) = Weights::load(&file, &graph) {
                                    prop_assert!(names_file(&e), "{e}");
                                }
                            }
                        }
                        Ok(_) => {}
                    }
                }
            }
            Ok(())
        })
        .expect("no finding");
}

#[test]
fn fuzz_gpu_files() {
    let path = root().join("examples/fuzz-gpus.toml");
    runner()
        .run(&inputs(seeds("gpus", &[])), |src| {
            match fusec::model::frontend::parse_gpu_file(&path, &src) {
                Ok(gpus) => {
                    for g in gpus {
                        prop_assert!(g.hbm_gbs.is_finite() && g.hbm_gbs > 0.0, "{g:?}");
                    }
                }
                Err(e) => prop_assert!(e.to_string().starts_with(&*path.to_string_lossy()), "{e}"),
            }
            Ok(())
        })
        .expect("no finding");
}

#[test]
fn fuzz_measurement_files() {
    let path = root().join("examples/fuzz-measurements.toml");
    runner()
        .run(&inputs(seeds("measurements", &[])), |src| {
            if let Err(e) = fusec::report::parse_measurements(&path, &src) {
                prop_assert!(e.to_string().contains("fuzz-measurements.toml"), "{e}");
            }
            Ok(())
        })
        .expect("no finding");
}
