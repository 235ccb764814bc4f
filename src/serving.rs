//! Serving benchmark (`fusec bench --serve N`): the real continuous-batching
//! [`Scheduler`] of `fusec serve` driven in-process, without HTTP, so that the figures
//! are the engine's and the scheduler's.
//!
//! Method. `requests` requests are served with `concurrency` of them in flight: that
//! many are submitted at the start, and a new one as each finishes, until all have been
//! submitted. Each prompt is `prompt_len` token ids drawn from a fixed seed, so a run is
//! reproducible; each request asks for `output_len` tokens with no stop id, so every
//! request generates exactly that many. Before the timed run one untimed request of the
//! same shape warms the engine (its buffers, the pages of its weights).
//!
//! Every event the scheduler returns is time-stamped when its step returns (a step's
//! tokens all appear at its end, as a server streams them): the time to first token
//! (TTFT) of a request runs from its submission to its first token, the inter-token
//! latencies (ITL) are the gaps between consecutive tokens of one request (pooled over
//! all requests), and the end-to-end latency runs from submission to the last token.
//! Throughput is over the wall time from the first submission to the last token:
//! output tokens, prompt and output tokens together, and requests, per second.
//! Percentiles are nearest-rank ([`percentile`]).

use std::cell::Cell;
use std::time::{Duration, Instant};

use fusec_serve::{Engine, Event, Hooked, Request, Scheduler, StepHook, SubmitError};
use fusec_weights::SplitMix64;

/// What to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingOptions {
    /// Requests in all.
    pub requests: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Prompt tokens of every request.
    pub prompt_len: usize,
    /// Tokens every request generates.
    pub output_len: usize,
    /// Seed of the prompts' token ids.
    pub seed: u64,
}

/// The most requests in one run.
pub const MAX_REQUESTS: usize = 1_000_000;

/// The most requests in flight (`fusec serve --max-running`'s bound).
pub const MAX_CONCURRENCY: usize = 4096;

impl ServingOptions {
    /// Checks the options against the model's context (`max_context` positions); the
    /// message names the option at fault.
    pub fn check(&self, max_context: u64) -> Result<(), BadOption> {
        if self.requests == 0 || self.requests > MAX_REQUESTS {
            return Err(BadOption(format!(
                "--serve {}: the number of requests must be 1 to {MAX_REQUESTS}",
                self.requests
            )));
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return Err(BadOption(format!(
                "--concurrency {}: requests in flight must be 1 to {MAX_CONCURRENCY}",
                self.concurrency
            )));
        }
        if self.prompt_len == 0 {
            return Err(BadOption(
                "--prompt-len: a prompt must have at least 1 token".into(),
            ));
        }
        if self.output_len == 0 {
            return Err(BadOption(
                "--output-len: a request must generate at least 1 token".into(),
            ));
        }
        if self.prompt_len as u64 > max_context {
            return Err(BadOption(format!(
                "--prompt-len {}: longer than the model's context of {max_context} positions",
                self.prompt_len
            )));
        }
        let needed = self.prompt_len as u64 + self.output_len as u64;
        if needed > max_context {
            return Err(BadOption(format!(
                "--prompt-len {} plus --output-len {} need {needed} positions, beyond the model's context of {max_context}",
                self.prompt_len, self.output_len
            )));
        }
        Ok(())
    }

    /// The prompts, request after request, drawn as they are asked for: `prompt_len`
    /// token ids below `vocab` each, from one stream seeded by [`ServingOptions::seed`].
    pub fn prompts(&self, vocab: usize) -> impl Iterator<Item = Vec<u32>> {
        let mut rng = SplitMix64::new(self.seed ^ 0x5e4e_be4c);
        let len = self.prompt_len;
        (0..self.requests).map(move |_| {
            (0..len)
                .map(|_| u32::try_from(rng.below(vocab.max(1) as u64)).unwrap_or(0))
                .collect()
        })
    }
}

/// A serving option out of range; the message starts with the option's name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadOption(pub String);

/// Why a serving benchmark could not finish.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// The scheduler refused a request (the options do not fit the engine).
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// The engine failed a request.
    #[error("request {id} failed: {error}")]
    Failed { id: u64, error: String },
    /// The scheduler went idle with requests unfinished.
    #[error("the scheduler stopped with {0} requests unfinished")]
    Stalled(usize),
}

