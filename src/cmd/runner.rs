//! What `fusec run` and `fusec accuracy` share: the graphs of one spec ([`Builder`]),
//! where the weights come from ([`Source`]), the weights of a graph with an FP8
//! graph's KV-cache scales calibrated on the prompt ([`weights_for`]), and a decode
//! session, greedy or teacher-forced ([`run_session`]).

use std::path::PathBuf;

use anyhow::anyhow;
use fusec::exec::calibrate;
use fusec::exec::{Executor, Generation, Prefill, Session};
use fusec::model::blocks::{Logits, StepDims};
use fusec::pipeline;
use fusec::weights::{self, Error as WeightError, KvScales, Weights};
use fusec_ir::Graph;
use fusec_model::frontend::{ModelSpec, Precision};
use fusec_rewrite::precision::Fp8Options;

use crate::cmd::exec_failure;
use crate::cmd::options::{PrecisionArgs, WeightScales};
use crate::Failure;

/// Builds the graphs a run needs, all from one spec, rules and FP8 options.
pub struct Builder<'a> {
    pub spec: &'a ModelSpec,
    pub rules: fusec_rewrite::RuleSet,
    pub fp8: Fp8Options,
    pub fuse: bool,
}

impl Builder<'_> {
    pub fn graph(&self, precision: Precision) -> Result<Graph, Failure> {
        if !self.fuse {
            if precision == Precision::Fp8 || precision.is_int() {
                return Err(Failure::Input(anyhow!(
                    "--no-fuse cannot run {}: the weight lowering applies to the fused graph",
                    precision.name()
                )));
            }
            return Ok(pipeline::eager(&pipeline::in_precision(
                self.spec, precision,
            ))?);
        }
        let (graph, report) = pipeline::fused_in(self.spec, precision, &self.rules, &self.fp8)?;
        crate::cmd::options::warn_fusion(&report);
        Ok(graph)
    }

    /// The prefill graph of `tokens` tokens per step (logits of the last position),
    /// eager or fused like the decode graph.
    pub fn prefill_graph(&self, precision: Precision, tokens: u64) -> Result<Graph, Failure> {
        let spec = pipeline::in_precision(self.spec, precision);
        let eager = pipeline::eager_prefill(&spec, &StepDims::prefill(tokens, Logits::Last))?;
        if !self.fuse {
            return Ok(eager);
        }
        let (graph, report) = pipeline::fuse(&spec, &eager, &self.rules)?;
        crate::cmd::options::warn_fusion(&report);
        // Integer codes lower a prefill graph's GEMV weights as they do the decode
        // graph's, so both bind the same weights.
        Ok(pipeline::lower(self.spec, graph, precision, &self.fp8)?)
    }

    /// The prefill executors for a prompt of `len` tokens in chunks of `chunk`: one of
    /// `chunk` tokens when the prompt holds one, and one of the remainder when it is
    /// more than one token (a last single token takes a decode step). None for a
    /// chunk of 1, for FP8, whose lowering does not take prefill graphs yet, and
    /// without fusion for the lowered precisions (their lowering takes fused graphs).
    pub fn prefills(
        &self,
        precision: Precision,
        weights: &Weights,
        len: usize,
        chunk: u64,
        check_finite: bool,
    ) -> Result<Vec<Prefill>, Failure> {
        let lowered = precision.is_int();
        if chunk <= 1 || precision == Precision::Fp8 || (lowered && !self.fuse) {
            return Ok(Vec::new());
        }
        let len = len as u64;
        let mut sizes = Vec::new();
        if len >= chunk {
            sizes.push(chunk);
        }
        if len % chunk > 1 {
            sizes.push(len % chunk);
        }
        sizes
            .into_iter()
            .map(|t| {
                let graph = self.prefill_graph(precision, t)?;
                let mut exec = Executor::new(graph, weights).map_err(exec_failure)?;
                exec.set_check_finite(check_finite);
                Prefill::new(exec).map_err(exec_failure)
            })
            .collect()
    }
}

/// Where weights come from.
#[derive(Clone, Debug)]
pub enum Source {
    File(PathBuf),
    Random(u64),
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Random(seed) => format!("random (seed {seed})"),
        }
    }

    pub fn load(&self, graph: &Graph) -> Result<Weights, WeightError> {
        match self {
            Source::File(p) => Weights::load(p, graph),
            Source::Random(seed) => Weights::random(graph, *seed),
        }
    }
}

/// The weights of the f32 reference graph, which a comparison runs on the
/// checkpoint's own weights (a lowered checkpoint has none to give it).
pub fn load_reference(source: &Source, graph: &Graph) -> Result<Weights, Failure> {
    source.load(graph).map_err(|e| match e {
        WeightError::MissingWeight { .. } => Failure::Input(anyhow!(
            "the f32 reference runs on the checkpoint's own weights: {e}"
        )),
        other => exec_failure(other),
    })
}

/// The weights of `graph`; for a lowered graph whose KV-cache scales the source lacks,
/// the base weights of the unlowered graph with the scales calibrated on `prompt`.
pub fn weights_for(
    graph: &Graph,
    precision: Precision,
    source: &Source,
    builder: &Builder<'_>,
    prompt: &[i32],
) -> Result<(Weights, Option<KvScales>), Failure> {
    match source.load(graph) {
        Ok(w) => Ok((w, None)),
        Err(WeightError::Uncalibrated { .. }) if precision == Precision::Fp8 => {
            let compute = pipeline::compute_dtype(builder.spec, precision);
            let base_graph = builder.graph(Precision::of_dtype(compute))?;
            let base = source.load(&base_graph).map_err(exec_failure)?;
            let (scales, _) =
                calibrate::calibrate_kv_scales(graph, &base_graph, &base, &[prompt.to_vec()])
                    .map_err(exec_failure)?;
            let weights = weights::lower_weights(&base, graph, &scales).map_err(exec_failure)?;
            Ok((weights, Some(scales)))
        }
        Err(e) => Err(exec_failure(e)),
    }
}

/// The FP8 options: the command line's, else what saved weights say, else defaults.
pub fn fp8_from(
    args: &PrecisionArgs,
    source: &Source,
    precision: Precision,
) -> Result<Fp8Options, Failure> {
    let saved = match source {
        Source::File(p) => Weights::metadata(p).unwrap_or_default(),
        Source::Random(_) => Default::default(),
    };
    let scales = match saved.get("fusec.weight_scales").map(String::as_str) {
        Some("per-tensor") => Some(WeightScales::PerTensor),
        Some(_) => Some(WeightScales::PerChannel),
        None => None,
    };
    // Saved weights say what they kept, even nothing (an empty list).
    let keep: Option<Vec<String>> = saved.get("fusec.keep").map(|k| {
        k.split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect()
    });
    args.fp8(keep.as_deref(), scales, precision)
}

/// A batch-1 session over `exec` that decodes `tokens` tokens after `prompt` (fed
/// token by token), greedily or teacher-forced on `forced`.
pub fn run_session(
    mut exec: Executor,
    prompt: &[i32],
    tokens: usize,
    forced: Option<&[i32]>,
    check_finite: bool,
) -> Result<(Session, Generation), Failure> {
    exec.set_check_finite(check_finite);
    let mut session =
        Session::with_capacity(exec, 1, prompt.len() + tokens).map_err(exec_failure)?;
    let prompts = [prompt.to_vec()];
    let gen = match forced {
        Some(f) => session.generate_forced(&prompts, &[f.to_vec()]),
        None => session.generate(&prompts, tokens),
    }
    .map_err(exec_failure)?;
    Ok((session, gen))
}
