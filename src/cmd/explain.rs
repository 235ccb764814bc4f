//! `fusec explain`: what got fused, and why.

use std::path::PathBuf;

use anyhow::anyhow;
use fusec::pipeline;

use crate::Failure;

/// Explain the fusion of MODEL: list the fused kernels, or for one node (numbered as
/// in fused.fir) the rules that built it, the eager ops it replaced, and the rules that
/// almost fired.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model.toml, a Hugging Face config.json, or a model directory holding one.
    pub model: PathBuf,
    /// The fused node to explain, as `%N` or `N` (numbering of fused.fir).
    #[arg(long)]
    pub node: Option<String>,
    /// Load fusion rules from this file too (repeatable).
    #[arg(long = "rules", value_name = "FILE")]
    pub rules: Vec<PathBuf>,
    /// KV length after the step (overrides [decode] context).
    #[arg(long)]
    pub context: Option<u64>,
    /// Sequences per step (overrides [decode] batch).
    #[arg(long)]
    pub batch: Option<u64>,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let spec = pipeline::load(&args.model, args.batch, args.context)?;
    let eager = pipeline::eager(&spec)?;
    let rules = pipeline::rules(&args.rules)?;
    let (fused, report) = pipeline::fuse(&spec, &eager, &rules)?;
    let node = match &args.node {
        None => None,
        Some(s) => Some(
            s.trim_start_matches('%')
                .parse::<usize>()
                .map_err(|_| Failure::Input(anyhow!("--node expects %N or N, got `{s}`")))?,
        ),
    };
    let text = fusec::explain::explain(&eager, &fused, &report, &rules, node)
        .map_err(|e| Failure::Input(anyhow!(e)))?;
    crate::say(&text);
    Ok(())
}
