//! Prefill graphs (issue 14) against the tiny Hugging Face references of every
//! family: the logits of every prompt position of one multi-token forward match the
//! fixture's `prefill_logits` (recorded by transformers from the same forward) to
//! 1e-4, eager and fused; and generation after a chunked prefill gives the same ids
//! as after a token-by-token prefill and as the fixture's `generated`.

mod common;

use std::path::Path;

use common::root;
use fusec::exec::{Executor, Prefill, Session, Weights};
use fusec::ir::Graph;
use fusec::model::blocks::{Logits, StepDims};
use fusec::model::ModelSpec;
use fusec::pipeline;

const FIXTURES: [&str; 10] = [
    "hf-tiny-llama-s0",
    "hf-tiny-llama3-rope-s0",
    "hf-tiny-mistral-window-s0",
    "hf-tiny-qwen2-s0",
    "hf-tiny-qwen3-s0",
    "hf-tiny-olmo2-s0",
    "hf-tiny-granite-s3",
    "hf-tiny-phi3-s0",
    "hf-tiny-gemma2-s0",
    "hf-tiny-gemma3-s0",
];

struct Fixture {
    spec: ModelSpec,
    prompt: Vec<i32>,
    generated: Vec<i32>,
    /// `[position][vocab]`.
    prefill_logits: Vec<Vec<f64>>,
}

