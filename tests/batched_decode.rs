//! Batched decode on a real checkpoint (the Hugging Face fixture `hf-tiny-llama-s0`):
//! eight sequences with different prompts decoded together give each sequence exactly
//! the ids it gets decoded alone, and its logits bit for bit (so well within the 1e-5
//! relative error the batch invariant allows), eager and fused, in f32 and bf16. The
//! batched GEMVs read each weight row once for every sequence
//! (`fusec_exec::kernels::rowdot::Activations::dots_rows`) but keep each sequence's
//! summation order.

mod common;

use fusec::exec::{Executor, Generation, Session, SplitMix64};
use fusec::pipeline;
use fusec::weights::Weights;
use fusec_ir::Graph;
use fusec_model::frontend::Precision;
use fusec_rewrite::precision::Fp8Options;

const BATCH: usize = 8;
const PROMPT: usize = 5;
const NEW: usize = 12;

fn decode(graph: &Graph, weights: &Weights, prompts: &[Vec<i32>]) -> Generation {
    let exec = Executor::new(graph.clone(), weights).expect("plans");
    Session::with_capacity(exec, prompts.len(), PROMPT + NEW)
        .expect("session")
        .generate(prompts, NEW)
        .expect("decodes")
}

/// The relative L2 error of `a` against `b`.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (f64::from(x) - f64::from(y)).powi(2);
        den += f64::from(y).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

#[test]
fn a_batch_of_eight_gives_each_sequence_its_batch_1_ids_and_logits() {
    let spec = pipeline::load(
        &common::root().join("tests/fixtures/hf-tiny-llama-s0"),
        None,
        None,
    )
    .expect("fixture loads");
    let path = spec.weights.clone().expect("the fixture has weights");
    let rules = pipeline::rules(&[]).expect("built-in rules");
    // Eight different prompts of one length (the session advances them in lockstep).
    let mut rng = SplitMix64::new(8);
    let prompts: Vec<Vec<i32>> = (0..BATCH)
        .map(|_| {
            (0..PROMPT)
                .map(|_| rng.below(spec.model.vocab_size) as i32)
                .collect()
        })
        .collect();
    let graphs = [
        ("eager f32", pipeline::eager(&spec).expect("builds")),
        (
            "fused f32",
            pipeline::fused_in(&spec, Precision::F32, &rules, &Fp8Options::default())
                .expect("compiles")
                .0,
        ),
        (
            "fused bf16",
            pipeline::fused_in(&spec, Precision::Bf16, &rules, &Fp8Options::default())
                .expect("compiles")
                .0,
        ),
    ];
    for (name, graph) in &graphs {
        let weights = Weights::load(&path, graph).expect("loads");
        let batch = decode(graph, &weights, &prompts);
        assert_eq!(batch.generated.len(), BATCH);
        let mut distinct = batch.generated.clone();
        distinct.sort();
        distinct.dedup();
        assert!(
            distinct.len() > 1,
            "{name}: the prompts should lead to different continuations"
        );
        for (s, prompt) in prompts.iter().enumerate() {
            let alone = decode(graph, &weights, std::slice::from_ref(prompt));
            assert_eq!(
                batch.generated[s], alone.generated[0],
                "{name}: sequence {s}'s ids"
            );
            for (t, (got, want)) in batch.rows(s).zip(alone.rows(0)).enumerate() {
                let err = rel_err(got, want);
                assert!(err <= 1e-5, "{name}: sequence {s}, token {t}: {err}");
                assert!(
                    got.iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name}: sequence {s}, token {t}: logits not bit-identical (rel. err {err})"
                );
            }
        }
    }
}
