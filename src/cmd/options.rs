//! Options shared by subcommands, flattened into each one's arguments.

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
    /// Precision (overrides [target] precision): f32, f16, bf16, fp8.
    #[arg(long)]
    pub precision: Option<String>,
    /// With fp8: keep this op class at the compute precision (repeatable): qkv,
    /// attn-out, mlp-up, mlp-down, lm-head, kv-cache [default: none, or what saved FP8
    /// weights say].
    #[arg(long = "keep", value_name = "CLASS")]
    pub keep: Vec<String>,
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
                    "unknown precision `{p}` (expected f32, f16, bf16 or fp8)"
                ))
            })?;
        }
        Ok(())
    }

    /// The FP8 options: the command line's, else `saved` ones (from saved weights),
    /// else per-channel scales and no class kept.
    pub fn fp8(
        &self,
        saved_keep: &[String],
        saved_scales: Option<WeightScales>,
    ) -> Result<Fp8Options, Failure> {
        let scales = self
            .weight_scales
            .or(saved_scales)
            .unwrap_or(WeightScales::PerChannel);
        let keep = if self.keep.is_empty() {
            saved_keep
        } else {
            &self.keep
        };
        let mut opts = Fp8Options {
            granularity: match scales {
                WeightScales::PerChannel => Granularity::PerChannel,
                WeightScales::PerTensor => Granularity::PerTensor,
            },
            ..Fp8Options::default()
        };
        for k in keep {
            opts.keep.insert(
                k.parse::<OpClass>()
                    .map_err(|e| Failure::Input(anyhow!(e)))?,
            );
        }
        Ok(opts)
    }
}
