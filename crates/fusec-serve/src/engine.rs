//! The [`Engine`] trait: what the scheduler needs of a model runner, and
//! [`SessionEngine`], the engine over the CPU executor.
//!
//! An engine holds sequences. Each has a queue of tokens not yet fed to the model: the
//! prompt when it is added, then each token the model produces. A step feeds every
//! listed sequence the next `tokens` of its queue (a chunk of its prompt, or its one
//! last generated token) and, for each sequence whose queue that step empties,
//! returns the next token, which goes into its queue to be fed next: the one a
//! [`Choose`] picks from the logits row (the scheduler's per-request sampler), given
//! the greedy one the graph computed.
//!
//! KV memory is counted in blocks of [`Engine::block_size`] positions: a sequence that
//! has been fed `n` tokens holds `ceil(n / block_size)` blocks. The scheduler plans
//! every step so that it fits in the free blocks (preempting sequences when it would
//! not); a step that would not fit fails with [`EngineError::OutOfBlocks`] and
//! changes nothing.

use std::collections::{HashMap, VecDeque};

use fusec_exec::{Executor, Session, StepOutput};

use crate::error::EngineError;

/// A sequence held by an engine.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// One sequence's part of a step: feed it the next `tokens` tokens of its queue.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Work {
    pub seq: SeqId,
    pub tokens: usize,
}

/// Picks a sequence's next token from its logits row and the greedy token (the
/// graph's argmax): `|seq, logits, greedy| token`.
pub type Choose<'a> = dyn FnMut(SeqId, &[f32], u32) -> u32 + 'a;

/// The token `choose` picks for `seq` from `logits`, checked: every logit finite
/// (a NaN or infinity means the model's numbers broke, and no choice is right), and
/// the token in the vocabulary.
pub(crate) fn choose_checked(
    choose: &mut Choose<'_>,
    seq: SeqId,
    logits: ndarray::ArrayView1<'_, f32>,
    greedy: i32,
) -> Result<u32, EngineError> {
    let vocab = logits.len();
    let logits = logits.as_slice().ok_or(EngineError::NonContiguous(seq.0))?;
    if let Some((index, &value)) = logits.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(EngineError::NonFinite {
            seq: seq.0,
            index,
            value,
        });
    }
    let greedy = u32::try_from(greedy).map_err(|_| EngineError::BadToken { id: 0, vocab })?;
    let token = choose(seq, logits, greedy);
    if token as usize >= vocab {
        return Err(EngineError::BadToken { id: token, vocab });
    }
    Ok(token)
}

/// The blocks `positions` positions take.
pub fn blocks_for(positions: usize, block_size: usize) -> usize {
    positions.div_ceil(block_size.max(1))
}

/// Checks the tokens a new sequence `seq` starts with: every id in the vocabulary,
/// and no more than `max_context` of them.
pub(crate) fn check_tokens(
    tokens: &[u32],
    vocab: usize,
    max_context: usize,
    seq: SeqId,
) -> Result<(), EngineError> {
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::BadToken { id, vocab });
    }
    if tokens.len() > max_context {
        return Err(EngineError::ContextFull {
            seq: seq.0,
            positions: tokens.len(),
            max: max_context,
        });
    }
    Ok(())
}

/// Checks a step's work whole before anything runs, so that a refused step changes
/// nothing: every sequence known and listed once, fed between 1 and its queued tokens,
/// within `max_context` positions, and the blocks it starts at most `free`. `state`
/// gives a sequence's queued and fed tokens.
pub(crate) fn check_work(
    work: &[Work],
    state: impl Fn(SeqId) -> Option<(usize, usize)>,
    max_context: usize,
    block_size: usize,
    free: usize,
) -> Result<(), EngineError> {
    let mut needed = 0;
    for (i, w) in work.iter().enumerate() {
        let (queued, fed) = state(w.seq).ok_or(EngineError::UnknownSequence(w.seq.0))?;
        if work[..i].iter().any(|o| o.seq == w.seq) {
            return Err(EngineError::Repeated(w.seq.0));
        }
        if w.tokens == 0 || w.tokens > queued {
            return Err(EngineError::NothingToFeed {
                seq: w.seq.0,
                asked: w.tokens,
                queued,
            });
        }
        let positions = fed + w.tokens;
        if positions > max_context {
            return Err(EngineError::ContextFull {
                seq: w.seq.0,
                positions,
                max: max_context,
            });
        }
        needed += blocks_for(positions, block_size) - blocks_for(fed, block_size);
    }
    if needed > free {
        return Err(EngineError::OutOfBlocks { needed, free });
    }
    Ok(())
}

