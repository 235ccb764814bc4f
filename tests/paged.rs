//! Ragged batched decoding over a paged KV cache (`StepDims::paged`,
//! `fused.paged_attention`, `fusec::exec::PagedSession`), against the dense session:
//!
//! - sequences of different prompt lengths join at different steps and leave, new
//!   ones take the freed blocks, and every sequence generates exactly the ids it
//!   generates alone in a dense `Session` at batch 1, its logits within 1e-5
//!   relative, eager and fused, for Llama, Qwen2, Qwen3, Phi-3, OLMo 2, Granite, Gemma 3 (sliding
//!   and global layers mixed) and Mistral's sliding window; Gemma 2's soft-capped
//!   attention refuses a paged step;
//! - the blocks in use equal what the live sequences need after every step (whole
//!   blocks of their positions; for a window only those the next step reads), and a
//!   windowed model's stay bounded however long a sequence grows;
//! - prompt chunks mixed with decodes in one step (`step_chunks_into`: a row per
//!   token) give every row bit for bit the logits of feeding the sequence alone one
//!   token a step, with a window's blocks freed as they fall out of it;
//! - bad requests are typed errors that leave the session as it was;
//! - the paged graph verifies, prints and parses back, and fuses like the dense step.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::root;
use fusec::exec::{Executor, PagedConfig, PagedError, PagedSession, SeqId, Session, Weights};
use fusec::pipeline;
use fusec_ir::{FusedOp, Graph, Op};
use fusec_model::blocks::StepDims;
use fusec_model::frontend::ModelSpec;

/// Positions per block: small, so that the tiny prompts span several blocks.
const BLOCK: u64 = 4;

struct Model {
    spec: ModelSpec,
    dense: Graph,
    paged: Graph,
    weights: Weights,
}

fn model(fixture: &str, fused: bool) -> Model {
    let spec = pipeline::load(&root().join(fixture), None, None).expect("loads");
    let dense = pipeline::eager(&spec).expect("builds");
    let paged = pipeline::eager_prefill(&spec, &StepDims::paged(BLOCK)).expect("builds paged");
    let path: &Path = spec.weights.as_deref().expect("weights");
    let weights = Weights::load(path, &dense).expect("weights load");
    let (dense, paged) = match fused {
        false => (dense, paged),
        true => {
            let rules = pipeline::rules(&[]).expect("rules");
            let d = pipeline::fuse(&spec, &dense, &rules).expect("fuses").0;
            let p = pipeline::fuse(&spec, &paged, &rules)
                .expect("fuses paged")
                .0;
            (d, p)
        }
    };
    Model {
        spec,
        dense,
        paged,
        weights,
    }
}

impl Model {
    fn session(&self, config: PagedConfig) -> PagedSession {
        let exec = Executor::new(self.paged.clone(), &self.weights).expect("plans");
        PagedSession::new(exec, config).expect("paged session")
    }

    /// `prompt` alone in the dense session: the generated ids and each one's logits.
    fn alone(&self, prompt: &[i32], tokens: usize) -> (Vec<i32>, Vec<Vec<f32>>) {
        let exec = Executor::new(self.dense.clone(), &self.weights).expect("plans");
        let mut s = Session::with_capacity(exec, 1, 64).expect("session");
        let g = s.generate(&[prompt.to_vec()], tokens).expect("generates");
        let rows = g.rows(0).map(<[f32]>::to_vec).collect();
        (g.generated[0].clone(), rows)
    }
}

/// Largest `|a - e| / max(|e|, 1)` (the measure of `scripts/check_reference.py`).
fn rel_err(a: &[f32], e: &[f32]) -> f64 {
    assert_eq!(a.len(), e.len());
    a.iter()
        .zip(e)
        .map(|(&a, &e)| ((a - e).abs() / e.abs().max(1.0)) as f64)
        .fold(0.0, f64::max)
}

/// A join: at step `at`, a sequence with `prompt` that leaves once it has generated
/// `tokens` tokens.
struct Join {
    at: usize,
    prompt: Vec<i32>,
    tokens: usize,
}

