//! CPU decode benchmark: the eager graph and the fused graph in f32, bf16 and FP8,
//! side by side in one process, against the memory read bandwidth measured by the same
//! run (`fusec bench`, `cargo bench --bench decode`).
//!
//! Method. For each variant the model gets seeded random weights (an FP8 variant's
//! are derived from the bf16 ones, with the KV-cache scales calibrated on a short
//! random prompt, as `fusec run` does); the weights the executor does not keep are
//! dropped before timing. Every variant's KV cache is filled to `context` positions
//! with the same random tokens; then the variants take turns for `rounds` rounds, each
//! round decoding the same `steps` tokens at batch 1 again from the same context (the
//! session rewinds its caches to it), so that the machine's slow spells fall on all
//! of them alike and the ratios between them hold even when the
//! absolute figures move. Streamed weight bytes per token are the weight bytes of the
//! graph's memory floor (`fusec_ir::cost`): every GEMV weight once, at its IR dtype,
//! plus the gathered embedding rows. The ceiling is the machine's read bandwidth
//! measured in the same rounds: in each round every variant's turn starts with a timed
//! pass of a parallel sum (one thread per core) over a 512 MB buffer. A variant's
//! tokens/s is its steps over the median time of its rounds, and the ceiling is the
//! median GB/s of the passes: the VM this was written on stalls a thread now and then
//! for tens of milliseconds, and a median does not move with one stall where a total
//! does. (A best-of-passes figure moved between 33 and 54 GB/s from run to run.) The
//! buffer is on huge pages, as the executor's weights are (`fusec_exec::hugepages`),
//! since on a virtual machine that alone moved both figures by a third.
//!
//! Batched decode. Beside the variants, fused f32 decode runs at each batch of
//! [`Options::batches`] (1, 4, 8 and 16 by default), one session per batch with its
//! own executor, every sequence with a cache of `context` positions of its own random
//! tokens, taking its turn in the same rounds as the variants. A batch's tokens/s
//! counts every sequence's token, so its ratio to batch 1 of the same run is what
//! batching buys: a memory-bound step reads each weight once for all the sequences.

use std::time::Instant;

use fusec_exec::calibrate;
use fusec_exec::cputime::process_cpu_seconds;
use fusec_exec::kernels::{gemm, rowdot::Rows};
use fusec_exec::{Executor, Prefill, Session, SplitMix64, Weights};
use fusec_ir::Graph;
use fusec_model::blocks::{Logits, StepDims};
use fusec_model::frontend::{ModelSpec, Precision};
use fusec_rewrite::precision::Fp8Options;

use crate::pipeline::{self, PipelineError};
use crate::serving::ServingResult;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Positions in the KV cache when timing starts.
    pub context: usize,
    /// Timed decode steps per variant and round.
    pub steps: usize,
    /// Rounds: the variants take turns, each decoding the same steps again from the
    /// same context.
    pub rounds: usize,
    /// Seed of the random weights.
    pub seed: u64,
    /// The variants to run, by name (`eager f32`, `fused f32`, `fused bf16`,
    /// `fused fp8`); empty: all of them.
    pub only: Vec<String>,
    /// The most memory the variants may hold together; `None`: what the machine can
    /// give (see [`crate::memory`]).
    pub max_memory: Option<u64>,
    /// Prompt lengths to time prefill at (the fused f32 prefill graph, one chunk of
    /// the whole prompt, from an empty cache); empty: no prefill.
    pub prefill: Vec<usize>,
    /// Batches to time fused f32 decode at (sequences per step); empty: none.
    pub batches: Vec<usize>,
}

/// The batches [`Options::batches`] holds by default.
pub const DEFAULT_BATCHES: [usize; 4] = [1, 4, 8, 16];