/// The `p`th percentile (`p` in 1 to 100) of `sorted` (ascending), nearest-rank: the
/// smallest value with at least `p`% of the values at or below it, the value of rank
/// `ceil(p n / 100)`. `None` for no values.
pub fn percentile(sorted: &[f64], p: u32) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let p = p.clamp(1, 100) as usize;
    let rank = (p * n).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// The mean and percentiles of a latency, in milliseconds.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Latency {
    pub samples: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

impl Latency {
    /// The statistics of `durations`; `None` for none.
    pub fn of(durations: &[Duration]) -> Option<Latency> {
        let mut ms: Vec<f64> = durations.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Some(Latency {
            samples: ms.len(),
            mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
            p50_ms: percentile(&ms, 50)?,
            p90_ms: percentile(&ms, 90)?,
            p99_ms: percentile(&ms, 99)?,
        })
    }
}

/// The figures of one serving run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServingResult {
    /// `paged` or `sessions`.
    pub engine: &'static str,
    /// The compute precision of the engine's graph.
    pub precision: String,
    pub requests: usize,
    pub concurrency: usize,
    pub prompt_len: usize,
    pub output_len: usize,
    pub seed: u64,
    /// The scheduler's settings.
    pub max_running: usize,
    pub token_budget: usize,
    pub prefill_chunk: usize,
    /// Requests that finished (all of them, or the run fails).
    pub finished: u64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// Wall time from the first submission to the last token.
    pub seconds: f64,
    pub output_tokens_per_s: f64,
    /// Prompt and output tokens per second.
    pub total_tokens_per_s: f64,
    pub requests_per_s: f64,
    /// Submission to first token, per request.
    pub ttft: Latency,
    /// Gaps between consecutive tokens of a request, all requests pooled; `None` when
    /// every request generates one token.
    pub itl: Option<Latency>,
    /// Submission to last token, per request.
    pub e2e: Latency,
    /// Scheduler steps of the timed run.
    pub steps: u64,
    /// Tokens fed to the engine (prompts, recomputed tokens after preemption, decodes).
    pub tokens_fed: u64,
    pub preemptions: u64,
    /// The most KV blocks held at the end of any engine step.
    pub peak_kv_blocks: usize,
    pub kv_blocks: usize,
    /// Positions per KV block.
    pub block_size: usize,
}

impl ServingResult {
    /// The result as text: the run, the throughput, then a row per latency.
    pub fn render(&self) -> String {
        let mut s = format!(
            "serving: {} engine ({}), {} requests, concurrency {}, prompt {} + output {} tokens (max_running {}, token budget {}, prefill chunk {})\n",
            self.engine,
            self.precision,
            self.requests,
            self.concurrency,
            self.prompt_len,
            self.output_len,
            self.max_running,
            self.token_budget,
            self.prefill_chunk
        );
        s += &format!(
            "  {} finished, {} output tokens in {:.3} s: {:.1} output tokens/s, {:.1} total tokens/s, {:.2} requests/s\n",
            self.finished,
            self.output_tokens,
            self.seconds,
            self.output_tokens_per_s,
            self.total_tokens_per_s,
            self.requests_per_s
        );
        s += &format!(
            "  {} steps, {} tokens fed, {} preemptions, peak KV blocks {} of {} ({} positions each)\n",
            self.steps,
            self.tokens_fed,
            self.preemptions,
            self.peak_kv_blocks,
            self.kv_blocks,
            self.block_size
        );
        s += &format!(
            "  {:<10} {:>8} {:>10} {:>10} {:>10} {:>10}\n",
            "latency ms", "samples", "mean", "p50", "p90", "p99"
        );
        for (name, l) in [
            ("TTFT", Some(&self.ttft)),
            ("ITL", self.itl.as_ref()),
            ("E2E", Some(&self.e2e)),
        ] {
            s += &match l {
                Some(l) => format!(
                    "  {name:<10} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>10.2}\n",
                    l.samples, l.mean_ms, l.p50_ms, l.p90_ms, l.p99_ms
                ),
                None => format!("  {name:<10} {:>8} {:>10}\n", 0, "-"),
            };
        }
        s
    }
}

/// A step hook that records the most KV blocks the engine's sequences hold at the end
/// of a step (before the scheduler lets finished ones go), in a [`Cell`] that
/// [`PeakBlocks::take_peak`] reads and restarts.
#[derive(Debug, Default)]
pub struct PeakBlocks(Cell<usize>);

