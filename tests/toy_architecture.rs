//! A second architecture written only here, from fusec-model's public blocks, and
//! registered through the public API: Llama with a bias on the q, k and v projections
//! (the attention of Qwen2, transformers' `Qwen2Attention`). Nothing outside this file
//! knows it; it goes through every stage: the frontend, the eager build and the
//! verifier, fusion, FP8 lowering, the cost model, the report, CUDA generation, and the
//! CPU executor, where the fused graph must decode as the eager one does.

use std::path::Path;
use std::sync::Arc;

use fusec::exec::{Executor, Generation, Session, Weights};
use fusec::pipeline;
use fusec_codegen::{DecodeShape, Options};
use fusec_ir::{step, BinaryOp, Graph, NodeId, WeightRole};
use fusec_model::blocks::{
    eager_attention, greedy_outputs, kv_cache_append, split_heads, Embedding, GatedMlp, Heads,
    Linear, LmHead, RmsNorm, RopeTables, StepDims, StepInputs,
};
use fusec_model::frontend::{decoder_config, ConfigError, HfConfig, ModelConfig, Precision};
use fusec_model::{Architecture, BuildError, Builder, ModelSpec, Registry};
use fusec_rewrite::precision::Fp8Options;

const MODEL_TYPE: &str = "toy-qkv-bias";

/// Llama with biases on q, k and v.
#[derive(Debug)]
struct QkvBias;

impl Architecture for QkvBias {
    fn model_types(&self) -> &[&str] {
        &[MODEL_TYPE]
    }

    fn parse_hf_config(&self, config: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
        if let Some(act) = config.string("hidden_act")? {
            if act != "silu" {
                return Err(config.err_at("hidden_act", format!("`{act}` is not silu")));
            }
        }
        decoder_config(config)
    }

    fn build(&self, cfg: &ModelConfig) -> Result<Graph, BuildError> {
        let dims = StepDims::default();
        let dt = cfg.dtype;
        let mut b = Builder::new(&cfg.name);
        b.set_layer_count(cfg.num_layers);
        let inputs = StepInputs::new(&mut b, &dims, dt)?;
        let embed = Embedding::new(&mut b, step::EMBED, cfg.vocab_size, cfg.hidden_size, dt)?;
        let mut x = embed.forward(&mut b, inputs.input_ids)?;
        let rope = RopeTables::new(
            &mut b,
            inputs.position_ids,
            cfg.rope_theta,
            cfg.head_dim,
            &dims,
            dt,
        )?;
        for layer in 0..cfg.num_layers {
            b.set_layer(Some(layer as u32));
            x = layer_forward(&mut b, cfg, layer, x, &rope, inputs.attention_mask, &dims)?;
        }
        b.set_layer(None);
        let norm = RmsNorm::new(
            &mut b,
            step::FINAL_NORM,
            cfg.hidden_size,
            cfg.rms_norm_eps,
            dt,
        )?;
        let h = norm.forward(&mut b, x)?;
        let head = LmHead::of_model(&mut b, &embed, cfg, dt)?;
        let logits = head.forward(&mut b, h)?;
        greedy_outputs(&mut b, logits)?;
        Ok(b.finish())
    }
}

/// One decoder layer: the attention composed from the smaller blocks, with biased
/// q/k/v projections.
fn layer_forward(
    b: &mut Builder,
    cfg: &ModelConfig,
    layer: u64,
    x: NodeId,
    rope: &RopeTables,
    mask: NodeId,
    dims: &StepDims,
) -> Result<NodeId, BuildError> {
    let (d, eps, dt) = (cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype);
    let heads = Heads::of(cfg);
    let hd = heads.head_dim;
    let norm = RmsNorm::new(b, &step::layer_weight(layer, "input_layernorm"), d, eps, dt)?;
    let n = norm.forward(b, x)?;
    let mut qkv = Vec::new();
    for (module, role, count) in [
        ("self_attn.q_proj", WeightRole::Query, heads.num_heads),
        ("self_attn.k_proj", WeightRole::Key, heads.num_kv_heads),
        ("self_attn.v_proj", WeightRole::Value, heads.num_kv_heads),
    ] {
        let proj = Linear::new(
            b,
            &step::layer_weight(layer, module),
            role,
            dt,
            count * hd,
            d,
        )?
        .with_bias(b, &step::layer_bias(layer, module))?;
        let y = proj.forward(b, n)?;
        qkv.push(split_heads(b, y, count, hd, dims)?);
    }
    let (q, k) = rope.apply(b, qkv[0], qkv[1])?;
    let (k_all, v_all) = kv_cache_append(b, layer, k, qkv[2], None, dims)?;
    let o = eager_attention(b, q, k_all, v_all, mask, &heads, dims)?;
    let o_proj = Linear::new(
        b,
        &step::layer_weight(layer, "self_attn.o_proj"),
        WeightRole::AttnOut,
        dt,
        d,
        heads.num_heads * hd,
    )?;
    let o = o_proj.forward(b, o)?;
    let x = b.binary(BinaryOp::Add, x, o)?;

    let norm = RmsNorm::new(
        b,
        &step::layer_weight(layer, "post_attention_layernorm"),
        d,
        eps,
        dt,
    )?;
    let n = norm.forward(b, x)?;
    let m = GatedMlp::llama(cfg, layer).forward(b, n)?;
    b.binary(BinaryOp::Add, x, m)
}

