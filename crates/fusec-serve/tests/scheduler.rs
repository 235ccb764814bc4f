//! The scheduler over a [`SyntheticEngine`]: requests join between steps and leave at once, the
//! token budget is shared by prompt chunks and decodes, and preemption when blocks run
//! out loses no request and changes no output, sampled requests included.

use std::collections::HashMap;

use fusec_serve::{
    Engine, Event, Finish, Request, RequestId, Scheduler, SchedulerConfig, SeqId, SubmitError,
    SyntheticEngine,
};
use fusec_text::SamplingOptions;

/// The engines of these tests: vocabulary 1000.
fn fake(block_size: usize, total_blocks: usize, max_context: usize) -> SyntheticEngine {
    SyntheticEngine::new(block_size, total_blocks, max_context, 1000)
}

fn req(prompt_len: usize, seed: u32, max_tokens: usize) -> Request {
    Request::greedy(
        (0..prompt_len as u32)
            .map(|i| (i * 7 + seed) % 900)
            .collect(),
        max_tokens,
        Vec::new(),
    )
}

/// [`req`], sampled at temperature 1 from a generator seeded with `seed`.
fn sampled(prompt_len: usize, seed: u32, max_tokens: usize) -> Request {
    Request {
        sampling: SamplingOptions {
            temperature: Some(1.0),
            top_p: Some(0.9),
            seed: u64::from(seed),
            ..SamplingOptions::default()
        },
        ..req(prompt_len, seed, max_tokens)
    }
}

/// Runs to completion, checking every step's invariants; each request's tokens and end.
fn drain<E: Engine>(
    s: &mut Scheduler<E>,
    out: &mut HashMap<RequestId, (Vec<u32>, Option<Finish>)>,
) -> usize {
    let mut steps = 0;
    while !s.is_idle() {
        for e in s.step() {
            match e {
                Event::Token { id, token } => {
                    let entry = out.entry(id).or_default();
                    assert!(entry.1.is_none(), "token after the end of {id:?}");
                    entry.0.push(token);
                }
                Event::Finished { id, reason } => {
                    let entry = out.entry(id).or_default();
                    assert!(entry.1.is_none(), "{id:?} finished twice");
                    entry.1 = Some(reason);
                }
                Event::Failed { id, error } => panic!("{id:?} failed: {error}"),
            }
        }
        let st = s.stats();
        assert!(st.blocks_in_use <= st.total_blocks);
        steps += 1;
        assert!(steps < 100_000, "no progress");
    }
    steps
}

/// Each request alone, on an engine with room for it.
fn alone(r: &Request) -> Vec<u32> {
    let mut s =
        Scheduler::new(fake(4, 1000, 4096), SchedulerConfig::default()).expect("default settings");
    s.submit(r.clone()).expect("the request fits");
    let mut out = HashMap::new();
    drain(&mut s, &mut out);
    out.into_values().next().expect("its output").0
}

#[test]
fn requests_join_between_steps_and_leave_at_once() {
    let config = SchedulerConfig {
        max_running: 4,
        token_budget: 64,
        prefill_chunk: 64,
    };
    let mut s = Scheduler::new(fake(4, 1000, 4096), config).unwrap();
    let a = s.submit(req(5, 1, 3)).unwrap();
    // Step 1: a's prompt whole, and its first token.
    let ev = s.step();
    assert!(matches!(ev[..], [Event::Token { id, .. }] if id == a));
    // b joins between steps and is prefilled while a decodes.
    let b = s.submit(req(3, 2, 10)).unwrap();
    let ev = s.step();
    assert_eq!(ev.iter().filter(|e| e.request() == a).count(), 1);
    assert_eq!(ev.iter().filter(|e| e.request() == b).count(), 1);
    assert_eq!(s.engine().log[1].len(), 2);
    // a's third token ends it: it leaves in the same step.
    let ev = s.step();
    assert!(ev.contains(&Event::Finished {
        id: a,
        reason: Finish::Length
    }));
    assert_eq!(s.stats().running, 1);
    assert_eq!(s.engine().sequences(), 1, "a left the engine at once");
    let ev = s.step();
    assert!(ev.iter().all(|e| e.request() == b));
    assert_eq!(s.engine().log[3].len(), 1);
}

