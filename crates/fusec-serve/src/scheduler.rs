//! Continuous batching: a [`Scheduler`] admits requests between steps, runs every
//! admitted request's next tokens in one engine step, and lets finished ones go at once.
//!
//! Each [`Scheduler::step`]:
//!
//! 1. plans the running sequences' work within the step's token budget: first every
//!    decoding sequence (one token each), then the prompts being prefilled, oldest
//!    first, each a chunk of at most `prefill_chunk` tokens;
//! 2. if the new positions need more KV blocks than are free, preempts the youngest
//!    running sequence (evict and recompute: it leaves the engine, freeing its blocks,
//!    and goes back to the head of the queue with its prompt and the tokens it has
//!    generated, which are fed again when it is readmitted; what it streamed stays
//!    streamed), and plans again;
//! 3. admits waiting requests in order while the budget has tokens left, fewer than
//!    `max_running` sequences run, and the free blocks hold the whole of the
//!    request's tokens so far (a request that does not fit waits, and so do the ones
//!    behind it, so none starves);
//! 4. runs the engine step and turns its tokens into [`Event`]s: a token, or the end
//!    of a request at a stop id (not emitted) or at `max_tokens`, after which it leaves
//!    the engine.
//!
//! No request is lost: a request leaves only finished, failed (an engine error fails
//! the requests of that step) or cancelled. It cannot wait forever either: a request
//! is refused at submission unless it fits in the whole KV capacity on its own, so the
//! oldest running sequence can always run.

use std::collections::VecDeque;

use fusec_text::{Sampler, SamplingOptions};

use crate::engine::{blocks_for, Engine, SeqId, Work};
use crate::error::{ConfigError, EngineError, SubmitError};

/// The scheduler's settings.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences in the engine at once.
    pub max_running: usize,
    /// Tokens fed per step, prompt chunks and decodes together (at least
    /// `max_running`, so that every decoding sequence advances every step).
    pub token_budget: usize,
    /// The most prompt tokens one sequence is fed in one step.
    pub prefill_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            max_running: 16,
            token_budget: 256,
            prefill_chunk: 128,
        }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_running == 0 {
            return Err(ConfigError("max_running must be at least 1".into()));
        }
        if self.prefill_chunk == 0 {
            return Err(ConfigError("prefill_chunk must be at least 1".into()));
        }
        if self.token_budget < self.max_running {
            return Err(ConfigError(format!(
                "the token budget ({}) must be at least max_running ({}), so that every running sequence advances every step",
                self.token_budget, self.max_running
            )));
        }
        Ok(())
    }
}

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Ids that end the request (end-of-sequence ids); the id itself is not emitted.
    pub stop_ids: Vec<u32>,
    /// How each token is chosen: greedy by default; with a temperature, drawn from
    /// the request's own generator seeded with `seed`, so that a request's tokens do
    /// not depend on what shares its steps (nor on a preemption: the generator stays
    /// with the request, and recomputed tokens are fed again, not drawn again).
    pub sampling: SamplingOptions,
}

impl Request {
    /// A greedy request.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize, stop_ids: Vec<u32>) -> Request {
        Request {
            prompt,
            max_tokens,
            stop_ids,
            sampling: SamplingOptions::default(),
        }
    }
}

/// A request, by the order it was submitted in.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Why a request ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Finish {
    /// It generated `max_tokens` tokens.
    Length,
    /// It generated a stop id.
    Stop,
}

impl Finish {
    /// The OpenAI API's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Length => "length",
            Finish::Stop => "stop",
        }
    }
}

/// What a step did for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Token { id: RequestId, token: u32 },
    Finished { id: RequestId, reason: Finish },
    Failed { id: RequestId, error: String },
}

impl Event {
    pub fn request(&self) -> RequestId {
        match self {
            Event::Token { id, .. } | Event::Finished { id, .. } | Event::Failed { id, .. } => *id,
        }
    }
}

/// Counts since the scheduler started, and the state now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub waiting: usize,
    pub running: usize,
    pub blocks_in_use: usize,
    pub total_blocks: usize,
    pub block_size: usize,
    pub steps: u64,
    /// Tokens fed to the engine (prompt chunks, recomputed tokens and decodes).
    pub tokens_fed: u64,
    pub tokens_generated: u64,
    pub preemptions: u64,
    pub finished: u64,
    pub failed: u64,
    pub cancelled: u64,
}

#[derive(Debug)]
struct Entry {
    id: RequestId,
    request: Request,
    /// The request's sampler; `None` for greedy decoding, which takes the graph's
    /// argmax as it is.
    sampler: Option<Sampler>,
    generated: Vec<u32>,
    /// The engine's sequence while admitted.
    seq: Option<SeqId>,
    /// Tokens the engine has been fed since it was (re)admitted.
    fed: usize,
    /// Tokens queued in the engine, not yet fed.
    pending: usize,
    /// When it was last admitted: the youngest is preempted first.
    admitted: u64,
}

