//! [`PagedEngine`]: the [`Engine`] over a paged, batched CPU session
//! ([`fusec_exec::PagedSession`]): every sequence's KV cache lives in blocks of one
//! pool per layer, and each step runs the listed sequences together, so the weights
//! stream once for all of them (vLLM's PagedAttention with Orca's iteration-level
//! batching; see `fusec_exec::paged`).
//!
//! A paged step runs ragged rows, one token each: a decoding sequence is one row, a
//! prompt chunk of `n` tokens `n` rows at consecutive positions
//! ([`PagedSession::step_chunks_into`]). An engine step lays its work out as rows in
//! order and runs them in session steps of at most [`MAX_ROW_DOT_ROWS`] rows (a chunk
//! may straddle two: its later rows see the earlier ones' entries in the pools). A
//! row's results do not depend on which others share its step (the paged kernel and
//! the multi-row GEMVs compute each row as they compute it alone), so a request's
//! tokens are its tokens served alone, and a chunked prompt gives the bits of
//! token-by-token prefill.

use std::collections::{HashMap, VecDeque};

use fusec_exec::kernels::gemv::MAX_ROW_DOT_ROWS;
use fusec_exec::{PagedConfig, PagedSession, PagedStep};

use crate::engine::{check_tokens, check_work, choose_checked, Choose, Engine, SeqId, Work};
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
    /// One session step's sequences and their tokens, and the work item of each row.
    feeds: Vec<(fusec_exec::SeqId, usize)>,
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
            feeds: Vec::new(),
            items: Vec::new(),
        }
    }

    /// Sequences held now.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Runs `self.feeds` as one session step, then takes its results: each row
    /// advances its sequence's queue by the token fed, and a row that empties the
    /// queue yields the token `choose` picks, which is queued to be fed next (and
    /// replaces the session's greedy one when it differs).
    fn run_rows(
        &mut self,
        work: &[Work],
        choose: &mut Choose<'_>,
        produced: &mut Vec<(SeqId, u32)>,
    ) -> Result<(), EngineError> {
        self.session.step_chunks_into(&self.feeds, &mut self.out)?;
        for (row, (&item, o)) in self.items.iter().zip(&self.out.outputs).enumerate() {
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
            // last generated one, so the row's prediction is the next token.
            let next = choose_checked(choose, w.seq, self.out.logits.row(row), o.next)?;
            if i64::from(next) != i64::from(o.next) {
                self.session.set_next(s.id, next as i32)?;
            }
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
        let seq = SeqId(self.next);
        check_tokens(tokens, self.session.vocab(), self.config.max_len, seq)?;
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

    fn step(
        &mut self,
        work: &[Work],
        choose: &mut Choose<'_>,
    ) -> Result<Vec<(SeqId, u32)>, EngineError> {
        check_work(
            work,
            |seq| self.seqs.get(&seq).map(|s| (s.queue.len(), s.fed)),
            self.config.max_len,
            self.session.block_size(),
            self.session.free_blocks(),
        )?;
        let mut produced = Vec::new();
        self.feeds.clear();
        self.items.clear();
        for (item, w) in work.iter().enumerate() {
            let id = self
                .seqs
                .get(&w.seq)
                .ok_or(EngineError::UnknownSequence(w.seq.0))?
                .id;
            let mut left = w.tokens;
            while left > 0 {
                // At most MAX_ROW_DOT_ROWS rows a session step: the multi-row GEMVs
                // give each row its batch-1 bits up to there (the GEMM beyond it does
                // not), so a request's output never depends on what shares its step.
                let n = left.min(MAX_ROW_DOT_ROWS - self.items.len());
                self.feeds.push((id, n));
                self.items.extend(std::iter::repeat_n(item, n));
                left -= n;
                if self.items.len() == MAX_ROW_DOT_ROWS {
                    self.run_rows(work, choose, &mut produced)?;
                    self.feeds.clear();
                    self.items.clear();
                }
            }
        }
        if !self.items.is_empty() {
            self.run_rows(work, choose, &mut produced)?;
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