/// The schedule: four sequences, prompts of 3, 7, 1 and 5 tokens, joining at steps
/// 0, 2, 5 and 9 (the last after the first has left and freed its blocks).
fn schedule() -> Vec<Join> {
    vec![
        Join {
            at: 0,
            prompt: vec![1, 17, 42],
            tokens: 6,
        },
        Join {
            at: 2,
            prompt: vec![5, 9, 33, 2, 61, 7, 12],
            tokens: 10,
        },
        Join {
            at: 5,
            prompt: vec![3],
            tokens: 12,
        },
        Join {
            at: 9,
            prompt: vec![8, 8, 40, 21, 90],
            tokens: 9,
        },
    ]
}

/// What each join of a ragged run generated: its ids and their logits rows.
struct Ragged {
    generated: Vec<Vec<i32>>,
    logits: Vec<Vec<Vec<f32>>>,
}

/// Runs `joins` through a paged session, checking the blocks after every step.
fn run_ragged(m: &Model, joins: &[Join], config: PagedConfig) -> Ragged {
    let mut s = m.session(config);
    let mut ids: BTreeMap<SeqId, usize> = BTreeMap::new();
    let mut generated = vec![Vec::new(); joins.len()];
    let mut logits = vec![Vec::new(); joins.len()];
    let mut step = 0;
    while step < 200 {
        for (j, join) in joins.iter().enumerate() {
            if join.at == step {
                ids.insert(s.add(&join.prompt).expect("joins"), j);
            }
        }
        if ids.is_empty() && joins.iter().all(|j| j.at < step) {
            break;
        }
        let out = s.step().expect("steps");
        assert_eq!(out.outputs.len(), ids.len(), "every live sequence runs");
        for o in &out.outputs {
            let j = ids[&o.seq];
            if o.generated {
                generated[j].push(o.next);
                logits[j].push(out.logits_of(o.seq).expect("a row").to_vec());
            }
        }
        // Sequences that are done leave; their blocks go back to the pool.
        let done: Vec<SeqId> = ids
            .iter()
            .filter(|(_, &j)| generated[j].len() == joins[j].tokens)
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            let j = ids.remove(&id).expect("live");
            assert_eq!(s.remove(id).expect("removes"), generated[j]);
        }
        assert_eq!(
            s.blocks_in_use(),
            s.blocks_needed(),
            "step {step}: blocks in use are what the live sequences need"
        );
        step += 1;
    }
    assert_eq!(s.blocks_in_use(), 0, "every block back once all have left");
    Ragged { generated, logits }
}

/// Every sequence of the ragged run against its run alone in the dense session.
fn ragged_matches_alone(fixture: &str, fused: bool) {
    let m = model(fixture, fused);
    let joins = schedule();
    let config = PagedConfig {
        pool_blocks: 64,
        max_len: 64,
    };
    let Ragged { generated, logits } = run_ragged(&m, &joins, config);
    for (j, join) in joins.iter().enumerate() {
        let (ids, rows) = m.alone(&join.prompt, join.tokens);
        assert_eq!(
            generated[j], ids,
            "{fixture} (fused {fused}): sequence {j}'s ids in the ragged batch and alone"
        );
        for (t, (a, e)) in logits[j].iter().zip(&rows).enumerate() {
            let err = rel_err(a, e);
            assert!(
                err <= 1e-5,
                "{fixture} (fused {fused}): sequence {j} token {t}: logits differ by {err:e}"
            );
        }
        assert_eq!(logits[j].len(), rows.len());
    }
    let _ = &m.spec;
}

#[test]
fn ragged_llama_matches_each_sequence_alone() {
    ragged_matches_alone("tests/fixtures/hf-tiny-llama-s0", false);
    ragged_matches_alone("tests/fixtures/hf-tiny-llama-s0", true);
}

#[test]
fn ragged_qwen2_and_olmo2_match_each_sequence_alone() {
    ragged_matches_alone("tests/fixtures/hf-tiny-qwen2-s0", true);
    ragged_matches_alone("tests/fixtures/hf-tiny-olmo2-s0", true);
}