impl Default for Options {
    fn default() -> Self {
        Options {
            context: 128,
            steps: 32,
            rounds: 5,
            seed: 0,
            only: Vec::new(),
            max_memory: None,
            prefill: vec![128, 512],
            batches: DEFAULT_BATCHES.to_vec(),
        }
    }
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Exec(#[from] fusec_exec::Error),
    #[error(transparent)]
    Weights(#[from] fusec_weights::Error),
    #[error("{0}")]
    Invalid(String),
}

/// One variant's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VariantResult {
    /// `eager f32`, `fused f32`, `fused bf16`, `fused fp8`, `fused int8`, `fused int4`, `fused q4_1` or `fused q4_k`.
    pub name: &'static str,
    pub tokens_per_s: f64,
    /// Weight bytes of the memory floor: what one token must stream.
    pub weight_bytes: u64,
    /// Bytes the executor measured moving per step (reads and writes).
    pub measured_bytes: u64,
    pub launches: u64,
    /// Resident memory the variant added: its executor (weights, buffers) and its
    /// session with the KV cache (`VmRSS` after it was set up, minus before).
    pub rss: u64,
}

impl VariantResult {
    /// Streamed weight bytes per second, in GB/s.
    pub fn weight_gb_per_s(&self) -> f64 {
        self.weight_bytes as f64 * self.tokens_per_s / 1e9
    }
}

/// Prefill of one prompt length.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PrefillResult {
    pub tokens: usize,
    /// Prompt tokens per second (median of the rounds).
    pub tokens_per_s: f64,
    /// Operations per second of process CPU time (all threads, spinning included;
    /// median of the rounds), GFLOP/s: what the cores did while they ran, whatever
    /// other tenants of the machine took.
    pub gflops_per_cpu_s: f64,
    /// Floating-point operations the prompt needs (see [`prefill_flops`]).
    pub flops: f64,
}

impl PrefillResult {
    pub fn gflops(&self) -> f64 {
        self.flops * self.tokens_per_s / self.tokens as f64 / 1e9
    }
}

/// The floating-point operations a prefill of `tokens` tokens from an empty cache
/// needs: two per multiply-add of every projection and MLP weight for every token,
/// of the causal attention (`q k` and `p v` over the keys each query sees, `i + 1`
/// for the token at position `i`), and of the LM head for the last position only (as
/// generation needs). Norms, RoPE and the softmax are left out (under 1%).
pub fn prefill_flops(m: &fusec_model::ModelConfig, tokens: usize) -> f64 {
    let (d, hd) = (m.hidden_size as f64, m.head_dim as f64);
    let (h, kv) = (m.num_heads as f64, m.num_kv_heads as f64);
    let per_layer =
        d * h * hd + 2.0 * d * kv * hd + h * hd * d + 3.0 * d * m.intermediate_size as f64;
    let t = tokens as f64;
    let linear = 2.0 * per_layer * t;
    let attention = 4.0 * h * hd * t * (t + 1.0) / 2.0;
    m.num_layers as f64 * (linear + attention) + 2.0 * m.vocab_size as f64 * d
}

/// Fused f32 decode at one batch.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BatchResult {
    /// Sequences per step.
    pub batch: usize,
    /// Tokens of all the sequences per second (median of the rounds).
    pub tokens_per_s: f64,
    /// `tokens_per_s` over that of batch 1 in the same run, when batch 1 ran.
    pub ratio_to_batch_1: Option<f64>,
    /// Milliseconds per step (median of the rounds).
    pub step_ms: f64,
    /// Weight bytes of the memory floor per token: one step's over the batch.
    pub weight_bytes_per_token: u64,
    /// Bytes the executor measured moving per token (reads and writes), the KV caches
    /// of every sequence included.
    pub measured_bytes_per_token: u64,
}

/// One model's results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelResult {
    pub model: String,
    pub context: usize,
    pub steps: usize,
    pub rounds: usize,
    /// The measured read bandwidth, GB/s.
    pub ceiling_gb_per_s: f64,
    pub variants: Vec<VariantResult>,
    /// Variants the model's shapes do not allow (an integer format needs input
    /// dimensions in whole blocks of 32), with why; left out unless asked for by name.
    pub skipped: Vec<(&'static str, String)>,
    /// Measured FMA peak of all threads together, GFLOP/s (median of the rounds).
    pub fma_peak_gflops: f64,
    /// The same per second of CPU time of one core (median of the rounds).
    pub fma_peak_gflops_per_cpu_s: f64,
    /// One GEMM of the model's MLP shape (`rows`, hidden, intermediate), GFLOP/s.
    pub gemm_gflops: f64,
    /// `(rows, ins, outs)` of that GEMM.
    pub gemm_shape: (usize, usize, usize),
    pub prefill: Vec<PrefillResult>,
    /// Fused f32 decode at each batch of [`Options::batches`].
    pub batched: Vec<BatchResult>,
    /// The serving benchmark (`fusec bench --serve`, see [`crate::serving`]), when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingResult>,
}