impl PeakBlocks {
    /// The peak since the last call, restarting it.
    pub fn take_peak(&self) -> usize {
        self.0.take()
    }
}

impl<E: Engine + ?Sized> StepHook<E> for PeakBlocks {
    fn after_step(&self, engine: &E) {
        self.0.set(self.0.get().max(engine.blocks_in_use()));
    }
}

/// An engine whose peak KV blocks are metered.
pub type Metered<E> = Hooked<E, PeakBlocks>;

/// `engine`, metered.
pub fn metered<E: Engine>(engine: E) -> Metered<E> {
    Hooked::new(engine, PeakBlocks::default())
}

/// A request in flight: its id in the scheduler, when it was submitted, and when its
/// last token came.
#[derive(Debug)]
struct InFlight {
    id: u64,
    submitted: Instant,
    last: Option<Instant>,
}

/// What [`serve`] measured: every request's TTFT and end-to-end latency (in the order
/// they finished), every inter-token gap, the tokens, and when the last came.
#[derive(Debug, Default)]
struct Served {
    ttft: Vec<Duration>,
    itl: Vec<Duration>,
    e2e: Vec<Duration>,
    output_tokens: u64,
    end: Option<Instant>,
}

/// Serves `requests` requests of `prompts` (drawn as they are submitted) through
/// `scheduler` with `concurrency` in flight, each generating `output_len` tokens (see
/// the module documentation). Only the requests in flight are held, not all of them.
fn serve(
    scheduler: &mut Scheduler<Metered<impl Engine>>,
    mut prompts: impl Iterator<Item = Vec<u32>>,
    requests: usize,
    concurrency: usize,
    output_len: usize,
) -> Result<Served, ServingError> {
    let mut served = Served::default();
    let mut in_flight: Vec<InFlight> = Vec::with_capacity(concurrency.min(requests));
    let (mut submitted, mut done) = (0, 0);
    while done < requests {
        while in_flight.len() < concurrency && submitted < requests {
            let Some(prompt) = prompts.next() else {
                break;
            };
            let id = scheduler.submit(Request::greedy(prompt, output_len, Vec::new()))?;
            submitted += 1;
            in_flight.push(InFlight {
                id: id.0,
                submitted: Instant::now(),
                last: None,
            });
        }
        if scheduler.is_idle() {
            return Err(ServingError::Stalled(requests - done));
        }
        let events = scheduler.step();
        let now = Instant::now();
        for event in events {
            let id = event.request().0;
            let Some(k) = in_flight.iter().position(|r| r.id == id) else {
                continue;
            };
            let r = &mut in_flight[k];
            match event {
                Event::Token { .. } => {
                    match r.last {
                        Some(last) => served.itl.push(now.duration_since(last)),
                        None => served.ttft.push(now.duration_since(r.submitted)),
                    }
                    r.last = Some(now);
                    served.output_tokens += 1;
                    served.end = Some(now);
                }
                Event::Finished { .. } => {
                    served
                        .e2e
                        .push(r.last.unwrap_or(now).duration_since(r.submitted));
                    in_flight.swap_remove(k);
                    done += 1;
                }
                Event::Failed { error, .. } => return Err(ServingError::Failed { id, error }),
            }
        }
    }
    Ok(served)
}