/// Qwen3's per-head q/k norms and Phi-3's packed projections (Llama's graph).
#[test]
fn ragged_qwen3_and_phi3_match_each_sequence_alone() {
    ragged_matches_alone("tests/fixtures/hf-tiny-qwen3-s0", true);
    ragged_matches_alone("tests/fixtures/hf-tiny-phi3-s0", true);
}

/// Granite's multipliers, and Gemma 3's sliding-window and global layers mixed (two
/// block tables, the window's freeing its blocks as the sequences pass 8 positions).
#[test]
fn ragged_granite_and_gemma3_match_each_sequence_alone() {
    ragged_matches_alone("tests/fixtures/hf-tiny-granite-s3", true);
    ragged_matches_alone("tests/fixtures/hf-tiny-gemma3-s0", false);
    ragged_matches_alone("tests/fixtures/hf-tiny-gemma3-s0", true);
    let m = model("tests/fixtures/hf-tiny-gemma3-s0", true);
    let inputs: Vec<String> = m
        .paged
        .inputs()
        .into_iter()
        .map(|(_, n, _)| n.to_string())
        .collect();
    assert!(inputs.contains(&"block_table".to_string()), "{inputs:?}");
    assert!(
        inputs.contains(&"block_table.window8".to_string()),
        "{inputs:?}"
    );
}

/// Every row of a sequence, position to (fed token's next, logits): what a run gave.
type Rows = BTreeMap<usize, (i32, Vec<f32>)>;

/// Prompt chunks mixed with decodes: three sequences of 11, 3 and 9 prompt tokens fed
/// in chunks of different sizes (10 rows of one prompt at once) beside each other's
/// decodes (a prompt spread over steps, a chunk ending its prompt beside one starting
/// another), then all decode. Every row (prompt rows too) has bit for bit the logits and next
/// token of the same sequence fed alone, one token a step, and the blocks in use stay
/// what the live sequences need.
fn chunks_match_token_by_token(fixture: &str, fused: bool) {
    let m = model(fixture, fused);
    let config = PagedConfig {
        pool_blocks: 32,
        max_len: 32,
    };
    let prompts: [Vec<i32>; 3] = [
        vec![5, 9, 33, 2, 61, 7, 12, 8, 40, 21, 90],
        vec![1, 17, 42],
        vec![3, 14, 15, 92, 65, 35, 89, 79, 32],
    ];
    let generate = 6;
    let record = |rows: &mut Rows, out: &fusec::exec::PagedStep, seq: SeqId| {
        for (i, o) in out.outputs.iter().enumerate().filter(|(_, o)| o.seq == seq) {
            let previous = rows.insert(o.position, (o.next, out.logits.row(i).to_vec()));
            assert!(previous.is_none(), "position {} fed twice", o.position);
        }
    };
    // Alone, a token a step.
    let alone: Vec<Rows> = prompts
        .iter()
        .map(|p| {
            let mut s = m.session(config);
            let id = s.add(p).expect("joins");
            let mut rows = Rows::new();
            while s.generated(id).expect("live").len() < generate {
                let out = s.step().expect("steps");
                record(&mut rows, &out, id);
            }
            rows
        })
        .collect();
    // Together, in chunks.
    let mut s = m.session(config);
    let ids: Vec<SeqId> = prompts.iter().map(|p| s.add(p).expect("joins")).collect();
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let mut out = fusec::exec::PagedStep::default();
    let mut rows = vec![Rows::new(); 3];
    let plan: [&[(SeqId, usize)]; 4] = [
        &[(b, 3), (a, 10)],
        &[(a, 1), (b, 1), (c, 2)],
        &[(c, 7), (a, 1), (b, 1)],
        &[(a, 1), (c, 1)],
    ];
    let mut steps = plan
        .iter()
        .map(|p| p.to_vec())
        .collect::<Vec<_>>()
        .into_iter();
    loop {
        let feeds = match steps.next() {
            Some(feeds) => feeds,
            None => ids
                .iter()
                .filter(|&&id| s.generated(id).expect("live").len() < generate)
                .map(|&id| (id, 1))
                .collect(),
        };
        if feeds.is_empty() {
            break;
        }
        s.step_chunks_into(&feeds, &mut out)
            .expect("steps in chunks");
        let fed: usize = feeds.iter().map(|&(_, n)| n).sum();
        assert_eq!(out.outputs.len(), fed, "a row per token");
        for (rows, &id) in rows.iter_mut().zip(&ids) {
            record(rows, &out, id);
        }
        assert_eq!(s.blocks_in_use(), s.blocks_needed());
    }
    for (j, (got, want)) in rows.iter().zip(&alone).enumerate() {
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{fixture} (fused {fused}): sequence {j} fed the same positions"
        );
        for (p, (g, w)) in got.values().zip(want.values()).enumerate() {
            assert_eq!(g.0, w.0, "{fixture}: sequence {j} position {p}: next token");
            assert!(
                g.1.iter()
                    .zip(&w.1)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{fixture} (fused {fused}): sequence {j} position {p}: logits differ"
            );
        }
        assert_eq!(
            s.generated(ids[j]).expect("live").len(),
            generate,
            "sequence {j}"
        );
    }
}

