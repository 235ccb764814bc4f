//! The compile pipeline, phase by phase, with the verifier after every phase.

use std::path::Path;

use fusec_ir::build::eager_decode_graph;
use fusec_ir::frontend::{load_model, ConfigError, ModelSpec};
use fusec_ir::shape::Bindings;
use fusec_ir::{verify, Graph};

use fusec_ir::build::names;

/// What can go wrong when compiling. `Input` errors are the user's (exit code 2);
/// the rest are fusec's own (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Input(#[from] ConfigError),
    #[error("{phase}: {message}")]
    Internal {
        phase: &'static str,
        message: String,
    },
}

impl PipelineError {
    pub fn is_input_error(&self) -> bool {
        matches!(self, PipelineError::Input(_))
    }
}

/// Runs the verifier after a named phase.
pub fn verified(phase: &'static str, graph: Graph) -> Result<Graph, PipelineError> {
    verify(&graph).map_err(|e| PipelineError::Internal {
        phase,
        message: format!("verifier: {e}"),
    })?;
    Ok(graph)
}

/// Loads a model description and applies command-line overrides of the decode shape.
pub fn load(
    path: &Path,
    batch: Option<u64>,
    context: Option<u64>,
) -> Result<ModelSpec, PipelineError> {
    let mut spec = load_model(path)?;
    spec.set_decode(batch, context)?;
    Ok(spec)
}

/// The eager decode graph of a model, verified.
pub fn eager(spec: &ModelSpec) -> Result<Graph, PipelineError> {
    let graph = eager_decode_graph(&spec.model).map_err(|e| PipelineError::Internal {
        phase: "build",
        message: e.to_string(),
    })?;
    verified("build", graph)
}

/// Values of the graph's symbols for the spec's decode shape: `B` sequences with
/// `context - 1` positions cached before the step.
pub fn bindings(spec: &ModelSpec) -> Bindings {
    Bindings::new()
        .with(names::BATCH, spec.decode.batch)
        .with(names::PAST, spec.decode.context - 1)
}