/// Runs the serving benchmark of `opts` on `scheduler` (see the module documentation).
/// `engine` and `precision` name what the scheduler drives, for the report.
pub fn run<E: Engine>(
    mut scheduler: Scheduler<Metered<E>>,
    opts: &ServingOptions,
    engine: &'static str,
    precision: &str,
) -> Result<ServingResult, ServingError> {
    let vocab = scheduler.engine().vocab_size();
    // One untimed request of the same shape first (the first prompt).
    serve(&mut scheduler, opts.prompts(vocab), 1, 1, opts.output_len)?;
    let before = scheduler.stats();
    // The peak of the timed run alone.
    scheduler.engine().hook.take_peak();
    let start = Instant::now();
    let served = serve(
        &mut scheduler,
        opts.prompts(vocab),
        opts.requests,
        opts.concurrency,
        opts.output_len,
    )?;
    let after = scheduler.stats();
    let peak = scheduler.engine().hook.take_peak();
    let seconds = served
        .end
        .unwrap_or(start)
        .duration_since(start)
        .as_secs_f64()
        .max(f64::MIN_POSITIVE);
    let (ttft, itl, e2e, output_tokens) =
        (served.ttft, served.itl, served.e2e, served.output_tokens);
    let prompt_tokens = (opts.requests as u64).saturating_mul(opts.prompt_len as u64);
    let config = *scheduler.config();
    let none = Latency {
        samples: 0,
        mean_ms: 0.0,
        p50_ms: 0.0,
        p90_ms: 0.0,
        p99_ms: 0.0,
    };
    Ok(ServingResult {
        engine,
        precision: precision.to_string(),
        requests: opts.requests,
        concurrency: opts.concurrency,
        prompt_len: opts.prompt_len,
        output_len: opts.output_len,
        seed: opts.seed,
        max_running: config.max_running,
        token_budget: config.token_budget,
        prefill_chunk: config.prefill_chunk,
        finished: after.finished - before.finished,
        prompt_tokens,
        output_tokens,
        seconds,
        output_tokens_per_s: output_tokens as f64 / seconds,
        total_tokens_per_s: (prompt_tokens + output_tokens) as f64 / seconds,
        requests_per_s: opts.requests as f64 / seconds,
        ttft: Latency::of(&ttft).unwrap_or_else(|| none.clone()),
        itl: Latency::of(&itl),
        e2e: Latency::of(&e2e).unwrap_or(none),
        steps: after.steps - before.steps,
        tokens_fed: after.tokens_fed - before.tokens_fed,
        preemptions: after.preemptions - before.preemptions,
        peak_kv_blocks: peak,
        kv_blocks: after.total_blocks,
        block_size: after.block_size,
    })
}

#[cfg(test)]
mod tests {
    use fusec_serve::{SchedulerConfig, SyntheticEngine};

    use super::*;