#[test]
fn prompt_chunks_mixed_with_decodes_match_token_by_token() {
    chunks_match_token_by_token("tests/fixtures/hf-tiny-llama-s0", false);
    chunks_match_token_by_token("tests/fixtures/hf-tiny-llama-s0", true);
}

/// A chunk of 10 rows, longer than a window of 8 (Mistral's, and Gemma 3's windowed
/// layers beside its global ones): a chunk's later rows read its earlier rows'
/// entries within the window, and the blocks behind it are freed after the step.
#[test]
fn prompt_chunks_across_a_sliding_window_match_token_by_token() {
    chunks_match_token_by_token("tests/fixtures/hf-tiny-mistral-window-s0", true);
    chunks_match_token_by_token("tests/fixtures/hf-tiny-gemma3-s0", true);
}

/// A chunk asks at most the rest of the prompt, or the one generated token; a bad
/// chunk is refused and changes nothing.
#[test]
fn a_chunk_past_what_a_sequence_can_feed_is_refused() {
    let m = model("tests/fixtures/hf-tiny-llama-s0", true);
    let mut s = m.session(PagedConfig {
        pool_blocks: 16,
        max_len: 32,
    });
    let a = s.add(&[1, 2, 3]).expect("joins");
    let mut out = fusec::exec::PagedStep::default();
    for (asked, available) in [(4, 3), (0, 3)] {
        assert!(matches!(
            s.step_chunks_into(&[(a, asked)], &mut out),
            Err(PagedError::TooManyTokens { seq, asked: x, available: y })
                if seq == a && x == asked && y == available
        ));
    }
    assert!(matches!(
        s.step_chunks_into(&[(a, 1), (a, 1)], &mut out),
        Err(PagedError::Repeated(x)) if x == a
    ));
    assert_eq!((s.len(a).expect("live"), s.blocks_in_use()), (0, 0));
    s.step_chunks_into(&[(a, 3)], &mut out)
        .expect("the whole prompt");
    assert_eq!(s.generated(a).expect("live").len(), 1);
    // Generated: one token a step, the next ones do not exist yet.
    assert!(matches!(
        s.step_chunks_into(&[(a, 2)], &mut out),
        Err(PagedError::TooManyTokens { available: 1, .. })
    ));
    s.step_chunks_into(&[(a, 1)], &mut out).expect("decodes");
    assert_eq!(s.len(a).expect("live"), 4);
}