fn fixture(name: &'static str) -> Fixture {
    let dir = root().join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let ids = |key: &str| -> Vec<i32> {
        json[key]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: `{key}` is a list"))
            .iter()
            .map(|v| v.as_i64().expect("an id") as i32)
            .collect()
    };
    let prefill_logits = json["prefill_logits"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: `prefill_logits` is a list"))
        .iter()
        .map(|row| {
            row.as_array()
                .expect("a row")
                .iter()
                .map(|v| v.as_f64().expect("a number"))
                .collect()
        })
        .collect();
    Fixture {
        spec: pipeline::load(&dir, None, None).expect("loads"),
        prompt: ids("prompt"),
        generated: ids("generated"),
        prefill_logits,
    }
}

fn weights(spec: &ModelSpec, graph: &Graph) -> Weights {
    let path: &Path = spec.weights.as_deref().expect("the fixture has weights");
    Weights::load(path, graph).expect("weights load")
}

fn session(graph: Graph, weights: &Weights) -> Session {
    Session::with_capacity(Executor::new(graph, weights).expect("plans"), 1, 64).expect("session")
}

fn prefill(graph: Graph, weights: &Weights) -> Prefill {
    Prefill::new(Executor::new(graph, weights).expect("plans")).expect("a prefill graph")
}

/// Largest relative error `|a - e| / max(|e|, 1)` over every position and id (the
/// measure of `scripts/check_reference.py`).
fn max_rel_err(actual: &[f32], expected: &[Vec<f64>]) -> f64 {
    let flat: Vec<f64> = expected.iter().flatten().copied().collect();
    assert_eq!(actual.len(), flat.len(), "logits count");
    actual
        .iter()
        .zip(&flat)
        .map(|(&a, &e)| (a as f64 - e).abs() / e.abs().max(1.0))
        .fold(0.0, f64::max)
}

/// One prefill of the whole prompt with every position's logits, eager and fused,
/// against transformers' multi-token forward.
#[test]
fn prefill_logits_match_transformers_for_every_family() {
    let rules = pipeline::rules(&[]).expect("rules");
    for name in FIXTURES {
        let f = fixture(name);
        let t = f.prompt.len() as u64;
        let dims = StepDims::prefill(t, Logits::All);
        let eager = pipeline::eager_prefill(&f.spec, &dims).expect("builds");
        let (fused, _) = pipeline::fuse(&f.spec, &eager, &rules).expect("fuses");
        let decode = pipeline::eager(&f.spec).expect("builds");
        let w = weights(&f.spec, &eager);
        let mut worst = Vec::new();
        for (kind, graph) in [("eager", eager), ("fused", fused)] {
            let mut s = session(decode.clone(), &w);
            let mut p = prefill(graph, &w);
            let out = s.prefill(&mut p, &f.prompt).expect("prefills");
            assert_eq!(out.logits.dim(), (1, f.prompt.len(), s.vocab()), "{name}");
            let logits = out.logits.as_slice().expect("contiguous");
            let err = max_rel_err(logits, &f.prefill_logits);
            assert!(err <= 1e-4, "{name} {kind}: max rel err {err:e} > 1e-4");
            assert_eq!(out.next[0], f.generated[0], "{name} {kind}: first token");
            assert_eq!(s.past_len(), f.prompt.len());
            worst.push(err);
        }
        eprintln!("{name}: eager {:.1e}, fused {:.1e}", worst[0], worst[1]);
    }
}

/// Chunked prefill (chunks of 2 and 3, and the whole prompt, the LM head on the last
/// position only) then greedy decoding gives the ids of token-by-token prefill and of
/// the fixture, for eager and fused graphs.
#[test]
fn generation_after_chunked_prefill_equals_token_by_token() {
    let rules = pipeline::rules(&[]).expect("rules");
    for name in FIXTURES {
        let f = fixture(name);
        let decode = pipeline::eager(&f.spec).expect("builds");
        let (decode_fused, _) = pipeline::fuse(&f.spec, &decode, &rules).expect("fuses");
        let w = weights(&f.spec, &decode);
        let n = f.generated.len();
        let reference = session(decode.clone(), &w)
            .generate(std::slice::from_ref(&f.prompt), n)
            .expect("decodes");
        assert_eq!(
            reference.generated[0], f.generated,
            "{name}: token by token"
        );
        for fused in [false, true] {
            let chunks: Vec<u64> = vec![f.prompt.len() as u64, 3, 2];
            let mut prefills: Vec<Prefill> = chunks
                .iter()
                .map(|&t| {
                    let g = pipeline::eager_prefill(&f.spec, &StepDims::prefill(t, Logits::Last))
                        .expect("builds");
                    let g = match fused {
                        true => pipeline::fuse(&f.spec, &g, &rules).expect("fuses").0,
                        false => g,
                    };
                    prefill(g, &w)
                })
                .collect();
            // The whole prompt at once, then 3 + 2, then 2 + 2 + one decode step.
            for (skip, first) in chunks.iter().enumerate() {
                let decoder = match fused {
                    true => decode_fused.clone(),
                    false => decode.clone(),
                };
                let mut s = session(decoder, &w);
                let mut use_: Vec<&mut Prefill> = prefills.iter_mut().skip(skip).collect();
                let (gen, stats) = s
                    .generate_prefilled(&mut use_, std::slice::from_ref(&f.prompt), n)
                    .expect("generates");
                assert_eq!(
                    gen.generated[0], f.generated,
                    "{name} fused={fused}, chunks from {first}"
                );
                assert_eq!(stats.tokens, f.prompt.len() as u64);
                let expected_steps = match skip {
                    0 => 1,
                    1 => 2,
                    _ => 3,
                };
                assert_eq!(stats.steps, expected_steps, "{name}");
                // The first generated token's logits are the last prompt position's.
                let err = max_rel_err(gen.row(0, 0), &f.prefill_logits[f.prompt.len() - 1..]);
                assert!(err <= 1e-4, "{name}: last prompt position {err:e}");
            }
        }
    }
}

/// A prompt longer than a sliding window, prefilled in chunks that wrap the ring,
/// decodes as token-by-token prefill does (Mistral's window is 8; 13 prompt tokens).
#[test]
fn chunked_prefill_past_the_window() {
    let f = fixture("hf-tiny-mistral-window-s0");
    let prompt: Vec<i32> = f.prompt.iter().chain(&f.generated[..8]).copied().collect();
    let decode = pipeline::eager(&f.spec).expect("builds");
    let w = weights(&f.spec, &decode);
    let reference = session(decode.clone(), &w)
        .generate(std::slice::from_ref(&prompt), 6)
        .expect("decodes");
    assert_eq!(reference.generated[0], f.generated[8..14]);
    for chunk in [13u64, 10, 6, 4] {
        let g = pipeline::eager_prefill(&f.spec, &StepDims::prefill(chunk, Logits::Last))
            .expect("builds");
        let mut p = prefill(g, &w);
        let mut s = session(decode.clone(), &w);
        let (gen, _) = s
            .generate_prefilled(&mut [&mut p], std::slice::from_ref(&prompt), 6)
            .expect("generates");
        assert_eq!(gen.generated[0], reference.generated[0], "chunk {chunk}");
        let err = max_rel_err(
            gen.row(0, 0),
            &[reference.row(0, 0).iter().map(|&v| v as f64).collect()],
        );
        assert!(err <= 1e-4, "chunk {chunk}: {err:e}");
    }
}

/// A prefill graph's interface: `[B,T]` ids, a `[B,1,T,S+T]` mask, caches from `S`
/// to `S+T`, and logits of the last position unless every position is asked for.
#[test]
fn prefill_graph_interface() {
    let f = fixture("hf-tiny-gemma2-s0");
    let g = pipeline::eager_prefill(&f.spec, &StepDims::prefill(7, Logits::Last)).expect("builds");
    let ty = |name: &str| {
        let id = g.input(name).expect("input");
        g.ty(id).tensor().expect("tensor").to_string()
    };
    assert_eq!(ty("input_ids"), "i32[B,7]");
    assert_eq!(ty("attention_mask"), "f32[B,1,7,S+7]");
    assert_eq!(ty("attention_mask.window8"), "f32[B,1,7,min(S+7,15)]");
    assert_eq!(ty("past.0.key"), "f32[B,2,min(S,8),16]");
    let out = |name: &str| {
        let o = g.output(name).expect("output");
        g.ty(o.value).tensor().expect("tensor").to_string()
    };
    assert_eq!(out("past.0.key"), "f32[B,2,min(S+7,8),16]");
    assert_eq!(out("past.1.key"), "f32[B,2,S+7,16]");
    assert!(out("logits").starts_with("f32[B,1,"), "{}", out("logits"));
    let all = pipeline::eager_prefill(&f.spec, &StepDims::prefill(7, Logits::All)).expect("builds");
    let o = all.output("logits").expect("logits");
    assert!(all.ty(o.value).to_string().starts_with("f32[B,7,"));
}

/// Every family's prefill graph prints and parses back to the same text, and fusion
/// fires on it: the fused graph launches fewer kernels than the eager one (the rules'
/// norm prologues, SwiGLU and residual epilogues hold for `T` rows as for one), and
/// its logits equal the eager graph's (`prefill_logits_match_transformers_...`).
#[test]
fn prefill_graphs_print_parse_and_fuse() {
    let rules = pipeline::rules(&[]).expect("rules");
    for name in FIXTURES {
        let f = fixture(name);
        let eager =
            pipeline::eager_prefill(&f.spec, &StepDims::prefill(6, Logits::Last)).expect("builds");
        let text = fusec::ir::text::print(&eager).expect("prints");
        let back = fusec::ir::text::parse(&text).expect("parses");
        assert_eq!(
            fusec::ir::text::print(&back).expect("prints"),
            text,
            "{name}"
        );
        let (fused, _) = pipeline::fuse(&f.spec, &eager, &rules).expect("fuses");
        let b = fusec::ir::step::bindings(1, 3);
        let launches = |g: &Graph| {
            fusec::ir::cost::graph_cost(g, &b)
                .expect("bound")
                .total
                .launches
        };
        let (e, u) = (launches(&eager), launches(&fused));
        eprintln!("{name}: eager {e} launches, fused {u}");
        assert!(u < e, "{name}: fused {u} launches, eager {e}");
    }
}

/// `fusec run --prefill-chunk 2`: chunks of 2, 2 and a decode step for the last
/// token; the fixture's ids and logits, and the prefill's figures in `--json`.
#[test]
fn run_prefills_in_chunks() {
    let dir = root().join("tests/fixtures/hf-tiny-llama-s0");
    let f = fixture("hf-tiny-llama-s0");
    let out = common::scratch("prefill-run").join("out.json");
    let args = [
        "run",
        dir.to_str().expect("utf-8"),
        "--prompt-ids",
        "1,17,42,99,7",
        "--tokens",
        "16",
        "--prefill-chunk",
        "2",
        "--json",
        out.to_str().expect("utf-8"),
        "--force",
    ];
    let run = common::fusec(&args);
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("time to first token"),
        "{stdout}{stderr}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("written")).expect("JSON");
    let generated: Vec<i32> = json["generated"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_i64().expect("id") as i32)
        .collect();
    assert_eq!(generated, f.generated);
    let first: Vec<f32> = json["logits"][0]
        .as_array()
        .expect("row")
        .iter()
        .map(|v| v.as_f64().expect("logit") as f32)
        .collect();
    let err = max_rel_err(&first, &f.prefill_logits[f.prompt.len() - 1..]);
    assert!(err <= 1e-4, "{err:e}");
    let p = &json["stats"]["prefill"];
    assert_eq!(p["chunk"], 2);
    assert_eq!(p["tokens"], 5);
    assert_eq!(
        p["steps"], 3,
        "2 + 2 through the prefill graph, 1 decode step"
    );
    assert!(p["time_to_first_token_ms"].as_f64().expect("ms") > 0.0);
    assert!(p["tokens_per_s"].as_f64().expect("rate") > 0.0);
    // Every step is a graph run: 3 for the prompt, 15 for the generated tokens.
    assert_eq!(json["stats"]["steps"], 18);
    // A chunk of 0 tokens is refused.
    let mut bad = args;
    bad[7] = "0";
    let run = common::fusec(&bad);
    assert_eq!(
        run.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