    /// The engines of these tests: context 64, vocabulary 16.
    fn fake(block_size: usize, total_blocks: usize) -> SyntheticEngine {
        SyntheticEngine::new(block_size, total_blocks, 64, 16)
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 50), Some(5.0));
        assert_eq!(percentile(&ten, 90), Some(9.0));
        assert_eq!(percentile(&ten, 99), Some(10.0));
        assert_eq!(percentile(&ten, 100), Some(10.0));
        assert_eq!(percentile(&ten, 1), Some(1.0));
        // The textbook example: 15, 20, 35, 40, 50.
        let five = [15.0, 20.0, 35.0, 40.0, 50.0];
        for (p, v) in [(5, 15.0), (30, 20.0), (40, 20.0), (50, 35.0), (100, 50.0)] {
            assert_eq!(percentile(&five, p), Some(v), "p{p}");
        }
        // A hundred values: the pth is the value of rank p, exactly (no rounding up
        // from 0.9 * 100 = 90.00000000000001).
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        for p in [50, 90, 99] {
            assert_eq!(percentile(&hundred, p), Some(f64::from(p)), "p{p}");
        }
        assert_eq!(percentile(&[3.5], 50), Some(3.5));
        assert_eq!(percentile(&[3.5], 99), Some(3.5));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn latency_is_sorted_and_in_milliseconds() {
        let ms = |v: u64| Duration::from_millis(v);
        let l = Latency::of(&[ms(30), ms(10), ms(20), ms(40)]).expect("samples");
        assert_eq!(l.samples, 4);
        assert_eq!((l.p50_ms, l.p90_ms, l.p99_ms), (20.0, 40.0, 40.0));
        assert!((l.mean_ms - 25.0).abs() < 1e-9);
        assert_eq!(Latency::of(&[]), None);
    }

    #[test]
    fn options_name_the_option_at_fault() {
        let ok = ServingOptions {
            requests: 6,
            concurrency: 3,
            prompt_len: 5,
            output_len: 4,
            seed: 0,
        };
        assert_eq!(ok.check(9), Ok(()));
        let bad = |o: ServingOptions, flag: &str| {
            let e = o.check(9).expect_err("refused").0;
            assert!(e.starts_with(flag), "{e}");
        };
        bad(
            ServingOptions {
                requests: 0,
                ..ok.clone()
            },
            "--serve",
        );
        bad(
            ServingOptions {
                requests: MAX_REQUESTS + 1,
                ..ok.clone()
            },
            "--serve",
        );
        bad(
            ServingOptions {
                concurrency: 0,
                ..ok.clone()
            },
            "--concurrency",
        );
        bad(
            ServingOptions {
                concurrency: 5000,
                ..ok.clone()
            },
            "--concurrency",
        );
        bad(
            ServingOptions {
                prompt_len: 0,
                ..ok.clone()
            },
            "--prompt-len",
        );
        bad(
            ServingOptions {
                prompt_len: 10,
                ..ok.clone()
            },
            "--prompt-len 10: longer",
        );
        bad(
            ServingOptions {
                output_len: 0,
                ..ok.clone()
            },
            "--output-len",
        );
        bad(
            ServingOptions {
                output_len: 5,
                ..ok.clone()
            },
            "--prompt-len 5 plus --output-len 5",
        );
    }

    #[test]
    fn prompts_are_seeded_and_in_the_vocabulary() {
        let o = ServingOptions {
            requests: 4,
            concurrency: 2,
            prompt_len: 7,
            output_len: 1,
            seed: 3,
        };
        let a: Vec<Vec<u32>> = o.prompts(11).collect();
        assert_eq!(a, o.prompts(11).collect::<Vec<_>>());
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|p| p.len() == 7 && p.iter().all(|&t| t < 11)));
        assert_ne!(a[0], a[1]);
        assert_ne!(
            a,
            ServingOptions { seed: 4, ..o }
                .prompts(11)
                .collect::<Vec<_>>()
        );
    }

    fn scheduler(
        engine: SyntheticEngine,
        max_running: usize,
    ) -> Scheduler<Metered<SyntheticEngine>> {
        let config = SchedulerConfig {
            max_running,
            token_budget: 256,
            prefill_chunk: 128,
        };
        Scheduler::new(metered(engine), config).expect("config")
    }

    #[test]
    fn every_request_finishes_with_its_tokens() {
        let opts = ServingOptions {
            requests: 7,
            concurrency: 3,
            prompt_len: 5,
            output_len: 4,
            seed: 0,
        };
        let r = run(scheduler(fake(4, 100), 3), &opts, "fake", "f32").expect("runs");
        assert_eq!(r.finished, 7);
        assert_eq!(r.output_tokens, 28);
        assert_eq!(r.prompt_tokens, 35);
        assert_eq!(r.ttft.samples, 7);
        assert_eq!(r.e2e.samples, 7);
        assert_eq!(r.itl.as_ref().map(|l| l.samples), Some(21));
        for l in [&r.ttft, &r.e2e, r.itl.as_ref().expect("itl")] {
            assert!(l.p50_ms <= l.p90_ms && l.p90_ms <= l.p99_ms, "{l:?}");
        }
        assert_eq!(r.preemptions, 0);
        // Three requests of 5 + 4 positions, 3 blocks of 4 each at most.
        assert!(r.peak_kv_blocks > 0 && r.peak_kv_blocks <= 9, "{r:?}");
        // 7 prompts fed whole in their first step, then 3 decodes each after the
        // first token: every token once.
        assert_eq!(r.tokens_fed, 7 * (5 + 3));
        assert!(r.steps >= 7 * 4 / 3, "{r:?}");
        assert!(r.render().contains("7 finished, 28 output tokens"));
    }

    #[test]
    fn preempted_requests_still_generate_every_token() {
        // Three prompts of 3 positions fit in 5 blocks of 4 and are admitted together;
        // growing to 5 positions each they need 6 blocks, so one is preempted.
        let opts = ServingOptions {
            requests: 6,
            concurrency: 3,
            prompt_len: 3,
            output_len: 6,
            seed: 1,
        };
        let r = run(scheduler(fake(4, 5), 3), &opts, "fake", "f32").expect("runs");
        assert_eq!((r.finished, r.output_tokens), (6, 36));
        assert_eq!(r.ttft.samples, 6);
        assert_eq!(r.itl.as_ref().map(|l| l.samples), Some(6 * 5));
        assert!(r.preemptions > 0, "{r:?}");
        assert!(r.peak_kv_blocks <= 5, "{r:?}");
    }

    #[test]
    fn one_token_requests_have_no_inter_token_latency() {
        let opts = ServingOptions {
            requests: 2,
            concurrency: 4,
            prompt_len: 3,
            output_len: 1,
            seed: 0,
        };
        let r = run(scheduler(fake(4, 100), 4), &opts, "fake", "f32").expect("runs");
        assert_eq!((r.finished, r.output_tokens), (2, 2));
        assert_eq!(r.itl, None);
        assert!(r.render().contains("ITL"));
    }
}