/// `step_some_into` runs only the listed sequences: one sequence feeds its whole
/// prompt alone while the other waits, then both decode together, and each generates
/// what it generates alone; a repeated or unknown id is an error that changes nothing.
#[test]
fn a_step_over_some_sequences_leaves_the_others_waiting() {
    let m = model("tests/fixtures/hf-tiny-llama-s0", true);
    let mut s = m.session(PagedConfig {
        pool_blocks: 16,
        max_len: 32,
    });
    let (pa, pb) = (vec![5, 9, 33, 2, 61, 7, 12], vec![1, 17, 42]);
    let (a, b) = (s.add(&pa).expect("adds"), s.add(&pb).expect("adds"));
    let mut out = fusec::exec::PagedStep::default();
    assert!(matches!(
        s.step_some_into(&[a, a], &mut out),
        Err(PagedError::Repeated(id)) if id == a
    ));
    assert!(matches!(
        s.step_some_into(&[SeqId(99)], &mut out),
        Err(PagedError::UnknownSequence(_))
    ));
    for _ in 0..pa.len() {
        s.step_some_into(&[a], &mut out).expect("steps a");
        assert_eq!(out.outputs.len(), 1);
    }
    assert_eq!(s.len(b).expect("live"), 0, "b waited");
    assert_eq!(s.len(a).expect("live"), pa.len());
    // b's prompt, with a decoding beside it; then both decode.
    let mut got = (vec![out.outputs[0].next], Vec::new());
    while got.1.len() < 6 || got.0.len() < 6 {
        s.step_some_into(&[b, a], &mut out).expect("steps both");
        assert_eq!(out.outputs[0].seq, b, "outputs follow the order given");
        for o in &out.outputs {
            let list = if o.seq == a { &mut got.0 } else { &mut got.1 };
            if o.generated && list.len() < 6 {
                list.push(o.next);
            }
        }
    }
    assert_eq!(got.0, m.alone(&pa, 6).0, "a");
    assert_eq!(got.1, m.alone(&pb, 6).0, "b");
}

/// A caller that samples: `set_next` replaces each greedy token by its own choice,
/// and the sequence's logits follow the dense session's teacher-forced run, while a
/// greedy neighbour in the batch is unaffected.
#[test]
fn set_next_feeds_the_callers_tokens() {
    let m = model("tests/fixtures/hf-tiny-llama-s0", true);
    let mut s = m.session(PagedConfig {
        pool_blocks: 16,
        max_len: 32,
    });
    let prompt = [4, 8, 15];
    let forced = [16, 23, 42, 7, 99];
    let a = s.add(&prompt).expect("joins");
    let b = s.add(&[1, 17, 42]).expect("joins");
    let mut rows = Vec::new();
    while rows.len() < forced.len() + 1 {
        let out = s.step().expect("steps");
        if !s.is_prefilling(a).expect("live") {
            rows.push(out.logits_of(a).expect("a row").to_vec());
            if let Some(&t) = forced.get(rows.len() - 1) {
                s.set_next(a, t).expect("a token");
            }
        }
    }
    let exec = Executor::new(m.dense.clone(), &m.weights).expect("plans");
    let mut dense = Session::with_capacity(exec, 1, 64).expect("session");
    let g = dense
        .generate_forced(&[prompt.to_vec()], &[forced.to_vec()])
        .expect("forced");
    for (t, (got, e)) in rows.iter().zip(g.rows(0)).enumerate() {
        assert!(rel_err(got, e) <= 1e-5, "token {t}");
    }
    assert_eq!(&s.generated(a).expect("live")[..forced.len()], &forced[..]);
    let (ids, _) = m.alone(&[1, 17, 42], 6);
    assert_eq!(s.generated(b).expect("live"), &ids[..]);
    assert!(matches!(
        s.set_next(a, -3),
        Err(PagedError::TokenOutOfRange { token: -3, .. })
    ));
}

/// Gemma 2's soft-capped scores have no paged kernel: building its paged step is a
/// typed refusal.
#[test]
fn soft_capped_attention_refuses_a_paged_step() {
    let spec = pipeline::load(&root().join("tests/fixtures/hf-tiny-gemma2-s0"), None, None)
        .expect("loads");
    let err = pipeline::eager_prefill(&spec, &StepDims::paged(BLOCK)).expect_err("refused");
    assert!(err.to_string().contains("soft-capped"), "{err}");
}

