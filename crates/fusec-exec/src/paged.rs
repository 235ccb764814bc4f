//! Ragged batched decoding over a paged KV cache: a [`PagedSession`] runs a paged step
//! graph (`fusec_model::blocks::StepDims::paged`) over whatever sequences are live,
//! each at its own position, and lets sequences join and leave between steps. It is
//! the host side of vLLM's PagedAttention (Kwon et al. 2023, "Efficient Memory
//! Management for Large Language Model Serving with PagedAttention", sections 4.1-4.3):
//! each layer's keys and values live in a pool of fixed-size blocks, every sequence
//! has a block table, blocks are taken from a free list as a sequence grows (growth
//! copies nothing) and go back when it ends, and a continuous-batching scheduler
//! (Yu et al. 2022, "Orca", iteration-level scheduling) decides between steps which
//! sequences run.
//!
//! **The graph's interface.** Data inputs `input_ids` `[B,1]`, `position_ids` `[B,1]`
//! (each row's position, which is also where its new entry goes), the block table
//! `block_table` `[B,M]` (each row's sequence's blocks) and, for layers with a sliding
//! window of `W` positions, their own `block_table.windowW`; state inputs
//! `past.L.key`/`past.L.value`, the pools `[P,KV,BS,hd]`, carried to the state outputs
//! of the same names; outputs `logits` `[B,1,V]` and `next_token` `[B,1]`. `B` is the
//! number of token rows this step, `P` the pool's blocks and `M` the most blocks one
//! sequence may hold (`max_len / BS`, rounded up).
//!
//! **Ragged rows.** A row is one token of one sequence, so a step mixes decodes (one
//! row of a sequence) with prompt chunks (several rows of one sequence at consecutive
//! positions, each carrying a copy of the sequence's block-table row): the flattened
//! token batch of vLLM and Sarathi-Serve (Agrawal et al. 2024, "Taming
//! Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve", chunked prefills
//! batched with decodes). Causality within a chunk needs no mask: the paged attention
//! writes every row's new entry before any row reads, and a row at position `p` reads
//! positions `..= p` only. Every other op computes each row alone, so a row gets the
//! bits it gets fed on its own, and a chunked prompt the bits of token-by-token
//! prefill.
//!
//! **Blocks.** There is one free list per block table (the whole-cache layers', and
//! one per window): block `i` of every pool of that table's layers belongs to the same
//! sequence, so a block counts once per table, as vLLM's block manager counts it. A
//! sequence at position `p` holds the blocks of its positions `0 ..= p`, and in a
//! window's table only those of `p - W < j <= p`: before each step, blocks that have
//! fallen out of the window are returned (the "Sliding window" of vLLM's block
//! manager). [`PagedSession::blocks_in_use`] is therefore exactly what the live
//! sequences need, never `batch x max length`.
//!
//! **A sequence's life.** [`PagedSession::add`] registers a prompt; each
//! [`PagedSession::step`] feeds every live sequence one token: the next prompt token
//! while the prompt lasts, then its own last greedy token;
//! [`PagedSession::step_chunks_into`] feeds chosen sequences a chunk of their prompts
//! (or their one generated token) instead. A row's output is a prediction once it fed
//! the prompt's last token or a generated one ([`SeqOutput::generated`]).
//! [`PagedSession::remove`] ends a sequence and frees its blocks. Everything is
//! deterministic: live sequences run in the order of their ids, and the pools' block
//! ids are handed out lowest first.
//!
//! **Errors.** Bad requests (an unknown [`SeqId`], an empty prompt, a token outside
//! the vocabulary, a sequence past `max_len`, a pool without enough free blocks) are
//! [`PagedError`]s, and leave the session as it was. (A step that fails inside the
//! graph may already have written its new entries into the pools, at positions no
//! sequence has committed; the next step writes them again.)

use std::collections::BTreeMap;
use std::sync::Arc;

use fusec_ir::shape::Bindings;
use fusec_ir::{step, DType, Dim, FusedOp, Graph, InputKind, Op, OperandRole, OutputKind};
use ndarray::{Array2, ArrayView1};