#[test]
fn the_token_budget_is_shared_by_prompt_chunks_and_decodes() {
    let config = SchedulerConfig {
        max_running: 4,
        token_budget: 10,
        prefill_chunk: 6,
    };
    let mut s = Scheduler::new(fake(4, 1000, 4096), config).unwrap();
    s.submit(req(2, 1, 50)).unwrap();
    s.step();
    // Two long prompts arrive while the first decodes.
    s.submit(req(20, 2, 5)).unwrap();
    s.submit(req(20, 3, 5)).unwrap();
    for _ in 0..8 {
        s.step();
    }
    let log = &s.engine().log;
    for (i, step) in log.iter().enumerate() {
        let total: usize = step.iter().map(|w| w.tokens).sum();
        assert!(total <= 10, "step {i} fed {total} tokens: {step:?}");
        assert!(step.iter().all(|w| w.tokens <= 6), "step {i}: {step:?}");
    }
    // The decoding sequence advanced every step, beside the chunks.
    assert!(log
        .iter()
        .all(|step| step.iter().any(|w| w.seq == SeqId(0))));
    // Step 2 fed 1 decode + a 6-token chunk + 3 of the next prompt.
    let mut sizes: Vec<usize> = log[1].iter().map(|w| w.tokens).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [1, 3, 6]);
}

#[test]
fn preemption_loses_nothing_and_changes_no_output() {
    // 12 blocks of 4 positions: far fewer than 8 requests of up to 30 positions need
    // together, so sequences are evicted and recomputed again and again.
    let config = SchedulerConfig {
        max_running: 8,
        token_budget: 16,
        prefill_chunk: 5,
    };
    let mut s = Scheduler::new(fake(4, 12, 64), config).unwrap();
    let requests: Vec<Request> = (0..20)
        .map(|i| req(3 + i % 9, i as u32, 8 + (i * 5) % 13))
        .collect();
    let ids: Vec<RequestId> = requests
        .iter()
        .map(|r| s.submit(r.clone()).unwrap())
        .collect();
    let mut out = HashMap::new();
    drain(&mut s, &mut out);
    let st = s.stats();
    assert!(st.preemptions > 0, "the test must preempt: {st:?}");
    assert_eq!(st.finished, 20);
    assert_eq!((st.running, st.waiting, st.blocks_in_use), (0, 0, 0));
    for (id, r) in ids.iter().zip(&requests) {
        let (tokens, end) = &out[id];
        assert_eq!(*end, Some(Finish::Length), "{id:?}");
        assert_eq!(tokens.len(), r.max_tokens);
        assert_eq!(tokens, &alone(r), "{id:?} differs from its run alone");
    }
}

#[test]
fn stop_ids_end_a_request_without_being_emitted() {
    let r = req(4, 9, 20);
    let full = alone(&r);
    let stop = full[5];
    let first = full.iter().position(|&t| t == stop).unwrap();
    let mut s = Scheduler::new(fake(4, 100, 256), SchedulerConfig::default()).unwrap();
    let id = s
        .submit(Request {
            stop_ids: vec![stop],
            ..r
        })
        .unwrap();
    let mut out = HashMap::new();
    drain(&mut s, &mut out);
    assert_eq!(out[&id].0, full[..first].to_vec());
    assert_eq!(out[&id].1, Some(Finish::Stop));
}

#[test]
fn cancel_frees_the_sequence_and_its_blocks() {
    let mut s = Scheduler::new(fake(4, 100, 256), SchedulerConfig::default()).unwrap();
    let a = s.submit(req(10, 1, 50)).unwrap();
    let b = s.submit(req(10, 2, 50)).unwrap();
    s.step();
    s.step();
    assert_eq!(s.stats().blocks_in_use, 6);
    assert!(s.cancel(a));
    assert!(!s.cancel(a));
    assert_eq!(s.stats().blocks_in_use, 3);
    assert_eq!(s.engine().sequences(), 1);
    let ev = s.step();
    assert!(ev.iter().all(|e| e.request() == b));
    assert_eq!(s.stats().cancelled, 1);
    // A waiting request cancels too.
    let c = s.submit(req(3, 3, 5)).unwrap();
    assert!(s.cancel(c));
    assert_eq!(s.stats().waiting, 0);
}