/// Mistral's window of 8: the ragged run matches the dense ring, and blocks that
/// fall out of the window go back to the pool, so a sequence of 30 positions holds at
/// most `ceil(8 / 4) + 1` blocks.
#[test]
fn sliding_window_frees_blocks_out_of_the_window() {
    let fixture = "tests/fixtures/hf-tiny-mistral-window-s0";
    ragged_matches_alone(fixture, true);
    let m = model(fixture, true);
    let mut s = m.session(PagedConfig {
        pool_blocks: 8,
        max_len: 64,
    });
    let id = s.add(&[1, 17, 42, 99, 7]).expect("joins");
    let mut most = 0;
    for _ in 0..30 {
        s.step().expect("steps");
        assert_eq!(s.blocks_in_use(), s.blocks_needed());
        most = most.max(s.blocks_in_use());
    }
    assert_eq!(s.len(id).expect("live"), 30);
    // The next step reads positions 23..=30: blocks 5, 6 and 7 of the sequence.
    assert_eq!(s.blocks_in_use(), 3);
    assert!(most <= 3, "at most 3 blocks held, got {most}");
    // And the generated ids are those of the dense ring alone.
    let (ids, _) = m.alone(&[1, 17, 42, 99, 7], 26);
    assert_eq!(s.generated(id).expect("live"), &ids[..]);
}

#[test]
fn bad_requests_are_typed_errors_that_change_nothing() {
    let m = model("tests/fixtures/hf-tiny-llama-s0", true);
    let mut s = m.session(PagedConfig {
        pool_blocks: 2,
        max_len: 8,
    });
    // A dense graph is no paged graph.
    let dense = Executor::new(m.dense.clone(), &m.weights).expect("plans");
    let config = PagedConfig {
        pool_blocks: 2,
        max_len: 8,
    };
    assert!(matches!(
        PagedSession::new(dense, config),
        Err(PagedError::Config(_))
    ));
    assert!(matches!(s.add(&[]), Err(PagedError::EmptyPrompt)));
    let vocab = s.vocab() as i32;
    assert!(matches!(
        s.add(&[1, vocab]),
        Err(PagedError::TokenOutOfRange { token, .. }) if token == vocab
    ));
    assert!(matches!(
        s.add(&[-1]),
        Err(PagedError::TokenOutOfRange { .. })
    ));
    assert!(matches!(s.add(&[1; 9]), Err(PagedError::TooLong { .. })));
    assert!(matches!(
        s.remove(SeqId(99)),
        Err(PagedError::UnknownSequence(SeqId(99)))
    ));
    assert!(matches!(
        s.len(SeqId(99)),
        Err(PagedError::UnknownSequence(_))
    ));
    assert!(matches!(
        s.set_next(SeqId(99), 1),
        Err(PagedError::UnknownSequence(_))
    ));
    // No live sequence: a step runs nothing.
    assert!(s.step().expect("an empty step").outputs.is_empty());
    // Three sequences starting a block each, a pool of two: out of blocks, and the
    // session is as it was.
    let a = s.add(&[1, 2]).expect("joins");
    let b = s.add(&[3, 4]).expect("joins");
    let c = s.add(&[5, 6]).expect("joins");
    assert!(matches!(s.set_next(a, 1), Err(PagedError::Prefilling(x)) if x == a));
    assert_eq!((s.blocks_for_next_step(), s.free_blocks()), (3, 2));
    match s.step() {
        Err(PagedError::OutOfBlocks { needed, free, .. }) => assert_eq!((needed, free), (3, 2)),
        other => panic!("expected out of blocks, got {other:?}"),
    }
    assert_eq!(s.blocks_in_use(), 0);
    assert_eq!(s.len(a).expect("live"), 0);
    // A scheduler preempts one and steps again.
    s.remove(c).expect("removes");
    for _ in 0..4 {
        s.step().expect("steps");
    }
    assert_eq!((s.len(a).expect("a"), s.len(b).expect("b")), (4, 4));
    assert_eq!(s.blocks_in_use(), 2);
    // Both blocks, in the key and value pools of every layer.
    let cfg = &m.spec.model;
    let block = BLOCK * cfg.num_kv_heads * cfg.head_dim * 4;
    assert_eq!(s.kv_bytes_in_use(), 2 * 2 * cfg.num_layers * block);
    // Position 4 starts a second block each: none left.
    assert!(matches!(s.step(), Err(PagedError::OutOfBlocks { .. })));
    s.remove(b).expect("removes");
    for _ in 0..4 {
        s.step().expect("steps");
    }
    assert_eq!(s.len(a).expect("a"), 8);
    // `max_len` reached.
    assert!(matches!(s.step(), Err(PagedError::TooLong { seq, .. }) if seq == a));
    let (ids, _) = m.alone(&[1, 2], 7);
    assert_eq!(s.remove(a).expect("removes"), ids);
}