use crate::error::Error;
use crate::exec::{self, Executor, RunOutput, Value};
use crate::pool;
use crate::profile::StepStats;
use crate::tensor::{Dims, Tensor};

/// A sequence of a [`PagedSession`], as [`PagedSession::add`] returns it. Ids are
/// never reused within a session.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sequence {}", self.0)
    }
}

/// What can go wrong driving a [`PagedSession`]. All but [`PagedError::Exec`] are the
/// caller's: the session is unchanged after any of them.
#[derive(Debug, thiserror::Error)]
pub enum PagedError {
    #[error("{0} is not live in this session")]
    UnknownSequence(SeqId),
    /// [`PagedSession::step_some_into`] or [`PagedSession::step_chunks_into`] given a
    /// sequence twice.
    #[error("{0} is listed twice for one step")]
    Repeated(SeqId),
    /// [`PagedSession::step_chunks_into`] asked a sequence for more tokens than it
    /// has to feed: the rest of its prompt, or its one generated token (the tokens
    /// after it do not exist yet), and at least one.
    #[error("{seq} cannot be fed {asked} tokens in one step: it has {available}")]
    TooManyTokens {
        seq: SeqId,
        asked: usize,
        available: usize,
    },
    #[error("a prompt needs at least one token")]
    EmptyPrompt,
    /// [`PagedSession::set_next`] on a sequence still feeding its prompt.
    #[error("{0} has not finished its prompt: it has no generated token to replace")]
    Prefilling(SeqId),
    #[error("token {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: i32, vocab: usize },
    /// The step needs more blocks of a pool than are free. A scheduler would remove
    /// (preempt) a sequence and step again.
    #[error("out of KV blocks: the step needs {needed} more of {table}'s pool, {free} are free")]
    OutOfBlocks {
        table: String,
        needed: usize,
        free: usize,
    },
    /// A sequence would pass the session's `max_len` positions (its block table's width).
    #[error("{seq} would reach position {position}, past the session's {max_len} positions")]
    TooLong {
        seq: SeqId,
        position: usize,
        max_len: usize,
    },
    /// The session's configuration does not fit the graph.
    #[error("paged session: {0}")]
    Config(String),
    /// Running the step failed (an invalid graph, a kernel's error).
    #[error(transparent)]
    Exec(#[from] Error),
}

/// The sizes of a [`PagedSession`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PagedConfig {
    /// Blocks in each layer's pool (`P`): what all live sequences together may hold.
    pub pool_blocks: usize,
    /// The most positions one sequence may reach (prompt plus generated tokens).
    pub max_len: usize,
}

/// One row's result of a step: one token fed to one sequence.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SeqOutput {
    pub seq: SeqId,
    /// The position this row fed.
    pub position: usize,
    /// The greedy next token.
    pub next: i32,
    /// Whether this row fed the last prompt token or a generated one, so that `next`
    /// is a generated token (it was appended to the sequence's output and is fed
    /// next step); `false` while the prompt is being fed.
    pub generated: bool,
}

/// One step's results, a row per token fed: in the order of the sequences' ids (or
/// the order asked for), a sequence's rows together in position order. Kept from step
/// to step and handed to [`PagedSession::step_into`], its buffers keep their capacity.
#[derive(Clone, Debug, Default)]
pub struct PagedStep {
    pub outputs: Vec<SeqOutput>,
    /// `[rows, vocab]`, row `i` for `outputs[i]`.
    pub logits: Array2<f32>,
    pub stats: StepStats,
}

impl PagedStep {
    /// The logits row of `seq`'s last token this step, if it ran.
    pub fn logits_of(&self, seq: SeqId) -> Option<ArrayView1<'_, f32>> {
        let i = self.outputs.iter().rposition(|o| o.seq == seq)?;
        Some(self.logits.row(i))
    }
}

/// One block table of the graph, with its free list.
#[derive(Debug)]
struct Table {
    name: Arc<str>,
    /// The sliding window of its layers, in positions.
    window: Option<usize>,
    /// Free block ids, highest first, so that `pop` hands out the lowest.
    free: Vec<i32>,
}