impl ModelResult {
    fn get(&self, name: &str) -> Option<&VariantResult> {
        self.variants.iter().find(|v| v.name == name)
    }

    /// `tokens/s of a` over `tokens/s of b`, when both ran.
    pub fn ratio(&self, a: &str, b: &str) -> Option<f64> {
        Some(self.get(a)?.tokens_per_s / self.get(b)?.tokens_per_s)
    }

    /// The result as a text table with the ratios between variants.
    pub fn render(&self) -> String {
        let mut s = format!(
            "model {}: batch 1, context {}, {} timed steps x {} rounds, {} threads; read bandwidth ceiling {:.1} GB/s\n",
            self.model,
            self.context,
            self.steps,
            self.rounds,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            self.ceiling_gb_per_s
        );
        s += &format!(
            "{:<11} {:>10} {:>14} {:>9} {:>10} {:>9} {:>11} {:>9}\n",
            "variant",
            "tokens/s",
            "weights/token",
            "GB/s",
            "% ceiling",
            "launches",
            "bytes/step",
            "memory"
        );
        for v in &self.variants {
            s += &format!(
                "{:<11} {:>10.1} {:>11.2} MB {:>9.2} {:>9.1}% {:>9} {:>8.2} MB {:>6.0} MB\n",
                v.name,
                v.tokens_per_s,
                v.weight_bytes as f64 / 1e6,
                v.weight_gb_per_s(),
                100.0 * v.weight_gb_per_s() / self.ceiling_gb_per_s,
                v.launches,
                v.measured_bytes as f64 / 1e6,
                v.rss as f64 / 1e6
            );
        }
        for (name, why) in &self.skipped {
            s += &format!("{name:<11} skipped: {why}\n");
        }
        for (a, b) in [
            ("fused f32", "eager f32"),
            ("fused bf16", "fused f32"),
            ("fused fp8", "fused f32"),
            ("fused fp8", "fused bf16"),
            ("fused int8", "fused f32"),
            ("fused int4", "fused f32"),
            ("fused q4_1", "fused f32"),
            ("fused q4_1", "fused int4"),
            ("fused q4_k", "fused f32"),
            ("fused q4_k", "fused int4"),
            ("fused int8", "fused fp8"),
        ] {
            if let Some(r) = self.ratio(a, b) {
                s += &format!("{a} / {b}: {r:.2}x\n");
            }
        }
        s += &self.render_batched();
        s += &self.render_prefill();
        if let Some(serving) = &self.serving {
            s += &serving.render();
        }
        s
    }

    /// The prefill table, with the FMA peak and the GEMM (empty when no prefill ran).
    pub fn render_prefill(&self) -> String {
        let mut s = String::new();
        if self.prefill.is_empty() {
            return s;
        }
        let (rows, ins, outs) = self.gemm_shape;
        s += &format!(
            "FMA peak (measured, {} threads): {:.1} GFLOP/s; GEMM {rows}x{ins} by {outs}x{ins}: {:.1} GFLOP/s ({:.1}% of peak)\n",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            self.fma_peak_gflops,
            self.gemm_gflops,
            100.0 * self.gemm_gflops / self.fma_peak_gflops
        );
        s += &format!(
            "FMA peak per CPU-second of one core: {:.1} GFLOP/s\n",
            self.fma_peak_gflops_per_cpu_s
        );
        s += &format!(
            "{:<16} {:>10} {:>10} {:>9} {:>8} {:>12} {:>9} {:>16}\n",
            "prefill",
            "tokens/s",
            "TTFT ms",
            "GFLOP/s",
            "% peak",
            "GFLOP/cpu-s",
            "% cpu-pk",
            "x fused f32 dec"
        );
        let decode = self.get("fused f32").map(|v| v.tokens_per_s);
        for p in &self.prefill {
            s += &format!(
                "{:<16} {:>10.1} {:>10.1} {:>9.1} {:>7.1}% {:>12.1} {:>8.1}% {:>16}\n",
                format!("fused f32 {}", p.tokens),
                p.tokens_per_s,
                1e3 * p.tokens as f64 / p.tokens_per_s,
                p.gflops(),
                100.0 * p.gflops() / self.fma_peak_gflops,
                p.gflops_per_cpu_s,
                100.0 * p.gflops_per_cpu_s / self.fma_peak_gflops_per_cpu_s,
                decode.map_or("-".into(), |d| format!("{:.1}x", p.tokens_per_s / d))
            );
        }
        s
    }
}