#[test]
fn the_paged_graph_verifies_round_trips_and_fuses() {
    let m = model("tests/fixtures/hf-tiny-llama-s0", false);
    let text = fusec_ir::text::print(&m.paged).expect("prints");
    let parsed = fusec_ir::text::parse(&text).expect("parses");
    assert_eq!(fusec_ir::text::print(&parsed).expect("prints"), text);
    let count = |g: &Graph, f: FusedOp| g.node_ids().filter(|&n| *g.op(n) == Op::Fused(f)).count();
    let layers = m.spec.model.num_layers as usize;
    assert_eq!(count(&m.paged, FusedOp::PagedAttention), layers);
    assert!(text.contains("block_table"), "the block table is an input");
    let rules = pipeline::rules(&[]).expect("rules");
    let (fused, _) = pipeline::fuse(&m.spec, &m.paged, &rules).expect("fuses");
    let (dense, _) = pipeline::fuse(&m.spec, &m.dense, &rules).expect("fuses");
    // One kernel per layer for RoPE, the write and attention, as the dense step's
    // `fused.decode_attention`: the same kernels throughout.
    assert_eq!(count(&fused, FusedOp::PagedDecodeAttention), layers);
    assert_eq!(count(&fused, FusedOp::Rope), 0);
    let text = fusec_ir::text::print(&fused).expect("prints");
    let parsed = fusec_ir::text::parse(&text).expect("parses");
    assert_eq!(fusec_ir::text::print(&parsed).expect("prints"), text);
    // Everything else fuses as in the dense step (the MLP's norm into SwiGLU, the
    // residual adds into the GEMVs, q, k and v into one kernel).
    let kinds = |g: &Graph| {
        let mut m = BTreeMap::new();
        for n in g.node_ids().filter(|&n| g.op(n).launches_kernel()) {
            let name = match g.op(n) {
                Op::Fused(FusedOp::PagedDecodeAttention | FusedOp::DecodeAttention) => "attention",
                op => op.name(),
            };
            *m.entry(name.to_string()).or_insert(0) += 1;
        }
        m
    };
    assert_eq!(kinds(&fused), kinds(&dense));
    // The cost model reads a pool through the block table: `B x M` blocks at most,
    // not the whole pool.
    let b = fusec_ir::Bindings::new()
        .with(fusec_ir::step::BATCH, 2)
        .with(fusec_ir::step::MAX_BLOCKS, 3)
        .with(fusec_ir::step::POOL_BLOCKS, 100);
    let cfg = &m.spec.model;
    let block = BLOCK * cfg.num_kv_heads * cfg.head_dim * 4;
    for n in fused.node_ids() {
        if *fused.op(n) == Op::Fused(FusedOp::PagedDecodeAttention) {
            let pool = fused.operands(n)[5];
            let read = fusec_ir::cost::operand_read_bytes(&fused, n, 5, pool, &b).expect("bound");
            assert_eq!(read, 2 * 3 * block);
        }
    }
    // With the sequences' lengths bound, the positions they hold: 5 and 9 here.
    let b = b
        .with(&fusec_ir::step::seq_len(0), 5)
        .with(&fusec_ir::step::seq_len(1), 9);
    let position = cfg.num_kv_heads * cfg.head_dim * 4;
    for n in fused.node_ids() {
        if *fused.op(n) == Op::Fused(FusedOp::PagedDecodeAttention) {
            for i in [5, 6] {
                let pool = fused.operands(n)[i];
                let read =
                    fusec_ir::cost::operand_read_bytes(&fused, n, i, pool, &b).expect("bound");
                assert_eq!(read, (5 + 9) * position);
            }
        }
    }
    // The floor reads that of every layer and writes one entry per sequence.
    let cost = fusec_ir::cost::graph_cost(&fused, &b).expect("bound");
    let layers = cfg.num_layers;
    assert_eq!(cost.floor.kv_read_bytes, 2 * (5 + 9) * position * layers);
    assert_eq!(cost.floor.kv_write_bytes, 2 * 2 * position * layers);
    // CUDA launches each paged attention as two kernels, the CPU executor as one.
    assert_eq!(cost.cuda_launches, cost.total.launches + layers);
}