/// A step's plan: (index in `running`, tokens to feed), and the token budget and free
/// blocks left after it.
#[derive(Debug)]
struct Plan {
    work: Vec<(usize, usize)>,
    budget: usize,
    free: usize,
}

/// The scheduler over an engine. See the module documentation.
#[derive(Debug)]
pub struct Scheduler<E> {
    engine: E,
    config: SchedulerConfig,
    waiting: VecDeque<Entry>,
    running: Vec<Entry>,
    next_id: u64,
    admissions: u64,
    stats: SchedulerStats,
}

impl<E: Engine> Scheduler<E> {
    pub fn new(engine: E, config: SchedulerConfig) -> Result<Scheduler<E>, ConfigError> {
        config.validate()?;
        Ok(Scheduler {
            engine,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            admissions: 0,
            stats: SchedulerStats::default(),
        })
    }

    pub fn engine(&self) -> &E {
        &self.engine
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Whether no request is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Checks `request` against the engine's vocabulary, context and capacity, and
    /// its sampling options.
    pub fn check(&self, request: &Request) -> Result<(), SubmitError> {
        request
            .sampling
            .validate()
            .map_err(|e| SubmitError::Sampling(e.to_string()))?;
        let prompt = request.prompt.len();
        if prompt == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        if request.max_tokens == 0 {
            return Err(SubmitError::NoTokens);
        }
        let vocab = self.engine.vocab_size();
        if let Some(&id) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(SubmitError::BadToken { id, vocab });
        }
        let needed = prompt.saturating_add(request.max_tokens);
        let max = self.engine.max_context();
        if needed > max {
            return Err(SubmitError::OverContext {
                needed,
                prompt,
                max_tokens: request.max_tokens,
                max,
            });
        }
        let blocks = blocks_for(needed, self.engine.block_size());
        if blocks > self.engine.total_blocks() {
            return Err(SubmitError::OverCapacity {
                needed: blocks,
                positions: needed,
                total: self.engine.total_blocks(),
            });
        }
        Ok(())
    }

    /// Queues a request; it joins the running ones at a coming step.
    pub fn submit(&mut self, request: Request) -> Result<RequestId, SubmitError> {
        self.check(&request)?;
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let sampler = match request.sampling.is_greedy() {
            true => None,
            false => Some(
                Sampler::new(request.sampling.clone())
                    .map_err(|e| SubmitError::Sampling(e.to_string()))?,
            ),
        };
        self.waiting.push_back(Entry {
            id,
            request,
            sampler,
            generated: Vec::new(),
            seq: None,
            fed: 0,
            pending: 0,
            admitted: 0,
        });
        Ok(id)
    }