impl ModelResult {
    /// The batched decode table (empty when no batch ran).
    pub fn render_batched(&self) -> String {
        if self.batched.is_empty() {
            return String::new();
        }
        let mut s = format!(
            "{:<16} {:>10} {:>10} {:>9} {:>14} {:>14}\n",
            "fused f32 decode", "tokens/s", "x batch 1", "step ms", "weights/token", "bytes/token"
        );
        for b in &self.batched {
            s += &format!(
                "{:<16} {:>10.1} {:>10} {:>9.2} {:>11.2} MB {:>11.2} MB\n",
                format!("batch {}", b.batch),
                b.tokens_per_s,
                b.ratio_to_batch_1
                    .map_or("-".into(), |r| format!("{r:.2}x")),
                b.step_ms,
                b.weight_bytes_per_token as f64 / 1e6,
                b.measured_bytes_per_token as f64 / 1e6
            );
        }
        s
    }

    /// The result as JSON: every figure of [`ModelResult::render`], with the read
    /// bandwidth probe's and the FMA peak's.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// The variants in the order they run.
const VARIANTS: [(&str, bool, Precision); 8] = [
    ("eager f32", false, Precision::F32),
    ("fused f32", true, Precision::F32),
    ("fused bf16", true, Precision::Bf16),
    ("fused fp8", true, Precision::Fp8),
    ("fused int8", true, Precision::Int8),
    ("fused int4", true, Precision::Int4),
    ("fused q4_1", true, Precision::Q4_1),
    ("fused q4_k", true, Precision::Q4K),
];

/// A variant ready to time: its session, with the KV cache filled to the context.
struct Prepared {
    name: &'static str,
    session: Session,
    weight_bytes: u64,
    rss: u64,
    /// The token of each sequence that follows the context.
    first: Vec<i32>,
    /// The tokens of the next step, and the step's results, kept from step to step.
    tokens: Vec<i32>,
    out: fusec_exec::decode::StepOutput,
    /// Seconds of each round.
    rounds: Vec<f64>,
    bytes: u64,
    launches: u64,
}

/// Runs every variant of `spec` and measures the ceiling in the same rounds.
pub fn run_model(spec: &ModelSpec, opts: &Options) -> Result<ModelResult, BenchError> {
    if opts.steps == 0 || opts.context == 0 || opts.rounds == 0 {
        return Err(BenchError::Invalid(
            "--context, --steps and --rounds must be at least 1".into(),
        ));
    }
    // A model's batch is bounded at the door (`fusec_model::frontend::Limits`).
    if let Some(b) = opts.batches.iter().find(|&&b| b == 0 || b > 1 << 15) {
        return Err(BenchError::Invalid(format!(
            "--batch: a batch of {b}; batches must be 1 to 32768"
        )));
    }
    let positions = u64::try_from(opts.context)
        .ok()
        .zip(u64::try_from(opts.steps).ok())
        .and_then(|(c, s)| c.checked_add(s))
        .filter(|&p| p <= spec.model.max_seq_len)
        .ok_or_else(|| {
            BenchError::Invalid(format!(
                "context {} plus {} steps exceed max_seq_len {}",
                opts.context, opts.steps, spec.model.max_seq_len
            ))
        })?;
    if let Some(unknown) = opts
        .only
        .iter()
        .find(|o| !VARIANTS.iter().any(|(name, _, _)| name == o))
    {
        return Err(BenchError::Invalid(format!(
            "unknown variant `{unknown}`: the variants are {}",
            VARIANTS.map(|v| format!("`{}`", v.0)).join(", ")
        )));
    }
    // Every selected variant is held at once while they take turns.
    let need: u128 = VARIANTS
        .iter()
        .filter(|(name, _, _)| opts.only.is_empty() || opts.only.iter().any(|o| o == name))
        .map(|(_, _, precision)| crate::memory::least_bytes(spec, *precision, 1, positions))
        .sum::<u128>()
        + opts
            .batches
            .iter()
            .map(|&b| crate::memory::least_bytes(spec, Precision::F32, b as u64, positions))
            .sum::<u128>();
    crate::memory::check(
        need,
        &format!("benchmarking {}", spec.model.name),
        opts.max_memory,
    )
    .map_err(BenchError::Invalid)?;
    let rules = pipeline::rules(&[])?;
    let mut prepared = Vec::new();
    let mut skipped = Vec::new();
    let selected = VARIANTS
        .into_iter()
        .filter(|(name, _, _)| opts.only.is_empty() || opts.only.iter().any(|o| o == name));
    for (name, fused, precision) in selected {
        // Each precision's default recipe, as `fusec run` applies it.
        let fp8 = Fp8Options {
            keep: pipeline::default_keep(precision),
            ..Fp8Options::default()
        };
        let rss_before = resident_bytes();
        let graph = if fused {
            match pipeline::fused_in(spec, precision, &rules, &fp8) {
                Err(PipelineError::Precision(why)) if opts.only.is_empty() => {
                    skipped.push((name, why));
                    continue;
                }
                other => other?.0,
            }
        } else {
            pipeline::eager(&pipeline::in_precision(spec, precision))?
        };
        let weights = if precision == Precision::Fp8 {
            let base_graph = pipeline::fused_in(spec, Precision::Bf16, &rules, &fp8)?.0;
            let base = Weights::random(&base_graph, opts.seed)?;
            let prompt = random_tokens(spec.model.vocab_size, 8, opts.seed ^ 0x5eed);
            let (scales, _) =
                calibrate::calibrate_kv_scales(&graph, &base_graph, &base, &[prompt])?;
            fusec_weights::lower_weights(&base, &graph, &scales)?
        } else {
            Weights::random(&graph, opts.seed)?
        };
        prepared.push(prepare(name, graph, weights, rss_before, opts)?);
    }
    // Batched decode: fused f32, one session (and executor) per batch.
    let mut batched = Vec::new();
    if !opts.batches.is_empty() {
        let graph = pipeline::fused_in(spec, Precision::F32, &rules, &Fp8Options::default())?.0;
        let weights = Weights::random(&graph, opts.seed)?;
        for &b in &opts.batches {
            let rss_before = resident_bytes();
            let exec = Executor::new(graph.clone(), &weights)?;
            batched.push(prepare_session(
                "fused f32",
                &graph,
                exec,
                b,
                rss_before,
                opts,
            )?);
        }
    }
    // Prefill: the fused f32 prefill graph of each prompt length over a session of the
    // fused f32 decode graph, whose caches rewind to empty before every timing.
    let mut prefills = Vec::new();
    if !opts.prefill.is_empty() {
        let f32_spec = pipeline::in_precision(spec, Precision::F32);
        let decode = pipeline::fused_in(spec, Precision::F32, &rules, &Fp8Options::default())?.0;
        let longest = opts.prefill.iter().copied().max().unwrap_or(1);
        if longest as u64 > spec.model.max_seq_len || opts.prefill.contains(&0) {
            return Err(BenchError::Invalid(format!(
                "prefill lengths must be 1 to max_seq_len {}",
                spec.model.max_seq_len
            )));
        }
        let weights = Weights::random(&decode, opts.seed)?;
        let session = Session::with_capacity(Executor::new(decode, &weights)?, 1, longest)?;
        drop(weights);
        let mut graphs = Vec::new();
        for &t in &opts.prefill {
            let eager =
                pipeline::eager_prefill(&f32_spec, &StepDims::prefill(t as u64, Logits::Last))?;
            let graph = pipeline::fuse(&f32_spec, &eager, &rules)?.0;
            let weights = Weights::random(&graph, opts.seed)?;
            graphs.push((
                t,
                Prefill::new(Executor::new(graph, &weights)?)?,
                Vec::new(),
                Vec::new(),
            ));
        }
        prefills.push((session, graphs));
    }
    let tokens = random_tokens(
        spec.model.vocab_size,
        opts.prefill.iter().copied().max().unwrap_or(0),
        3,
    );
    // The GEMM of the MLP's up projection over the longest prompt, on its own.
    let gemm_shape = (
        opts.prefill.iter().copied().max().unwrap_or(0),
        spec.model.hidden_size as usize,
        spec.model.intermediate_size as usize,
    );
    let (gx, gw) = {
        let mut rng = SplitMix64::new(opts.seed ^ 0x6e77);
        let (rows, ins, outs) = gemm_shape;
        let x: Vec<f32> = (0..rows * ins).map(|_| rng.normal() as f32).collect();
        let w: Vec<f32> = (0..outs * ins).map(|_| rng.normal() as f32).collect();
        (x, w)
    };
    let (mut fma_rounds, mut fma_cpu_rounds, mut gemm_rounds) =
        (Vec::new(), Vec::new(), Vec::new());
    // Rounds that the variants take in turn, each decoding the same `steps` tokens
    // from the same context (the session rewinds its caches to it), so that a slow
    // spell of this machine (other tenants, frequency changes) falls on every variant
    // alike instead of on whichever ran then.
    let mut probe = ReadProbe::new();
    for _ in 0..opts.rounds.max(1) {
        for v in prepared.iter_mut().chain(batched.iter_mut()) {
            probe.pass();
            // One untimed step first: the probe evicted the caches, and a model whose
            // weights fit in them (the fixture-sized one) would otherwise time a cold
            // start that its steady state never has.
            v.session.rewind(opts.context)?;
            v.session.step_into(&v.first, &mut v.out)?;
            v.session.rewind(opts.context)?;
            v.tokens.clone_from(&v.first);
            let start = Instant::now();
            for _ in 0..opts.steps {
                v.session.step_into(&v.tokens, &mut v.out)?;
                v.bytes += v.out.stats.bytes();
                v.launches = v.out.stats.launches;
                v.tokens.copy_from_slice(&v.out.next);
            }
            v.rounds.push(start.elapsed().as_secs_f64());
        }
        for (session, graphs) in &mut prefills {
            for (t, prefill, rounds, cpu) in graphs.iter_mut() {
                session.rewind(0)?;
                // Untimed first, as for decode.
                session.prefill(prefill, &tokens[..*t])?;
                session.rewind(0)?;
                let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
                session.prefill(prefill, &tokens[..*t])?;
                rounds.push(start.elapsed().as_secs_f64());
                if let (Some(a), Some(b)) = (cpu_start, process_cpu_seconds()) {
                    cpu.push(prefill_flops(&spec.model, *t) / (b - a).max(0.01) / 1e9);
                }
            }
        }
        if !opts.prefill.is_empty() {
            let (wall, per_cpu) = fma_peak_gflops();
            fma_rounds.push(wall);
            fma_cpu_rounds.push(per_cpu);
            let (rows, ins, outs) = gemm_shape;
            // Untimed first, as a prefill step's GEMMs find their buffers in the pool.
            let run = || {
                let y = fusec_exec::team::region(|| {
                    gemm::gemm(&gx, rows, ins, Rows::F32(&gw), outs, &|_, _, v| v)
                });
                drop(std::hint::black_box(y));
            };
            run();
            let start = Instant::now();
            run();
            let secs = start.elapsed().as_secs_f64();
            gemm_rounds.push(2.0 * (rows * ins * outs) as f64 / secs / 1e9);
        }
    }
    let prefill = prefills
        .into_iter()
        .flat_map(|(_, graphs)| graphs)
        .map(|(t, _, mut rounds, mut cpu)| PrefillResult {
            tokens: t,
            tokens_per_s: t as f64 / median(&mut rounds),
            gflops_per_cpu_s: median(&mut cpu),
            flops: prefill_flops(&spec.model, t),
        })
        .collect();
    let variants = prepared
        .into_iter()
        .map(|mut v| VariantResult {
            name: v.name,
            tokens_per_s: opts.steps as f64 / median(&mut v.rounds),
            weight_bytes: v.weight_bytes,
            measured_bytes: v.bytes / (opts.steps * opts.rounds.max(1)) as u64,
            launches: v.launches,
            rss: v.rss,
        })
        .collect();
    let mut batched: Vec<BatchResult> = batched
        .into_iter()
        .map(|mut v| {
            let b = v.session.batch();
            let step = median(&mut v.rounds) / opts.steps as f64;
            let steps = (opts.steps * opts.rounds.max(1)) as u64;
            BatchResult {
                batch: b,
                tokens_per_s: b as f64 / step,
                ratio_to_batch_1: None,
                step_ms: 1e3 * step,
                weight_bytes_per_token: v.weight_bytes / b as u64,
                measured_bytes_per_token: v.bytes / steps / b as u64,
            }
        })
        .collect();
    let one = batched
        .iter()
        .find(|b| b.batch == 1)
        .map(|b| b.tokens_per_s);
    for b in &mut batched {
        b.ratio_to_batch_1 = one.map(|t| b.tokens_per_s / t);
    }
    Ok(ModelResult {
        model: spec.model.name.clone(),
        context: opts.context,
        steps: opts.steps,
        rounds: opts.rounds.max(1),
        ceiling_gb_per_s: probe.gb_per_s(),
        variants,
        skipped,
        fma_peak_gflops: median(&mut fma_rounds),
        fma_peak_gflops_per_cpu_s: median(&mut fma_cpu_rounds),
        gemm_gflops: median(&mut gemm_rounds),
        gemm_shape,
        prefill,
        batched,
        serving: None,
    })
}

/// The FMA peak of the machine's cores, GFLOP/s: one thread per core
/// ([`gemm::fma_peak`]), per wall second and per CPU-second of one core.
pub fn fma_peak_gflops() -> (f64, f64) {
    gemm::fma_peak(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn random_tokens(vocab: u64, n: usize, seed: u64) -> Vec<i32> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| i32::try_from(rng.below(vocab)).unwrap_or(0))
        .collect()
}

/// Builds `name`'s executor and session and fills the KV cache to the context.
fn prepare(
    name: &'static str,
    graph: Graph,
    weights: Weights,
    rss_before: u64,
    opts: &Options,
) -> Result<Prepared, BenchError> {
    let exec = Executor::new(graph.clone(), &weights)?;
    // The executor holds what it reads (its packed, compact copies of the GEMV
    // weights included); the loaded values it does not need are freed here.
    drop(weights);
    prepare_session(name, &graph, exec, 1, rss_before, opts)
}

/// A session of `batch` sequences over `exec`, each sequence's KV cache filled to the
/// context with its own random tokens.
fn prepare_session(
    name: &'static str,
    graph: &Graph,
    exec: Executor,
    batch: usize,
    rss_before: u64,
    opts: &Options,
) -> Result<Prepared, BenchError> {
    let cost = fusec_ir::cost::graph_cost(graph, &fusec_exec::decode::bindings(1, opts.context))
        .map_err(|e| BenchError::Invalid(format!("unbound symbol {}", e.0)))?;
    let mut session = Session::with_capacity(exec, batch, opts.context + opts.steps + 1)?;
    let vocab = session.vocab() as u64;
    // The context, sequence after sequence (sequence 0's tokens are batch 1's); its
    // last step gives the tokens the timed rounds decode from.
    let contexts: Vec<Vec<i32>> = (0..batch as u64)
        .map(|s| random_tokens(vocab, opts.context, 1 + s))
        .collect();
    let mut out = fusec_exec::decode::StepOutput::default();
    let mut tokens = vec![0; batch];
    for t in 0..opts.context {
        for (k, c) in tokens.iter_mut().zip(&contexts) {
            *k = c[t];
        }
        session.step_into(&tokens, &mut out)?;
    }
    let first = out.next.clone();
    Ok(Prepared {
        name,
        session,
        // The weights of one step: the floor at batch 1 (the embedding rows of
        // every sequence aside, each weight is read once whatever the batch).
        weight_bytes: cost.floor.weight_bytes,
        rss: resident_bytes().saturating_sub(rss_before),
        tokens: first.clone(),
        first,
        out,
        rounds: Vec::new(),
        bytes: 0,
        launches: 0,
    })
}

/// The resident size of this process, with the freed heap returned to the OS first.
fn resident_bytes() -> u64 {
    release_freed_memory();
    proc_status_bytes("VmRSS:").unwrap_or(0)
}

/// Returns the heap memory freed so far to the OS, so that the resident size a variant
/// reports is what it uses: glibc keeps freed blocks below its (adaptive) memory-map
/// threshold in the heap, and the loaded weights that the executor replaced by its
/// packed copies are such blocks.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free heap pages to the OS; it touches no
    // live allocation.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes of the read-bandwidth buffer: far beyond any last-level cache.
const BANDWIDTH_BYTES: usize = 512 << 20;

/// The machine's memory read bandwidth, measured by timed passes of a parallel sum
/// over a buffer much larger than the caches, one thread per core. The sum uses eight
/// independent integer lanes, so it is limited by memory and not by an addition
/// chain. The buffer is on huge pages, as the executor's weights are, so that the
/// ceiling is the best this machine reads, not a figure the weights beat.
pub struct ReadProbe {
    buf: Vec<u64>,
    threads: usize,
    /// GB/s of each timed pass.
    passes: Vec<f64>,
    check: u64,
}

impl ReadProbe {
    /// Allocates and writes the buffer, and makes one untimed pass.
    pub fn new() -> ReadProbe {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let words = BANDWIDTH_BYTES / 8;
        let mut buf: Vec<u64> = Vec::with_capacity(words);
        fusec_exec::hugepages::advise_unwritten(buf.spare_capacity_mut());
        buf.extend(0..words as u64);
        let mut probe = ReadProbe {
            buf,
            threads,
            passes: Vec::new(),
            check: 0,
        };
        probe.pass();
        probe.passes.clear();
        probe
    }