/// A model runner the scheduler drives (see the module documentation).
///
/// Implementations: [`SessionEngine`] (one batch-1 session per sequence); a paged,
/// batched engine implements the same calls.
pub trait Engine {
    /// The most positions one sequence may hold (prompt and generated tokens).
    fn max_context(&self) -> usize;
    /// Token ids are below this.
    fn vocab_size(&self) -> usize;
    /// Positions per KV block.
    fn block_size(&self) -> usize;
    /// KV blocks in all.
    fn total_blocks(&self) -> usize;
    /// KV blocks the sequences hold now.
    fn blocks_in_use(&self) -> usize;
    /// Starts a sequence with `tokens` queued (nothing runs yet). `reserve` is the most
    /// positions it will reach, a hint for allocation.
    fn add(&mut self, tokens: &[u32], reserve: usize) -> Result<SeqId, EngineError>;
    /// One step over the listed sequences (see the module documentation): the next
    /// token of every sequence whose queue it emptied, as `choose` picks it, in the
    /// order of `work`. On error the sequences of the step are in an unspecified
    /// state: remove them.
    fn step(
        &mut self,
        work: &[Work],
        choose: &mut Choose<'_>,
    ) -> Result<Vec<(SeqId, u32)>, EngineError>;
    /// Forgets a sequence and frees its blocks; false if there was none.
    fn remove(&mut self, seq: SeqId) -> bool;
}

/// Positions beyond its tokens a new session's caches have room for at first.
const INITIAL_ROOM: usize = 256;

/// The settings of a [`SessionEngine`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SessionEngineConfig {
    /// Positions per KV block.
    pub block_size: usize,
    /// KV blocks in all: the positions all sequences together may hold, in blocks.
    pub total_blocks: usize,
    /// The most positions one sequence may hold (the model's context).
    pub max_context: usize,
}

/// An [`Engine`] over the CPU executor: one batch-1 [`Session`] per sequence, each on
/// a fork of one executor, so that every session reads the same packed weights
/// ([`Executor::fork`]). A step feeds each sequence's tokens one at a time through the
/// decode graph, as `fusec run --prompt` does, so a sequence's tokens never depend on
/// which others share its steps. Blocks are an accounting of positions: each session
/// allocates its caches for its tokens and a stretch of generation (at most `reserve`),
/// and doubles them when they fill.
#[derive(Debug)]
pub struct SessionEngine {
    base: Executor,
    config: SessionEngineConfig,
    vocab: usize,
    seqs: HashMap<SeqId, Seq>,
    next: u64,
    used: usize,
    out: StepOutput,
}

#[derive(Debug)]
struct Seq {
    session: Session,
    queue: VecDeque<u32>,
    fed: usize,
}

impl SessionEngine {
    /// An engine over `exec` (a decode-step executor; see `fusec_exec::decode`).
    pub fn new(exec: Executor, config: SessionEngineConfig) -> Result<SessionEngine, EngineError> {
        // A throwaway session checks the graph's decode interface and reads its vocabulary.
        let probe = Session::with_capacity(exec.fork(), 1, 1)?;
        let vocab = probe.vocab();
        Ok(SessionEngine {
            base: exec,
            config: SessionEngineConfig {
                block_size: config.block_size.max(1),
                ..config
            },
            vocab,
            seqs: HashMap::new(),
            next: 0,
            used: 0,
            out: StepOutput::default(),
        })
    }

    /// Sequences held now.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    fn blocks(&self, positions: usize) -> usize {
        blocks_for(positions, self.config.block_size)
    }
}