/// A sliding window's layers read at most the window's positions of each sequence,
/// however long it is, as the paged kernels do.
#[test]
fn the_cost_model_reads_a_window_at_most() {
    let m = model("tests/fixtures/hf-tiny-mistral-window-s0", true);
    let cfg = &m.spec.model;
    let window = 8;
    let position = cfg.num_kv_heads * cfg.head_dim * 4;
    let lengths = [3, 20, 8];
    let b = fusec_ir::step::paged_bindings(&lengths, BLOCK, cfg.max_seq_len);
    let cost = fusec_ir::cost::graph_cost(&m.paged, &b).expect("bound");
    let attended: u64 = lengths.iter().map(|&l| l.min(window)).sum();
    assert_eq!(attended, 3 + 8 + 8);
    assert_eq!(
        cost.floor.kv_read_bytes,
        2 * attended * position * cfg.num_layers
    );
    // One more position of the short sequence reads one more position per layer; one
    // more of the long one, nothing more.
    let more = |lengths: &[u64]| {
        let b = fusec_ir::step::paged_bindings(lengths, BLOCK, cfg.max_seq_len);
        fusec_ir::cost::graph_cost(&m.paged, &b)
            .expect("bound")
            .total
            .bytes_read
    };
    let base = more(&lengths);
    assert_eq!(more(&[4, 20, 8]), base + 2 * position * cfg.num_layers);
    assert_eq!(more(&[3, 21, 8]), base);
}

/// What the CPU session measures a paged attention reading is what the cost model
/// counts from the sequences' lengths: a ragged batch, with a window and without.
#[test]
fn the_cost_model_counts_what_a_paged_step_reads() {
    for fixture in [
        "tests/fixtures/hf-tiny-llama-s0",
        "tests/fixtures/hf-tiny-mistral-window-s0",
    ] {
        let m = model(fixture, true);
        let config = PagedConfig {
            pool_blocks: 64,
            max_len: 64,
        };
        let mut s = m.session(config);
        let a = s.add(&[1; 12]).expect("adds");
        for _ in 0..10 {
            s.step().expect("steps");
        }
        s.add(&[2; 3]).expect("adds");
        let step = s.step().expect("steps");
        // `a` fed its 11th token (position 10), the other its first.
        assert_eq!(s.len(a).expect("a"), 11);
        let lengths = [11, 1];
        let b = fusec_ir::step::paged_bindings(&lengths, BLOCK, 64)
            .with(fusec_ir::step::POOL_BLOCKS, 64);
        let mut checked = 0;
        for n in &step.stats.nodes {
            if !m.paged.op(n.node).name().starts_with("fused.paged") {
                continue;
            }
            let cost = fusec_ir::cost::node_cost(&m.paged, n.node, &b).expect("bound");
            assert_eq!(n.bytes_read, cost.bytes_read, "{fixture}: {:?}", n.node);
            checked += 1;
        }
        assert_eq!(checked as u64, m.spec.model.num_layers, "{fixture}");
    }
}