/// A live sequence.
#[derive(Debug)]
struct Seq {
    prompt: Vec<i32>,
    /// Tokens generated so far.
    generated: Vec<i32>,
    /// Positions cached (the next position to feed).
    len: usize,
    /// Per table: the block of each logical block `i` (positions `i*BS ..`), `None`
    /// once freed (out of a window) or not yet allocated.
    blocks: Vec<Vec<Option<i32>>>,
}

impl Seq {
    /// The token fed at position `position` (at least `len`, and `len` itself once
    /// the prompt is fed: see [`Seq::feedable`]).
    fn token_at(&self, position: usize) -> i32 {
        match self.prompt.get(position) {
            Some(&t) => t,
            None => self.generated.last().copied().unwrap_or(0),
        }
    }

    /// Tokens one step can feed: the rest of the prompt, or the last generated token
    /// (the ones after it are this step's outputs).
    fn feedable(&self) -> usize {
        self.prompt.len().saturating_sub(self.len).max(1)
    }
}

/// What a data input holds.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Feed {
    Ids,
    Positions,
    /// Table `i` of `PagedSession::tables`.
    Table(usize),
}

/// A decoding session over a paged step graph. See the module documentation.
#[derive(Debug)]
pub struct PagedSession {
    exec: Executor,
    block_size: usize,
    config: PagedConfig,
    /// `M`: the width of the block tables.
    max_blocks: usize,
    inputs: Vec<Option<Tensor>>,
    /// The pools' input positions and names.
    states: Vec<(usize, Arc<str>)>,
    data: Vec<(usize, Feed)>,
    tables: Vec<Table>,
    seqs: BTreeMap<SeqId, Seq>,
    next_id: u64,
    vocab: usize,
    /// Bytes of one block of one pool.
    block_bytes: u64,
    /// Pools per table (two per layer that reads it).
    pools_per_table: Vec<usize>,
    bindings: Bindings,
    run: RunOutput,
    /// The sequences of the running step, in order, and the tokens each is fed.
    order: Vec<(SeqId, usize)>,
    /// The blocks given out by the running step, `(table, sequence)`.
    fresh: Vec<(usize, SeqId)>,
}

fn config_error(message: impl Into<String>) -> PagedError {
    PagedError::Config(message.into())
}

