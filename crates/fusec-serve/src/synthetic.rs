//! [`SyntheticEngine`]: an [`Engine`] without a model, for tests and measurements of
//! what sits around one (the scheduler, the server, the serving benchmark's loop).
//!
//! Its next token is a hash of every token a sequence was fed, so a sequence's tokens
//! depend on its whole history (a recompute after preemption that fed anything else
//! would show) and never on other sequences; its logits row is a pseudo-random row
//! seeded by the same hash, for a sampler to draw from. It checks what a real engine
//! checks (known sequences, queued tokens, the context, free blocks) and reports it as
//! the same [`EngineError`]s.

use std::collections::{HashMap, VecDeque};

use crate::engine::{blocks_for, Choose, Engine, SeqId, Work};
use crate::error::EngineError;

/// FNV-1a's offset basis and prime (Fowler, Noll, Vo), the history hash.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x100_0000_01b3;

/// An engine without a model (see the module documentation).
#[derive(Debug)]
pub struct SyntheticEngine {
    block_size: usize,
    total_blocks: usize,
    max_context: usize,
    vocab: usize,
    seqs: HashMap<SeqId, Sequence>,
    next: u64,
    /// Every step's work, in order, for a test to inspect.
    pub log: Vec<Vec<Work>>,
    /// A step that feeds this token fails with [`EngineError::BadToken`]: an engine
    /// error in the middle of a run, on demand.
    pub poison: Option<u32>,
}

#[derive(Debug)]
struct Sequence {
    queue: VecDeque<u32>,
    hash: u64,
    fed: usize,
}

impl SyntheticEngine {
    /// `total_blocks` KV blocks of `block_size` positions, sequences of at most
    /// `max_context` positions, a vocabulary of `vocab` tokens (at least 1).
    pub fn new(
        block_size: usize,
        total_blocks: usize,
        max_context: usize,
        vocab: usize,
    ) -> SyntheticEngine {
        SyntheticEngine {
            block_size,
            total_blocks,
            max_context,
            vocab: vocab.max(1),
            seqs: HashMap::new(),
            next: 0,
            log: Vec::new(),
            poison: None,
        }
    }

    /// The sequences it holds.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// The blocks `work` needs beyond what its sequences hold.
    fn blocks_needed(&self, work: &[Work]) -> Result<usize, EngineError> {
        work.iter().try_fold(0, |needed, w| {
            let s = self
                .seqs
                .get(&w.seq)
                .ok_or(EngineError::UnknownSequence(w.seq.0))?;
            Ok(needed + blocks_for(s.fed + w.tokens, self.block_size)
                - blocks_for(s.fed, self.block_size))
        })
    }
}

impl Engine for SyntheticEngine {
    fn max_context(&self) -> usize {
        self.max_context
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn total_blocks(&self) -> usize {
        self.total_blocks
    }

    fn blocks_in_use(&self) -> usize {
        self.seqs
            .values()
            .map(|s| blocks_for(s.fed, self.block_size))
            .sum()
    }

    fn add(&mut self, tokens: &[u32], _reserve: usize) -> Result<SeqId, EngineError> {
        let id = SeqId(self.next);
        self.next += 1;
        self.seqs.insert(
            id,
            Sequence {
                queue: tokens.iter().copied().collect(),
                hash: FNV_OFFSET,
                fed: 0,
            },
        );
        Ok(id)
    }

    fn step(
        &mut self,
        work: &[Work],
        choose: &mut Choose<'_>,
    ) -> Result<Vec<(SeqId, u32)>, EngineError> {
        let needed = self.blocks_needed(work)?;
        let free = self.total_blocks.saturating_sub(self.blocks_in_use());
        if needed > free {
            return Err(EngineError::OutOfBlocks { needed, free });
        }
        self.log.push(work.to_vec());
        let vocab = self.vocab;
        let mut out = Vec::new();
        for w in work {
            let s = self
                .seqs
                .get_mut(&w.seq)
                .ok_or(EngineError::UnknownSequence(w.seq.0))?;
            if w.tokens == 0 || w.tokens > s.queue.len() {
                return Err(EngineError::NothingToFeed {
                    seq: w.seq.0,
                    asked: w.tokens,
                    queued: s.queue.len(),
                });
            }
            if s.fed + w.tokens > self.max_context {
                return Err(EngineError::ContextFull {
                    seq: w.seq.0,
                    positions: s.fed + w.tokens,
                    max: self.max_context,
                });
            }
            for t in s.queue.drain(..w.tokens) {
                if Some(t) == self.poison {
                    return Err(EngineError::BadToken { id: t, vocab });
                }
                s.hash = (s.hash ^ u64::from(t)).wrapping_mul(FNV_PRIME);
                s.fed += 1;
            }
            if s.queue.is_empty() {
                // The greedy pick and the row are both functions of the history alone
                // (the pick is not the row's arg-max: nothing here needs them to agree).
                let greedy = ((s.hash >> 33) % vocab as u64) as u32;
                let logits: Vec<f32> = (0..vocab as u64)
                    .map(|i| {
                        let h = (s.hash ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        (h >> 40) as f32 / (1u64 << 22) as f32
                    })
                    .collect();
                let next = choose(w.seq, &logits, greedy);
                s.queue.push_back(next);
                out.push((w.seq, next));
            }
        }
        Ok(out)
    }

    fn remove(&mut self, seq: SeqId) -> bool {
        self.seqs.remove(&seq).is_some()
    }
}
