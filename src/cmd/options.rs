//! Options shared by subcommands, flattened into each one's arguments.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::anyhow;
use fusec_model::frontend::{ModelSpec, Precision};
use fusec_rewrite::precision::{Fp8Options, Granularity, OpClass};

use crate::Failure;

/// How to fuse.
#[derive(clap::Args, Debug)]
pub struct FusionArgs {
    /// Keep the eager graph: no fusion.
    #[arg(long)]
    pub no_fuse: bool,
    /// Load fusion rules from this file too (repeatable); see README.md for the syntax.
    #[arg(long = "rules", value_name = "FILE")]
    pub rules: Vec<PathBuf>,
}

/// Prints what a fusion run warns of: user rules rejected where they matched, and a
/// saturation cut short by a limit.
pub fn warn_fusion(report: &fusec_rewrite::FuseReport) {
    for e in &report.rejected {
        crate::complain(&format!("warning: {e} (not applied)\n"));
    }
    if report.hit_limit {
        crate::complain(&format!(
            "warning: equality saturation stopped at a limit ({}); the result is correct but may be less fused\n",
            report.stop_reason
        ));
    }
}

/// The precision, and the FP8 recipe.
#[derive(clap::Args, Debug)]
pub struct PrecisionArgs {
    /// Precision (overrides [target] precision): f32, f16, bf16, fp8, int8 (Q8_0-like
    /// weights: 8-bit codes, one f16 scale per block of 32 inputs), int4 (Q4_0-like),
    /// q4_1 (GGUF's Q4_1: 4-bit codes, an f16 scale and minimum per block of 32), q4_k
    /// (GGUF's Q4_K: super-blocks of 256 with 6-bit sub-block scales and minimums) or
    /// gguf (a GGUF file's matrices each in its own format, those fusec cannot run
    /// natively in f32). A GGUF tensor already in the precision's format is run on its
    /// own blocks.
    #[arg(long)]
    pub precision: Option<String>,
    /// With fp8 or an integer precision: keep this op class at the compute precision
    /// (repeatable): qkv, attn-out, mlp-up, mlp-down, lm-head, kv-cache [default: what
    /// saved FP8 weights say, else lm-head for fp8 and none for int8/int4].
    #[arg(long = "keep", value_name = "CLASS")]
    pub keep: Vec<String>,
    /// Quantize this op class after all (repeatable; takes it out of the default or
    /// saved kept classes): `--quantize lm-head` quantizes the LM head with fp8.
    #[arg(long = "quantize", value_name = "CLASS")]
    pub quantize: Vec<String>,
    /// With fp8: weight scales per output channel or per tensor [default: per-channel,
    /// or what saved FP8 weights say].
    #[arg(long, value_enum)]
    pub weight_scales: Option<WeightScales>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightScales {
    PerChannel,
    PerTensor,
}

impl PrecisionArgs {
    /// Applies `--precision` to the spec.
    pub fn apply(&self, spec: &mut ModelSpec) -> Result<(), Failure> {
        if let Some(p) = &self.precision {
            spec.target.precision = Precision::parse(p).ok_or_else(|| {
                Failure::Input(anyhow!(
                    "unknown precision `{p}` (expected one of {})",
                    Precision::names()
                ))
            })?;
        }
        Ok(())
    }

    /// The lowering options: the command line's, else `saved` ones (from saved
    /// weights; `None` when they say nothing), else per-channel scales and
    /// [`fusec::pipeline::default_keep`] of `precision`; less the classes of `--quantize`.
    pub fn fp8(
        &self,
        saved_keep: Option<&[String]>,
        saved_scales: Option<WeightScales>,
        precision: Precision,
    ) -> Result<Fp8Options, Failure> {
        let scales = self
            .weight_scales
            .or(saved_scales)
            .unwrap_or(WeightScales::PerChannel);
        let parse = |k: &String| k.parse::<OpClass>().map_err(|e| Failure::Input(anyhow!(e)));
        let keep: BTreeSet<OpClass> = match (self.keep.is_empty(), saved_keep) {
            (false, _) => self.keep.iter().map(parse).collect::<Result<_, _>>()?,
            (true, Some(saved)) => saved.iter().map(parse).collect::<Result<_, _>>()?,
            (true, None) => fusec::pipeline::default_keep(precision),
        };
        let quantize: BTreeSet<OpClass> =
            self.quantize.iter().map(parse).collect::<Result<_, _>>()?;
        if let Some(both) = self
            .keep
            .iter()
            .map(parse)
            .find_map(|c| c.ok().filter(|c| quantize.contains(c)))
        {
            return Err(Failure::Input(anyhow!(
                "--keep {both} and --quantize {both} contradict each other"
            )));
        }
        let mut opts = Fp8Options {
            granularity: match scales {
                WeightScales::PerChannel => Granularity::PerChannel,
                WeightScales::PerTensor => Granularity::PerTensor,
            },
            ..Fp8Options::default()
        };
        opts.keep = keep.difference(&quantize).copied().collect();
        Ok(opts)
    }
}
