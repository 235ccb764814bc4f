//! Helpers shared by the integration tests: small model configurations and a
//! safetensors writer.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::Path;

use fusec_exec::{WeightTensor, Weights};
use fusec_ir::{DType, Graph};
use fusec_model::frontend::ModelConfig;
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A small Llama configuration.
pub struct Cfg {
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub inter: u64,
    pub vocab: u64,
    pub tied: bool,
    pub dtype: DType,
}

impl Cfg {
    pub fn tiny() -> Cfg {
        Cfg {
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            inter: 48,
            vocab: 61,
            tied: false,
            dtype: DType::F32,
        }
    }

    pub fn model(&self, name: &str) -> ModelConfig {
        ModelConfig {
            name: name.to_string(),
            hidden_size: self.hidden,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            intermediate_size: self.inter,
            vocab_size: self.vocab,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            max_seq_len: 256,
            tie_word_embeddings: self.tied,
            dtype: self.dtype,
            sliding_window: None,
            layer_types: Vec::new(),
            rope_scaling: None,
            multipliers: None,
            gemma: None,
        }
    }
}

/// The tensors of every weight of `graph`, by name.
/// The concrete shape of the input `id` of `graph` at bindings `b`.
pub fn input_shape(graph: &Graph, id: fusec_ir::NodeId, b: &fusec_ir::Bindings) -> Vec<usize> {
    let ty = graph.ty(id).tensor().expect("tensor input");
    ty.shape
        .eval(b)
        .expect("bound")
        .iter()
        .map(|&d| d as usize)
        .collect()
}

pub fn graph_weights(graph: &Graph, weights: &Weights) -> Vec<(String, WeightTensor)> {
    graph
        .weights()
        .into_iter()
        .map(|(_, name)| {
            (
                name.to_string(),
                weights.get(name).expect("weight present").clone(),
            )
        })
        .collect()
}

/// The little-endian bytes of `values` stored as `dtype` (F32, F16 or BF16).
pub fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        other => panic!("test helper cannot encode {other:?}"),
    }
}

/// Writes raw tensors `(name, dtype, shape, bytes)` as a safetensors file.
pub fn write_raw(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), bytes).expect("consistent view"),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).expect("serializes");
    std::fs::write(path, bytes).expect("writes");
}

/// Writes `tensors` as a safetensors file with every tensor stored as `dtype`.
pub fn write_safetensors(path: &Path, tensors: &[(String, WeightTensor)], dtype: Dtype) {
    let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                dtype,
                t.shape().to_vec(),
                encode(&t.to_vec_f32(), dtype),
            )
        })
        .collect();
    write_raw(path, &raw);
}

/// Relative L2 error of `actual` against `expected`.
pub fn rel_l2(actual: &[f32], expected: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (&a, &e) in actual.iter().zip(expected) {
        num += (f64::from(a) - f64::from(e)).powi(2);
        den += f64::from(e).powi(2);
    }
    (num / den).sqrt()
}

/// `graph` fused by the built-in rules for an H100 at batch 1 and context 64, with the
/// runner's `limits` (what `fusec::pipeline::fuse` does, without the root crate).
pub fn fuse_with(
    graph: &Graph,
    limits: fusec_rewrite::Limits,
) -> (Graph, fusec_rewrite::FuseReport) {
    let rules = fusec_rewrite::RuleSet::builtin().expect("built-in rules load");
    let gpu = fusec_ir::hardware::gpu("h100-sxm").expect("a known GPU");
    let bindings = fusec_exec::decode::bindings(1, 63);
    let opts = fusec_rewrite::Options {
        rules: &rules,
        gpu,
        bindings: &bindings,
        limits,
    };
    fusec_rewrite::fuse(graph, &opts).expect("fuses")
}

/// `graph` fully fused by the built-in rules.
pub fn fuse(graph: &Graph) -> Graph {
    fuse_with(graph, fusec_rewrite::Limits::default()).0
}