    /// Drops a request, waiting or running, freeing its blocks; false if there was none.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|e| e.id == id) {
            self.waiting.remove(i);
        } else if let Some(i) = self.running.iter().position(|e| e.id == id) {
            let entry = self.running.swap_remove(i);
            if let Some(seq) = entry.seq {
                self.engine.remove(seq);
            }
        } else {
            return false;
        }
        self.stats.cancelled += 1;
        true
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            waiting: self.waiting.len(),
            running: self.running.len(),
            blocks_in_use: self.engine.blocks_in_use(),
            total_blocks: self.engine.total_blocks(),
            block_size: self.engine.block_size(),
            ..self.stats.clone()
        }
    }

    /// Evicts the youngest running sequence to the head of the queue.
    fn preempt_youngest(&mut self) {
        let Some(i) = (0..self.running.len()).max_by_key(|&i| self.running[i].admitted) else {
            return;
        };
        let mut entry = self.running.swap_remove(i);
        if let Some(seq) = entry.seq.take() {
            self.engine.remove(seq);
        }
        entry.fed = 0;
        entry.pending = 0;
        self.stats.preemptions += 1;
        self.waiting.push_front(entry);
    }

    /// The running sequences' work for this step (step 1 of the module documentation),
    /// with the budget and blocks it leaves; None when it needs more blocks than are free.
    fn plan_running(&self) -> Option<Plan> {
        let block_size = self.engine.block_size();
        let free = self
            .engine
            .total_blocks()
            .saturating_sub(self.engine.blocks_in_use());
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        // Decodes first, then prefills oldest first.
        order.sort_by_key(|&i| (self.running[i].pending > 1, self.running[i].admitted));
        let mut budget = self.config.token_budget;
        let mut need = 0;
        let mut plan = Vec::new();
        for i in order {
            let e = &self.running[i];
            let n = e.pending.min(self.config.prefill_chunk).min(budget);
            if n == 0 {
                continue;
            }
            need += blocks_for(e.fed + n, block_size) - blocks_for(e.fed, block_size);
            budget -= n;
            plan.push((i, n));
        }
        (need <= free).then(|| Plan {
            work: plan,
            budget,
            free: free - need,
        })
    }

    /// One step (see the module documentation): the events of the requests it ran.
    /// Nothing to run is an empty step.
    pub fn step(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        let Plan {
            work: mut plan,
            mut budget,
            mut free,
        } = loop {
            match self.plan_running() {
                Some(p) => break p,
                None => self.preempt_youngest(),
            }
        };
        let block_size = self.engine.block_size();
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some(head) = self.waiting.front() else {
                break;
            };
            let tokens = head.request.prompt.len() + head.generated.len();
            if blocks_for(tokens, block_size) > free {
                break;
            }
            let Some(mut entry) = self.waiting.pop_front() else {
                break;
            };
            let mut all = entry.request.prompt.clone();
            all.extend_from_slice(&entry.generated);
            let reserve = entry.request.prompt.len() + entry.request.max_tokens;
            match self.engine.add(&all, reserve) {
                Ok(seq) => {
                    entry.seq = Some(seq);
                    entry.fed = 0;
                    entry.pending = all.len();
                    self.admissions += 1;
                    entry.admitted = self.admissions;
                    let n = entry.pending.min(self.config.prefill_chunk).min(budget);
                    budget -= n;
                    free -= blocks_for(n, block_size);
                    self.running.push(entry);
                    plan.push((self.running.len() - 1, n));
                }
                Err(e) => {
                    self.stats.failed += 1;
                    events.push(Event::Failed {
                        id: entry.id,
                        error: e.to_string(),
                    });
                }
            }
        }
        if plan.is_empty() {
            return events;
        }
        let work: Vec<Work> = plan
            .iter()
            .filter_map(|&(i, n)| self.running[i].seq.map(|seq| Work { seq, tokens: n }))
            .collect();
        let running = &mut self.running;
        let result = self.engine.step(&work, &mut |seq, logits, greedy| {
            match running.iter_mut().find(|e| e.seq == Some(seq)) {
                Some(Entry {
                    sampler: Some(sampler),
                    request,
                    generated,
                    ..
                }) => {
                    // What the repetition penalty counts: the prompt and the output.
                    let seen = match request.sampling.repetition_penalty {
                        Some(_) => [&request.prompt[..], &generated[..]].concat(),
                        None => Vec::new(),
                    };
                    sampler.next(logits, &seen)
                }
                _ => greedy,
            }
        });
        self.stats.steps += 1;
        match result {
            Ok(produced) => {
                for &(i, n) in &plan {
                    self.running[i].fed += n;
                    self.running[i].pending -= n;
                    self.stats.tokens_fed += n as u64;
                }
                for (seq, token) in produced {
                    self.produced(seq, token, &mut events);
                }
                self.running.retain(|e| e.seq.is_some());
            }
            Err(e) => self.fail_step(&plan, &e, &mut events),
        }
        events
    }

    /// A token the engine produced for `seq`: emitted, or the end of its request.
    fn produced(&mut self, seq: SeqId, token: u32, events: &mut Vec<Event>) {
        let Some(entry) = self.running.iter_mut().find(|e| e.seq == Some(seq)) else {
            return;
        };
        entry.pending = 1;
        self.stats.tokens_generated += 1;
        let finish = if entry.request.stop_ids.contains(&token) {
            Some(Finish::Stop)
        } else {
            entry.generated.push(token);
            events.push(Event::Token {
                id: entry.id,
                token,
            });
            (entry.generated.len() >= entry.request.max_tokens).then_some(Finish::Length)
        };
        if let Some(reason) = finish {
            events.push(Event::Finished {
                id: entry.id,
                reason,
            });
            // Marked to leave; `step` drops it from `running`.
            entry.seq = None;
            self.engine.remove(seq);
            self.stats.finished += 1;
        }
    }

    /// An engine error fails every request of the step.
    fn fail_step(&mut self, plan: &[(usize, usize)], error: &EngineError, events: &mut Vec<Event>) {
        let mut failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
        failed.sort_unstable();
        for i in failed.into_iter().rev() {
            let entry = self.running.swap_remove(i);
            if let Some(seq) = entry.seq {
                self.engine.remove(seq);
            }
            self.stats.failed += 1;
            events.push(Event::Failed {
                id: entry.id,
                error: error.to_string(),
            });
        }
    }
}