/// A small GQA model (2 KV heads for 4 query heads) in f32.
const CONFIG: &str = r#"{
  "model_type": "toy-qkv-bias",
  "hidden_size": 64,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "intermediate_size": 96,
  "vocab_size": 128,
  "max_position_embeddings": 64,
  "rms_norm_eps": 1e-6,
  "rope_theta": 10000.0,
  "hidden_act": "silu",
  "torch_dtype": "float32"
}"#;

fn registry() -> Registry {
    let mut registry = Registry::with_builtins();
    registry.register(Arc::new(QkvBias)).expect("registers");
    registry
}

fn spec(registry: &Registry) -> ModelSpec {
    let mut spec = registry
        .parse_hf_config(Path::new("toy/config.json"), CONFIG)
        .expect("the toy's config parses");
    spec.set_decode(Some(2), Some(16))
        .expect("a valid decode shape");
    spec
}

fn bias_names(graph: &Graph) -> Vec<String> {
    graph
        .weights()
        .into_iter()
        .filter(|(_, name)| graph.weight_role(name) == Some(WeightRole::Bias))
        .map(|(_, name)| name.to_string())
        .collect()
}

#[test]
fn the_toy_is_reached_only_through_its_registry() {
    let registry = registry();
    let mut expected = fusec_model::Registry::builtin().model_types();
    expected.push(MODEL_TYPE);
    assert_eq!(registry.model_types(), expected);
    let spec = spec(&registry);
    assert_eq!(spec.architecture, MODEL_TYPE);
    // The built-in registry does not know it.
    let path = Path::new("toy/config.json");
    let e = fusec_model::parse_hf_config(path, CONFIG).expect_err("not built in");
    assert!(
        e.message.contains("unsupported model_type `toy-qkv-bias`"),
        "{e}"
    );
    assert!(pipeline::eager(&spec).is_err());
    // A model.toml may name it too.
    let toml = "[model]\narchitecture = \"toy-qkv-bias\"\nhidden_size = 64\nnum_layers = 1\n\
                num_heads = 4\nintermediate_size = 96\nvocab_size = 128\n\
                rope_theta = 10000.0\nrms_norm_eps = 1e-6\nmax_seq_len = 64\n";
    let from_toml = registry
        .parse_model_toml(Path::new("toy.toml"), toml)
        .expect("parses");
    assert_eq!(from_toml.architecture, MODEL_TYPE);
}

#[test]
fn the_eager_graph_has_a_bias_on_q_k_and_v_and_every_weight_a_role() {
    let registry = registry();
    let spec = spec(&registry);
    let eager = pipeline::eager_with(&registry, &spec).expect("builds and verifies");
    let mut want = Vec::new();
    for layer in 0..2 {
        for m in ["q_proj", "k_proj", "v_proj"] {
            want.push(step::layer_bias(layer, &format!("self_attn.{m}")));
        }
    }
    want.sort();
    let mut got = bias_names(&eager);
    got.sort();
    assert_eq!(got, want);
    for (_, name) in eager.weights() {
        assert!(eager.weight_role(name).is_some(), "{name} has no role");
    }
    // The same model without the biases is Llama's graph with 6 weights fewer.
    let llama = pipeline::eager(&ModelSpec {
        architecture: "llama".into(),
        ..spec.clone()
    })
    .expect("builds");
    assert_eq!(llama.weights().len() + 6, eager.weights().len());
}

/// Greedy decoding of two sequences: a prompt of 3 tokens, then 4 generated.
fn decode(graph: Graph, weights: &Weights) -> Generation {
    let exec = Executor::new(graph, weights).expect("plans");
    Session::with_capacity(exec, 2, 8)
        .expect("session")
        .generate(&[vec![5, 17, 99], vec![1, 64, 3]], 4)
        .expect("decodes")
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (f64::from(x) - f64::from(y)).powi(2);
        den += f64::from(y).powi(2);
    }
    (num / den).sqrt()
}