impl PagedSession {
    /// A session over `exec`'s paged step graph with pools of `config.pool_blocks`
    /// blocks (allocated now) and sequences of at most `config.max_len` positions.
    pub fn new(exec: Executor, config: PagedConfig) -> Result<PagedSession, PagedError> {
        let graph = exec.graph();
        let block_size = block_size(graph)?;
        if config.pool_blocks == 0 || config.max_len == 0 {
            return Err(config_error("the pool and the sequences need room"));
        }
        let max_blocks = config.max_len.div_ceil(block_size);
        // Block ids are i32 in the table.
        if i32::try_from(config.pool_blocks).is_err() || i32::try_from(config.max_len).is_err() {
            return Err(config_error("the pool or max_len overflows i32 block ids"));
        }
        let bindings = Bindings::new()
            .with(step::BATCH, 1)
            .with(step::POOL_BLOCKS, config.pool_blocks as u64)
            .with(step::MAX_BLOCKS, max_blocks as u64);
        let (mut inputs, mut states, mut data, mut tables) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut block_bytes = 0;
        for (index, (id, name, kind)) in graph.inputs().into_iter().enumerate() {
            let ty = graph
                .ty(id)
                .tensor()
                .ok_or_else(|| config_error(format!("input `{name}` has a tuple type")))?;
            match kind {
                InputKind::Data if ty.dtype != DType::I32 || ty.rank() != 2 => {
                    return Err(config_error(format!(
                        "data input `{name}` is {ty}, not [B, ..] i32"
                    )))
                }
                InputKind::State => {
                    let shape = exec::dims(&ty.shape, &bindings)?;
                    let t = Tensor::zeros(ty.dtype, &shape)
                        .map_err(|e| config_error(format!("pool `{name}`: {e}")))?;
                    block_bytes = ty
                        .dtype
                        .bytes_for(shape.iter().skip(1).product::<usize>() as u64);
                    inputs.push(Some(t));
                    states.push((index, Arc::from(name)));
                    continue;
                }
                InputKind::Data if name == step::INPUT_IDS => data.push((index, Feed::Ids)),
                InputKind::Data if name == step::POSITION_IDS => {
                    data.push((index, Feed::Positions))
                }
                InputKind::Data => match step::table_window(name) {
                    Some(window) => {
                        let window = window
                            .map(usize::try_from)
                            .transpose()
                            .map_err(|_| config_error("a window overflows usize"))?;
                        data.push((index, Feed::Table(tables.len())));
                        tables.push(Table {
                            name: Arc::from(name),
                            window,
                            free: (0..config.pool_blocks as i32).rev().collect(),
                        });
                    }
                    None => {
                        return Err(config_error(format!(
                            "a paged session cannot feed data input `{name}`"
                        )))
                    }
                },
            }
            inputs.push(None);
        }
        if !data.iter().any(|&(_, f)| f == Feed::Ids) || tables.is_empty() {
            return Err(config_error(format!(
                "the graph needs `{}` and a `{}` input",
                step::INPUT_IDS,
                step::BLOCK_TABLE
            )));
        }
        // Which table each pool's layer reads: the table operand of the paged
        // attention that takes the pool.
        let mut pools_per_table = vec![0; tables.len()];
        for n in graph.node_ids() {
            let op = graph.op(n);
            if matches!(
                op,
                Op::Fused(FusedOp::PagedAttention | FusedOp::PagedDecodeAttention)
            ) {
                // The block table: the first operand in the paging role.
                let Some(table) = (0..graph.operands(n).len())
                    .find(|&i| op.operand_role(i) == Some(OperandRole::Paging))
                    .map(|i| graph.operands(n)[i])
                else {
                    continue;
                };
                if let Op::Input { name, .. } = graph.op(table) {
                    if let Some(t) = tables.iter().position(|t| &*t.name == name.as_str()) {
                        pools_per_table[t] += 2;
                    }
                }
            }
        }
        let vocab = vocab(graph)?;
        Ok(PagedSession {
            exec,
            block_size,
            config,
            max_blocks,
            inputs,
            states,
            data,
            tables,
            seqs: BTreeMap::new(),
            next_id: 0,
            vocab,
            block_bytes,
            pools_per_table,
            bindings,
            run: RunOutput::new(),
            order: Vec::new(),
            fresh: Vec::new(),
        })
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn config(&self) -> PagedConfig {
        self.config
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn executor(&self) -> &Executor {
        &self.exec
    }

    /// Registers a sequence with its prompt; it runs from the next step on.
    pub fn add(&mut self, prompt: &[i32]) -> Result<SeqId, PagedError> {
        if prompt.is_empty() {
            return Err(PagedError::EmptyPrompt);
        }
        if let Some(&token) = prompt
            .iter()
            .find(|&&t| usize::try_from(t).map_or(true, |t| t >= self.vocab))
        {
            return Err(PagedError::TokenOutOfRange {
                token,
                vocab: self.vocab,
            });
        }
        let seq = SeqId(self.next_id);
        if prompt.len() > self.config.max_len {
            return Err(PagedError::TooLong {
                seq,
                position: prompt.len() - 1,
                max_len: self.config.max_len,
            });
        }
        self.next_id += 1;
        self.seqs.insert(
            seq,
            Seq {
                prompt: prompt.to_vec(),
                generated: Vec::new(),
                len: 0,
                // Room for every block it may hold, so that growing allocates nothing.
                blocks: (0..self.tables.len())
                    .map(|_| Vec::with_capacity(self.max_blocks))
                    .collect(),
            },
        );
        Ok(seq)
    }

    /// Ends a sequence, returning its blocks to the pools; returns its generated
    /// tokens.
    pub fn remove(&mut self, seq: SeqId) -> Result<Vec<i32>, PagedError> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or(PagedError::UnknownSequence(seq))?;
        for (table, blocks) in self.tables.iter_mut().zip(&s.blocks) {
            table.free.extend(blocks.iter().flatten());
            // Lowest first again, for determinism.
            table.free.sort_unstable_by(|a, b| b.cmp(a));
        }
        Ok(s.generated)
    }

    /// The live sequences, in id order.
    pub fn live(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }

    /// The tokens `seq` has generated so far.
    pub fn generated(&self, seq: SeqId) -> Result<&[i32], PagedError> {
        self.seq(seq).map(|s| s.generated.as_slice())
    }

    /// Replaces the token `seq` generated last, which the next step feeds, by `token`:
    /// for a caller that samples from [`PagedStep::logits`] instead of taking the
    /// greedy token (the returned and [`PagedSession::generated`] ids follow).
    pub fn set_next(&mut self, seq: SeqId, token: i32) -> Result<(), PagedError> {
        let vocab = self.vocab;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(PagedError::UnknownSequence(seq))?;
        if usize::try_from(token).map_or(true, |t| t >= vocab) {
            return Err(PagedError::TokenOutOfRange { token, vocab });
        }
        match s.generated.last_mut() {
            Some(last) => {
                *last = token;
                Ok(())
            }
            None => Err(PagedError::Prefilling(seq)),
        }
    }

    /// Whether `seq` is still feeding its prompt (its next step's output will not be a
    /// generated token unless that step feeds the prompt's last token).
    pub fn is_prefilling(&self, seq: SeqId) -> Result<bool, PagedError> {
        self.seq(seq).map(|s| s.generated.is_empty())
    }

    /// Free blocks: the fewest of any block table's pool.
    pub fn free_blocks(&self) -> usize {
        self.tables.iter().map(|t| t.free.len()).min().unwrap_or(0)
    }

    /// Blocks the next [`PagedSession::step`] takes from each table's pool: one per
    /// live sequence that starts a new block. A scheduler removes (preempts) sequences
    /// while this exceeds [`PagedSession::free_blocks`], or the step fails with
    /// [`PagedError::OutOfBlocks`].
    pub fn blocks_for_next_step(&self) -> usize {
        let bs = self.block_size;
        self.seqs
            .values()
            .filter(|s| s.len.is_multiple_of(bs))
            .count()
    }

    /// Positions cached for `seq`.
    pub fn len(&self, seq: SeqId) -> Result<usize, PagedError> {
        self.seq(seq).map(|s| s.len)
    }

    fn seq(&self, seq: SeqId) -> Result<&Seq, PagedError> {
        self.seqs.get(&seq).ok_or(PagedError::UnknownSequence(seq))
    }

    /// Blocks held by live sequences, summed over the block tables (a block of a table
    /// stands for one block of each pool of its layers).
    pub fn blocks_in_use(&self) -> usize {
        self.tables
            .iter()
            .map(|t| self.config.pool_blocks - t.free.len())
            .sum()
    }

    /// Blocks the live sequences need with their cached positions: per table,
    /// `ceil(len / BS)` blocks of each sequence, or for a window's table only those
    /// holding one of the last `W` positions. Equal to
    /// [`PagedSession::blocks_in_use`] between steps (the session's invariant).
    pub fn blocks_needed(&self) -> usize {
        let bs = self.block_size;
        let mut total = 0;
        for table in &self.tables {
            for s in self.seqs.values() {
                if s.len == 0 {
                    continue;
                }
                let last = (s.len - 1) / bs;
                // The positions the next step still reads besides its own (`len`).
                let first = match table.window {
                    Some(w) => (s.len + 1).saturating_sub(w) / bs,
                    None => 0,
                };
                total += last + 1 - first.min(last + 1);
            }
        }
        total
    }

    /// Bytes of KV cache the live sequences hold: their blocks in every pool.
    pub fn kv_bytes_in_use(&self) -> u64 {
        self.tables
            .iter()
            .zip(&self.pools_per_table)
            .map(|(t, &pools)| {
                (self.config.pool_blocks - t.free.len()) as u64 * pools as u64 * self.block_bytes
            })
            .sum()
    }

    /// Runs one step over every live sequence. See [`PagedSession::step_into`].
    pub fn step(&mut self) -> Result<PagedStep, PagedError> {
        let mut out = PagedStep::default();
        self.step_into(&mut out)?;
        Ok(out)
    }

    /// Feeds every live sequence its next token (see the module documentation) and
    /// writes the results into `out`. With no live sequence it runs nothing and `out`
    /// is empty. On error the session is unchanged.
    pub fn step_into(&mut self, out: &mut PagedStep) -> Result<(), PagedError> {
        self.order.clear();
        self.order.extend(self.seqs.keys().map(|&id| (id, 1)));
        self.run_order(out)
    }

    /// [`PagedSession::step_into`] over the listed sequences only (each at most once,
    /// in the order given, which `out` follows); the others wait, their caches as they
    /// are. Each sequence's results do not depend on which others share its steps
    /// (the kernels compute every row as they compute it alone).
    pub fn step_some_into(
        &mut self,
        seqs: &[SeqId],
        out: &mut PagedStep,
    ) -> Result<(), PagedError> {
        self.order.clear();
        self.order.extend(seqs.iter().map(|&id| (id, 1)));
        self.run_listed(out)
    }

    /// Feeds each listed `(sequence, tokens)` that many tokens in one step: a chunk of
    /// its prompt (up to the rest of it), or its one generated token, as consecutive
    /// rows (see "Ragged rows" in the module documentation). Sequences run in the order
    /// given, each at most once; `out` has a row per token. A chunked prompt gives
    /// the bits token-by-token prefill gives. On error the session is unchanged.
    pub fn step_chunks_into(
        &mut self,
        feeds: &[(SeqId, usize)],
        out: &mut PagedStep,
    ) -> Result<(), PagedError> {
        self.order.clear();
        self.order.extend_from_slice(feeds);
        self.run_listed(out)
    }

    /// Checks `self.order` as a caller listed it, then runs it.
    fn run_listed(&mut self, out: &mut PagedStep) -> Result<(), PagedError> {
        for (i, &(id, tokens)) in self.order.iter().enumerate() {
            let s = self.seq(id)?;
            if self.order[..i].iter().any(|&(o, _)| o == id) {
                return Err(PagedError::Repeated(id));
            }
            if tokens == 0 || tokens > s.feedable() {
                return Err(PagedError::TooManyTokens {
                    seq: id,
                    asked: tokens,
                    available: s.feedable(),
                });
            }
        }
        self.run_order(out)
    }

    /// One step over `self.order`.
    fn run_order(&mut self, out: &mut PagedStep) -> Result<(), PagedError> {
        out.outputs.clear();
        let rows: usize = self.order.iter().map(|&(_, n)| n).sum();
        if rows == 0 {
            out.logits = Array2::zeros((0, self.vocab));
            return Ok(());
        }
        for &(id, tokens) in &self.order {
            let s = &self.seqs[&id];
            if s.len + tokens > self.config.max_len {
                return Err(PagedError::TooLong {
                    seq: id,
                    position: s.len + tokens - 1,
                    max_len: self.config.max_len,
                });
            }
        }
        let fresh = self.allocate()?;
        self.bindings.set(step::BATCH, rows as u64);
        if let Err(e) = self.feed(rows) {
            self.drop_data();
            self.release(fresh);
            return Err(e);
        }
        let result = self
            .exec
            .run_into(&self.bindings, &mut self.inputs, &mut self.run);
        self.drop_data();
        if let Err(e) = result {
            self.release(fresh);
            return Err(e.into());
        }
        if let Err(e) = self.take_outputs(rows, out) {
            self.release(fresh);
            return Err(e);
        }
        self.fresh = fresh;
        let mut outputs = out.outputs.iter_mut();
        for &(id, tokens) in &self.order {
            let Some(s) = self.seqs.get_mut(&id) else {
                continue;
            };
            for o in outputs.by_ref().take(tokens) {
                o.position = s.len;
                s.len += 1;
                o.generated = s.len >= s.prompt.len();
                if o.generated {
                    s.generated.push(o.next);
                }
            }
        }
        // Between steps every sequence holds exactly the blocks the next step reads.
        self.free_out_of_window();
        std::mem::swap(&mut out.stats, &mut self.run.stats);
        Ok(())
    }

    /// Returns the blocks of windowed tables that no position the next step reads
    /// lies in: for a sequence at position `p`, the window's layers read `p - W < j <=
    /// p`, so a block whose last position is at most `p - W` is free.
    fn free_out_of_window(&mut self) {
        let bs = self.block_size;
        for (t, table) in self.tables.iter_mut().enumerate() {
            let Some(w) = table.window else { continue };
            for s in self.seqs.values_mut() {
                let first = (s.len + 1).saturating_sub(w) / bs;
                for slot in s.blocks[t].iter_mut().take(first) {
                    if let Some(block) = slot.take() {
                        table.free.push(block);
                    }
                }
            }
            table.free.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    /// Gives every sequence a block from each table's pool for each of its new
    /// positions that starts one. Returns the `(table, sequence)` pairs given one, in
    /// order, to undo on failure; on error nothing is allocated.
    fn allocate(&mut self) -> Result<Vec<(usize, SeqId)>, PagedError> {
        let bs = self.block_size;
        // Positions `len .. len + tokens` that start a block.
        let starting = |len: usize, tokens: usize| (len + tokens).div_ceil(bs) - len.div_ceil(bs);
        let needed: usize = self
            .order
            .iter()
            .filter_map(|&(id, tokens)| Some(starting(self.seqs.get(&id)?.len, tokens)))
            .sum();
        for table in &self.tables {
            if table.free.len() < needed {
                return Err(PagedError::OutOfBlocks {
                    table: table.name.to_string(),
                    needed,
                    free: table.free.len(),
                });
            }
        }
        let mut fresh = std::mem::take(&mut self.fresh);
        fresh.clear();
        for (t, table) in self.tables.iter_mut().enumerate() {
            for &(id, tokens) in &self.order {
                let Some(s) = self.seqs.get_mut(&id) else {
                    continue;
                };
                for _ in 0..starting(s.len, tokens) {
                    // Checked above: every table has `needed` free blocks.
                    let Some(block) = table.free.pop() else { break };
                    s.blocks[t].push(Some(block));
                    fresh.push((t, id));
                }
            }
        }
        Ok(fresh)
    }

    /// Undoes [`PagedSession::allocate`].
    fn release(&mut self, mut fresh: Vec<(usize, SeqId)>) {
        for (t, id) in fresh.drain(..) {
            if let Some(Some(block)) = self.seqs.get_mut(&id).and_then(|s| s.blocks[t].pop()) {
                self.tables[t].free.push(block);
            }
        }
        for table in &mut self.tables {
            table.free.sort_unstable_by(|a, b| b.cmp(a));
        }
        self.fresh = fresh;
    }

    /// Makes the step's data inputs in their slots, in buffers from the pool: a row
    /// per token, a sequence's rows at its consecutive positions, each with the
    /// sequence's block-table row.
    fn feed(&mut self, rows: usize) -> Result<(), PagedError> {
        let width = self.max_blocks;
        for &(index, feed) in &self.data {
            let (shape, values) = match feed {
                Feed::Ids | Feed::Positions => {
                    let mut v = pool::take(rows);
                    for &(id, tokens) in &self.order {
                        let s = &self.seqs[&id];
                        v.extend((s.len..s.len + tokens).map(|p| match feed {
                            Feed::Ids => s.token_at(p),
                            _ => p as i32,
                        }));
                    }
                    ([rows, 1], v)
                }
                Feed::Table(t) => {
                    let mut v = pool::take(rows * width);
                    for &(id, tokens) in &self.order {
                        let blocks = &self.seqs[&id].blocks[t];
                        for _ in 0..tokens {
                            v.extend(blocks.iter().map(|b| b.unwrap_or(-1)));
                            v.resize(v.len() + width - blocks.len(), -1);
                        }
                    }
                    ([rows, width], v)
                }
            };
            self.inputs[index] = Some(Tensor::from_kernel_i32(Dims::from(shape), values));
        }
        Ok(())
    }

    fn drop_data(&mut self) {
        for &(index, _) in &self.data {
            if let Some(t) = self.inputs[index].take() {
                exec::recycle(Value::Tensor(t));
            }
        }
    }

    /// Moves the new pools back into their slots and the logits and tokens into `out`.
    fn take_outputs(&mut self, batch: usize, out: &mut PagedStep) -> Result<(), PagedError> {
        let order = &self.order;
        let vocab = self.vocab;
        if out.logits.dim() != (batch, vocab) {
            out.logits = Array2::zeros((batch, vocab));
        }
        let mut next_ok = false;
        let mut logits_ok = false;
        for (name, kind, value) in self.run.outputs.drain(..) {
            match (kind, value) {
                (OutputKind::State, Value::Tensor(t)) => {
                    if let Some(&(index, _)) = self.states.iter().find(|(_, n)| *n == name) {
                        self.inputs[index] = Some(t);
                    }
                }
                (OutputKind::Data, Value::Tensor(t)) if &*name == step::LOGITS => {
                    if let (Some(values), Some(rows)) =
                        (t.contiguous_f32(), out.logits.as_slice_mut())
                    {
                        if values.len() == rows.len() {
                            rows.copy_from_slice(&values);
                            logits_ok = true;
                        }
                    }
                    exec::recycle(Value::Tensor(t));
                }
                (OutputKind::Data, Value::Tensor(t)) if &*name == step::NEXT_TOKEN => {
                    let ids = match (t.is_contiguous(), t.i32_buffer()) {
                        (true, Some(ids)) => ids.get(t.offset()..t.offset() + t.numel()),
                        _ => None,
                    };
                    if let Some(ids) = ids.filter(|ids| ids.len() == batch) {
                        let seqs = order
                            .iter()
                            .flat_map(|&(seq, tokens)| std::iter::repeat_n(seq, tokens));
                        out.outputs
                            .extend(seqs.zip(ids).map(|(seq, &next)| SeqOutput {
                                seq,
                                position: 0,
                                next,
                                generated: false,
                            }));
                        next_ok = true;
                    }
                    exec::recycle(Value::Tensor(t));
                }
                (_, v) => exec::recycle(v),
            }
        }
        if !(next_ok && logits_ok) {
            return Err(config_error(format!(
                "the step did not return {batch} x {vocab} logits and {batch} next tokens"
            )));
        }
        Ok(())
    }
}

/// The block size of a paged graph: the third axis of its pools.
fn block_size(graph: &Graph) -> Result<usize, PagedError> {
    let mut found = None;
    for (id, name, kind) in graph.inputs() {
        if kind != InputKind::State {
            continue;
        }
        let bs = graph
            .ty(id)
            .tensor()
            .filter(|t| t.rank() == 4 && t.shape.dim(0) == &Dim::sym(step::POOL_BLOCKS))
            .and_then(|t| t.shape.dim(2).as_fixed())
            .and_then(|b| usize::try_from(b).ok())
            .filter(|&b| b > 0)
            .ok_or_else(|| {
                config_error(format!(
                    "state `{name}` is not a pool [{}, KV, block size, head_dim]",
                    step::POOL_BLOCKS
                ))
            })?;
        if found.is_some_and(|f| f != bs) {
            return Err(config_error("the pools disagree on the block size"));
        }
        found = Some(bs);
    }
    found.ok_or_else(|| config_error("the graph has no paged KV pools"))
}

/// The vocabulary: the last axis of `logits`.
fn vocab(graph: &Graph) -> Result<usize, PagedError> {
    graph
        .output(step::LOGITS)
        .and_then(|o| graph.ty(o.value).tensor())
        .and_then(|t| t.shape.last())
        .and_then(|d| d.as_fixed())
        .and_then(|v| usize::try_from(v).ok())
        .filter(|_| graph.output(step::NEXT_TOKEN).is_some())
        .ok_or_else(|| {
            config_error(format!(
                "the graph needs `{}` with a fixed vocabulary and `{}`",
                step::LOGITS,
                step::NEXT_TOKEN
            ))
        })
}
