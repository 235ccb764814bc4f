//! `fusec compile`: build the decode graph, write its dumps, print the summary.

use std::path::PathBuf;

use anyhow::Context;
use fusec::pipeline;
use fusec::summary::Summary;
use fusec_ir::{dot, text};

use crate::Failure;

/// Compile one decode step of MODEL and report launches, bytes and FLOPs.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model.toml, a Hugging Face config.json, or a model directory holding one.
    pub model: PathBuf,
    /// Directory for the dumps [default: fusec-out/<model name>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// What to write, comma-separated: `ir` (eager.fir), `dot` (eager.dot).
    #[arg(long, value_delimiter = ',', default_value = "ir")]
    pub emit: Vec<Emit>,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub report_json: Option<PathBuf>,
    /// KV length after the step (overrides [decode] context).
    #[arg(long)]
    pub context: Option<u64>,
    /// Sequences per step (overrides [decode] batch).
    #[arg(long)]
    pub batch: Option<u64>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emit {
    Ir,
    Dot,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let spec = pipeline::load(&args.model, args.batch, args.context)?;
    let eager = pipeline::eager(&spec)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("fusec-out").join(&spec.model.name));
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create {}", out.display()))
        .map_err(Failure::Input)?;
    let internal = |e: fusec_ir::graph::CycleError| Failure::Internal(e.into());
    let mut written = Vec::new();
    for emit in &args.emit {
        let (file, contents) = match emit {
            Emit::Ir => ("eager.fir", text::print(&eager).map_err(internal)?),
            Emit::Dot => ("eager.dot", dot::to_dot(&eager).map_err(internal)?),
        };
        let path = out.join(file);
        std::fs::write(&path, contents)
            .with_context(|| format!("cannot write {}", path.display()))
            .map_err(Failure::Input)?;
        written.push(path);
    }
    let summary = Summary::new(&spec, &eager).map_err(|e| Failure::Internal(e.into()))?;
    print!("{}", summary.render());
    for p in &written {
        println!("wrote {}", p.display());
    }
    if let Some(path) = &args.report_json {
        let json =
            serde_json::to_string_pretty(&summary).map_err(|e| Failure::Internal(e.into()))?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
            .map_err(Failure::Input)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