#[test]
fn the_toy_compiles_and_runs_through_every_stage() {
    let registry = registry();
    let spec = spec(&registry);
    let rules = pipeline::rules(&[]).expect("built-in rules");

    // Eager build and verifier, fusion (verified after it too).
    let eager = pipeline::eager_with(&registry, &spec).expect("builds");
    let (fused, _) = pipeline::fuse(&spec, &eager, &rules).expect("fuses");
    assert!(fused.node_count() < eager.node_count());
    assert_eq!(bias_names(&fused).len(), 6, "the biases survive fusion");
    for (_, name) in fused.weights() {
        assert!(
            fused.weight_role(name).is_some(),
            "fused: {name} has no role"
        );
    }

    // FP8 lowering, through the registry.
    let (fp8, _) = pipeline::fused_in_with(
        &registry,
        &spec,
        Precision::Fp8,
        &rules,
        &Fp8Options::default(),
    )
    .expect("lowers to FP8");
    assert!(fp8.weights().iter().any(|(_, name)| name.ends_with(".fp8")));

    // The cost model: fusion saves launches and bytes.
    let bindings = pipeline::bindings(&spec);
    let gpu = pipeline::target_gpu(&spec).expect("the default GPU");
    let cost = |g: &Graph| fusec_ir::cost::graph_cost(g, &bindings).expect("costs");
    let (eager_cost, fused_cost) = (cost(&eager), cost(&fused));
    assert!(fused_cost.total.launches < eager_cost.total.launches);
    assert!(fusec_ir::cost::estimate_seconds(&fused, &fused_cost, gpu) > 0.0);
    assert!(cost(&fp8).total.launches > 0);

    // The report over the three variants.
    let variants: Vec<fusec_report::Variant> =
        [("eager", &eager), ("fused", &fused), ("fused+fp8", &fp8)]
            .into_iter()
            .map(|(name, graph)| fusec_report::Variant {
                name: name.to_string(),
                description: format!("the toy, {name}"),
                graph: graph.clone(),
            })
            .collect();
    let gpus = fusec_ir::hardware::GPUS.to_vec();
    let report = fusec_report::build(&fusec_report::Inputs {
        spec: &spec,
        variants: &variants,
        precision: "fp8",
        gpu,
        gpus: &gpus,
        price_per_hour: 2.0,
        contexts: &[8, 16],
        batches: &[1, 2],
        prefill: &[],
        prompts: &[],
        prefill_chunk: 512,
        measurements: &[],
        measurements_file: None,
        cpu: None,
        notes: &[],
    })
    .expect("reports");
    for format in [fusec_report::Format::Text, fusec_report::Format::Json] {
        let text = report.render(format).expect("renders");
        assert!(text.contains("fused+fp8"));
    }

    // CUDA generation for the fused and FP8 graphs.
    let shape = DecodeShape::new(spec.decode.batch, spec.model.max_seq_len);
    for graph in [&fused, &fp8] {
        let out = fusec_codegen::generate(graph, &shape, &Options::default()).expect("generates");
        assert!(!out.kernels.is_empty());
        assert!(out.source().contains("__global__"));
    }

    // The CPU executor: the fused graph decodes as the eager one does.
    let weights = Weights::random(&eager, 7).expect("random weights");
    let want = decode(eager, &weights);
    let got = decode(fused, &weights);
    assert_eq!(got.generated, want.generated);
    assert_eq!(got.steps, 6);
    for seq in 0..want.logits.dim().0 {
        for (i, (row_a, row_b)) in got.rows(seq).zip(want.rows(seq)).enumerate() {
            let err = rel_l2(row_a, row_b);
            assert!(
                err <= 1e-5,
                "sequence {seq}, row {i}: relative L2 error {err}"
            );
        }
    }

    // The biases matter: Llama's graph on the same weights (drawn per name, so equal
    // where the names are) decodes to other logits.
    let llama_spec = ModelSpec {
        architecture: "llama".into(),
        ..spec.clone()
    };
    let llama = pipeline::eager(&llama_spec).expect("builds");
    let llama_weights = Weights::random(&llama, 7).expect("random weights");
    let without = decode(llama, &llama_weights);
    let err = rel_l2(without.row(0, 0), want.row(0, 0));
    assert!(err > 1e-3, "biases changed the logits by only {err}");
}