impl Engine for SessionEngine {
    fn max_context(&self) -> usize {
        self.config.max_context
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn block_size(&self) -> usize {
        self.config.block_size
    }

    fn total_blocks(&self) -> usize {
        self.config.total_blocks
    }

    fn blocks_in_use(&self) -> usize {
        self.used
    }

    fn add(&mut self, tokens: &[u32], reserve: usize) -> Result<SeqId, EngineError> {
        let seq = SeqId(self.next);
        check_tokens(tokens, self.vocab, self.config.max_context, seq)?;
        // Room for the tokens and a first stretch of generation; a cache that outgrows
        // it doubles (a request's `reserve` may be the whole context, which most never
        // reach).
        let room = reserve
            .min(tokens.len() + INITIAL_ROOM)
            .clamp(tokens.len().max(1), self.config.max_context.max(1));
        let session = Session::with_capacity(self.base.fork(), 1, room)?;
        self.next += 1;
        self.seqs.insert(
            seq,
            Seq {
                session,
                queue: tokens.iter().copied().collect(),
                fed: 0,
            },
        );
        Ok(seq)
    }

    fn step(
        &mut self,
        work: &[Work],
        choose: &mut Choose<'_>,
    ) -> Result<Vec<(SeqId, u32)>, EngineError> {
        let free = self.config.total_blocks.saturating_sub(self.used);
        check_work(
            work,
            |seq| self.seqs.get(&seq).map(|s| (s.queue.len(), s.fed)),
            self.config.max_context,
            self.config.block_size,
            free,
        )?;
        let block_size = self.config.block_size;
        let mut produced = Vec::new();
        for w in work {
            let s = self
                .seqs
                .get_mut(&w.seq)
                .ok_or(EngineError::UnknownSequence(w.seq.0))?;
            for _ in 0..w.tokens {
                let Some(token) = s.queue.pop_front() else {
                    break;
                };
                let before = blocks_for(s.fed, block_size);
                s.session.step_into(&[token as i32], &mut self.out)?;
                s.fed += 1;
                self.used += blocks_for(s.fed, block_size) - before;
            }
            if s.queue.is_empty() {
                let greedy = self.out.next.first().copied().unwrap_or(-1);
                let next = choose_checked(choose, w.seq, self.out.logits.row(0), greedy)?;
                s.queue.push_back(next);
                produced.push((w.seq, next));
            }
        }
        Ok(produced)
    }

    fn remove(&mut self, seq: SeqId) -> bool {
        match self.seqs.remove(&seq) {
            Some(s) => {
                self.used -= self.blocks(s.fed);
                true
            }
            None => false,
        }
    }
}

/// What a [`Hooked`] engine does around every step of the engine it wraps. Both
/// calls get the engine by shared reference, as the scheduler lends its engine only
/// that way between steps; a hook that keeps figures holds them in cells.
pub trait StepHook<E: ?Sized> {
    /// Runs before every step.
    fn before_step(&self, _engine: &E) {}
    /// Runs after every step, whether it succeeded or not, before the scheduler lets
    /// finished sequences go.
    fn after_step(&self, _engine: &E) {}
}

/// An engine with a [`StepHook`] around its steps; everything else passes through.
#[derive(Debug)]
pub struct Hooked<E, H> {
    pub engine: E,
    pub hook: H,
}

impl<E, H> Hooked<E, H> {
    pub fn new(engine: E, hook: H) -> Hooked<E, H> {
        Hooked { engine, hook }
    }
}

impl<E: Engine, H: StepHook<E>> Engine for Hooked<E, H> {
    fn max_context(&self) -> usize {
        self.engine.max_context()
    }

    fn vocab_size(&self) -> usize {
        self.engine.vocab_size()
    }

    fn block_size(&self) -> usize {
        self.engine.block_size()
    }

    fn total_blocks(&self) -> usize {
        self.engine.total_blocks()
    }

    fn blocks_in_use(&self) -> usize {
        self.engine.blocks_in_use()
    }

    fn add(&mut self, tokens: &[u32], reserve: usize) -> Result<SeqId, EngineError> {
        self.engine.add(tokens, reserve)
    }

    fn step(
        &mut self,
        work: &[Work],
        choose: &mut Choose<'_>,
    ) -> Result<Vec<(SeqId, u32)>, EngineError> {
        self.hook.before_step(&self.engine);
        let out = self.engine.step(work, choose);
        self.hook.after_step(&self.engine);
        out
    }

    fn remove(&mut self, seq: SeqId) -> bool {
        self.engine.remove(seq)
    }
}

/// A hook that waits a fixed time before every step: a slower model's pace, for tests
/// of what happens while requests run (`fusec serve --step-delay-ms`).
#[derive(Copy, Clone, Debug)]
pub struct Pace(pub std::time::Duration);

impl<E: ?Sized> StepHook<E> for Pace {
    fn before_step(&self, _engine: &E) {
        std::thread::sleep(self.0);
    }
}

/// An engine at a [`Pace`].
pub type Paced<E> = Hooked<E, Pace>;

/// A boxed engine is an engine: a server whose engine is chosen at run time
/// (`fusec serve --engine`).
impl<E: Engine + ?Sized> Engine for Box<E> {
    fn max_context(&self) -> usize {
        (**self).max_context()
    }

    fn vocab_size(&self) -> usize {
        (**self).vocab_size()
    }

    fn block_size(&self) -> usize {
        (**self).block_size()
    }

    fn total_blocks(&self) -> usize {
        (**self).total_blocks()
    }

    fn blocks_in_use(&self) -> usize {
        (**self).blocks_in_use()
    }

    fn add(&mut self, tokens: &[u32], reserve: usize) -> Result<SeqId, EngineError> {
        (**self).add(tokens, reserve)
    }

    fn step(
        &mut self,
        work: &[Work],
        choose: &mut Choose<'_>,
    ) -> Result<Vec<(SeqId, u32)>, EngineError> {
        (**self).step(work, choose)
    }

    fn remove(&mut self, seq: SeqId) -> bool {
        (**self).remove(seq)
    }
}