#[test]
fn requests_that_cannot_fit_are_refused_at_submission() {
    let mut s = Scheduler::new(fake(4, 10, 64), SchedulerConfig::default()).unwrap();
    assert!(matches!(
        s.submit(req(60, 1, 5)),
        Err(SubmitError::OverContext {
            needed: 65,
            max: 64,
            ..
        })
    ));
    assert!(matches!(
        s.submit(req(30, 1, 20)),
        Err(SubmitError::OverCapacity {
            needed: 13,
            total: 10,
            ..
        })
    ));
    assert_eq!(s.submit(req(0, 1, 5)), Err(SubmitError::EmptyPrompt));
    assert_eq!(s.submit(req(3, 1, 0)), Err(SubmitError::NoTokens));
    let bad = Request::greedy(vec![5, 1000], 1, Vec::new());
    assert_eq!(
        s.submit(bad),
        Err(SubmitError::BadToken {
            id: 1000,
            vocab: 1000
        })
    );
    let mut cold = sampled(3, 1, 5);
    cold.sampling.temperature = Some(-1.0);
    assert!(matches!(s.submit(cold), Err(SubmitError::Sampling(m)) if m.contains("temperature")));
    assert!(s.is_idle());
}

/// Sampled requests, greedy ones beside them, and preemption: every request's tokens
/// are its tokens alone (its generator stays with it through an eviction, and the
/// recomputed tokens are fed, not drawn again), and sampling does choose tokens other
/// than the greedy ones.
#[test]
fn sampled_requests_give_their_tokens_alone_through_preemption() {
    let config = SchedulerConfig {
        max_running: 8,
        token_budget: 16,
        prefill_chunk: 5,
    };
    let mut s = Scheduler::new(fake(4, 12, 64), config).unwrap();
    let requests: Vec<Request> = (0..16)
        .map(|i| match i % 2 {
            0 => sampled(3 + i % 7, i as u32, 8 + (i * 5) % 11),
            _ => req(3 + i % 7, i as u32, 8 + (i * 5) % 11),
        })
        .collect();
    let ids: Vec<RequestId> = requests
        .iter()
        .map(|r| s.submit(r.clone()).unwrap())
        .collect();
    let mut out = HashMap::new();
    drain(&mut s, &mut out);
    assert!(s.stats().preemptions > 0, "the test must preempt");
    let mut differ = 0;
    for (id, r) in ids.iter().zip(&requests) {
        let tokens = &out[id].0;
        assert_eq!(tokens.len(), r.max_tokens);
        assert_eq!(tokens, &alone(r), "{id:?} differs from its run alone");
        if r.sampling.temperature.is_some() {
            let greedy = alone(&Request::greedy(r.prompt.clone(), r.max_tokens, Vec::new()));
            differ += usize::from(*tokens != greedy);
        }
    }
    assert_eq!(differ, 8, "every sampled request left the greedy path");
    // Another seed, other tokens.
    let mut other = requests[0].clone();
    other.sampling.seed += 100;
    assert_ne!(alone(&other), alone(&requests[0]));
}

#[test]
fn an_engine_error_fails_that_steps_requests_and_the_rest_go_on() {
    let mut fake = fake(4, 100, 256);
    fake.poison = Some(999);
    let mut s = Scheduler::new(fake, SchedulerConfig::default()).unwrap();
    let good = s.submit(req(3, 1, 5)).unwrap();
    let mut out = HashMap::new();
    while !s.is_idle() {
        for e in s.step() {
            out.entry(e.request()).or_insert_with(Vec::new).push(e);
        }
        if s.stats().steps == 1 {
            let mut p = req(3, 2, 5);
            p.prompt[1] = 999;
            let bad = s.submit(p).unwrap();
            out.insert(bad, Vec::new());
        }
    }
    // The bad one shared a step with `good`: both failed, and nothing was lost.
    let failed = out
        .values()
        .filter(|v| matches!(v.last(), Some(Event::Failed { .. })))
        .count();
    assert_eq!(failed, 2);
    assert!(matches!(out[&good].last(), Some(Event::Failed { .. })));
    assert_eq!(s.stats().failed, 2);
    assert_eq!(s.stats().blocks_in_use, 0);
}

#[test]
fn bad_settings_are_refused() {
    let bad = SchedulerConfig {
        max_running: 8,
        token_budget: 4,
        prefill_chunk: 4,
    };
    assert!(Scheduler::new(fake(4, 10, 64), bad).is_err());
    let zero = SchedulerConfig {
        max_running: 0,
        ..SchedulerConfig::default()
    };
    assert!(Scheduler::new(fake(4, 10, 64), zero).is_err());
}