    /// One timed pass over the buffer.
    pub fn pass(&mut self) {
        let per = self.buf.len().div_ceil(self.threads);
        let sum_chunk = |chunk: &[u64]| {
            let mut lanes = [0u64; 8];
            for c in chunk.chunks_exact(8) {
                for (l, &w) in lanes.iter_mut().zip(c) {
                    *l = l.wrapping_add(w);
                }
            }
            lanes.iter().fold(0u64, |a, &b| a.wrapping_add(b))
        };
        let start = Instant::now();
        let sum = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .buf
                .chunks(per)
                .map(|chunk| s.spawn(move || sum_chunk(chunk)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        let seconds = start.elapsed().as_secs_f64();
        self.passes
            .push((self.buf.len() * 8) as f64 / seconds.max(f64::MIN_POSITIVE) / 1e9);
        // The sum is used, so the reads cannot be optimized away.
        self.check = std::hint::black_box(self.check.wrapping_add(sum));
    }

    /// The median GB/s of the timed passes so far, the statistic a variant's tokens/s
    /// is over its rounds.
    pub fn gb_per_s(&self) -> f64 {
        median(&mut self.passes.clone())
    }
}

/// The median of `values` (the mean of the middle two for an even count; 0 for none).
/// A round that the VM's scheduler stalls (tens of milliseconds, against the 4 ms of
/// a round of the fixture-sized model) moves a total or a mean; it does not move the
/// median.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

impl std::fmt::Debug for ReadProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadProbe")
            .field("passes", &self.passes)
            .finish_non_exhaustive()
    }
}

impl Default for ReadProbe {
    fn default() -> Self {
        ReadProbe::new()
    }
}

/// A `kB` field of `/proc/self/status` (`VmHWM:`, `VmRSS:`) in bytes; `None` where
/// there is no such file.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}
