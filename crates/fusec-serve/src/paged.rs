//! [`PagedEngine`]: the [`Engine`] over a paged, batched CPU session
//! ([`fusec_exec::PagedSession`]): every sequence's KV cache lives in blocks of one
//! pool per layer, and each step runs the listed sequences together, so the weights
//! stream once for all of them (vLLM's PagedAttention with Orca's iteration-level
//! batching; see `fusec_exec::paged`).
//!
//! A paged step feeds each of its sequences one token. An engine step whose work
//! feeds one sequence a chunk of `n` prompt tokens therefore runs as `n` session
//! steps: the first over every listed sequence (the decodes and each chunk's first
//! token), the next ones over the sequences with tokens left. A sequence's results
//! do not depend on which others share its steps (the paged kernel and the batched
//! GEMVs compute each row as they compute it alone), so a request's tokens are its
//! tokens served alone.

use std::collections::{HashMap, VecDeque};

use fusec_exec::kernels::gemv::MAX_ROW_DOT_ROWS;
use fusec_exec::{PagedConfig, PagedSession, PagedStep};

use crate::engine::{check_work, Engine, SeqId, Work};
use crate::error::EngineError;

/// A sequence: its id in the session, its queue, and the positions fed.
#[derive(Debug)]
struct Seq {
    id: fusec_exec::SeqId,
    queue: VecDeque<u32>,
    fed: usize,
}

/// The [`Engine`] over a [`PagedSession`] (see the module documentation).
#[derive(Debug)]
pub struct PagedEngine {
    session: PagedSession,
    config: PagedConfig,
    seqs: HashMap<SeqId, Seq>,
    next: u64,
    out: PagedStep,
    /// The session ids of one session step, and the work items they belong to.
    order: Vec<fusec_exec::SeqId>,
    items: Vec<usize>,
}

impl PagedEngine {
    /// An engine over `session` (a fresh one: no sequence added yet).
    pub fn new(session: PagedSession) -> PagedEngine {
        let config = session.config();
        PagedEngine {
            session,
            config,
            seqs: HashMap::new(),
            next: 0,
            out: PagedStep::default(),
            order: Vec::new(),
            items: Vec::new(),
        }
    }

    /// Sequences held now.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// The results of a session step over `self.order[start..]`: each sequence's
    /// queue advances by the token fed, and one whose queue that empties yields the
    /// session's greedy token, which is queued to be fed next.
    fn take_outputs(
        &mut self,
        work: &[Work],
        start: usize,
        produced: &mut Vec<(SeqId, u32)>,
    ) -> Result<(), EngineError> {
        let items = &self.items[start..];
        for (row, (&item, o)) in items.iter().zip(&self.out.outputs).enumerate() {
            let w = &work[item];
            let s = self
                .seqs
                .get_mut(&w.seq)
                .ok_or(EngineError::UnknownSequence(w.seq.0))?;
            s.queue.pop_front();
            s.fed += 1;
            if !s.queue.is_empty() {
                continue;
            }
            // The queue is empty: this step fed the prompt's last token or the
            // last generated one, so the session's greedy token is the next.
            let logits = self.out.logits.row(row);
            if let Some((index, &value)) = logits.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(EngineError::NonFinite {
                    seq: w.seq.0,
                    index,
                    value,
                });
            }
            let next = u32::try_from(o.next).map_err(|_| EngineError::BadToken {
                id: 0,
                vocab: self.session.vocab(),
            })?;
            s.queue.push_back(next);
            produced.push((w.seq, next));
        }
        Ok(())
    }
}

impl Engine for PagedEngine {
    fn max_context(&self) -> usize {
        self.config.max_len
    }

    fn vocab_size(&self) -> usize {
        self.session.vocab()
    }

    fn block_size(&self) -> usize {
        self.session.block_size()
    }

    fn total_blocks(&self) -> usize {
        self.config.pool_blocks
    }

    /// The blocks of the fullest pool (the whole-cache layers'; a sliding window's
    /// pools hold fewer).
    fn blocks_in_use(&self) -> usize {
        self.config.pool_blocks - self.session.free_blocks()
    }

    fn add(&mut self, tokens: &[u32], _reserve: usize) -> Result<SeqId, EngineError> {
        let vocab = self.session.vocab();
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadToken { id, vocab });
        }
        let seq = SeqId(self.next);
        if tokens.len() > self.config.max_len {
            return Err(EngineError::ContextFull {
                seq: seq.0,
                positions: tokens.len(),
                max: self.config.max_len,
            });
        }
        // Checked above: every id is below the vocabulary, so it fits an i32.
        let prompt: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let id = self.session.add(&prompt)?;
        self.next += 1;
        self.seqs.insert(
            seq,
            Seq {
                id,
                queue: tokens.iter().copied().collect(),
                fed: 0,
            },
        );
        Ok(seq)
    }

    fn step(&mut self, work: &[Work]) -> Result<Vec<(SeqId, u32)>, EngineError> {
        check_work(
            work,
            |seq| self.seqs.get(&seq).map(|s| (s.queue.len(), s.fed)),
            self.config.max_len,
            self.session.block_size(),
            self.session.free_blocks(),
        )?;
        let rounds = work.iter().map(|w| w.tokens).max().unwrap_or(0);
        let mut produced = Vec::new();
        for round in 0..rounds {
            self.order.clear();
            self.items.clear();
            for (i, w) in work.iter().enumerate() {
                if w.tokens > round {
                    let s = self
                        .seqs
                        .get(&w.seq)
                        .ok_or(EngineError::UnknownSequence(w.seq.0))?;
                    self.order.push(s.id);
                    self.items.push(i);
                }
            }
            // At most MAX_ROW_DOT_ROWS sequences a session step: the multi-row GEMVs
            // give each row its batch-1 bits up to there (the GEMM beyond it does
            // not), so a request's output never depends on how many share its step.
            for start in (0..self.order.len()).step_by(MAX_ROW_DOT_ROWS) {
                let end = (start + MAX_ROW_DOT_ROWS).min(self.order.len());
                self.session
                    .step_some_into(&self.order[start..end], &mut self.out)?;
                self.take_outputs(work, start, &mut produced)?;
            }
        }
        Ok(produced)
    }

    fn remove(&mut self, seq: SeqId) -> bool {
        match self.seqs.remove(&seq) {
            Some(s) => self.session.remove(s.id).is_ok(),
            None => false,
        }
    }
}
