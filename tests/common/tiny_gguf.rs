//! The Hugging Face tiny fixture written as a GGUF file, as llama.cpp's converter
//! writes it: its tensor names, q/k rows permuted, a byte-level vocabulary and a chat
//! template. Used by the GGUF checkpoint tests and the GGUF fuzz target.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use fusec::gguf::{GgufWriter, Value};
use fusec::pipeline;
use fusec::text::gguf_vocab::bytes_to_unicode;
use fusec::weights::Weights;

use super::root;

pub fn fixture() -> PathBuf {
    root().join("tests/fixtures/hf-tiny-llama-s0")
}

/// llama.cpp's `LlamaModel.permute`: within each head, the rows of the two RoPE halves
/// interleaved.
fn permute(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let to = (h * d + i * 2 + j) * cols;
                let from = (h * d + j * half + i) * cols;
                out[to..to + cols].copy_from_slice(&values[from..from + cols]);
            }
        }
    }
    out
}

fn gguf_name(hf: &str) -> String {
    let top = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = top.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").expect("a layer weight");
    let (layer, rest) = rest.split_once('.').expect("layer index");
    let name = match rest {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("unexpected weight {other}"),
    };
    format!("blk.{layer}.{name}")
}

pub const TEMPLATE: &str = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

/// The tiny fixture as a GGUF file, with `edit` applied to the metadata before the
/// tensors are added.
pub fn tiny_gguf(dir: &Path, edit: impl FnOnce(&mut GgufWriter)) -> PathBuf {
    let spec = pipeline::load(&root().join("examples/tiny.toml"), None, None).expect("spec");
    let graph = pipeline::eager(&spec).expect("graph");
    let weights = Weights::load(&fixture(), &graph).expect("fixture weights");
    let m = &spec.model;
    let mut w = GgufWriter::new();
    let u = |v: u64| Value::U32(v as u32);
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("llama.block_count", u(m.num_layers))
        .meta("llama.context_length", u(m.max_seq_len))
        .meta("llama.embedding_length", u(m.hidden_size))
        .meta("llama.feed_forward_length", u(m.intermediate_size))
        .meta("llama.attention.head_count", u(m.num_heads))
        .meta("llama.attention.head_count_kv", u(m.num_kv_heads))
        .meta("llama.rope.freq_base", Value::F32(m.rope_theta as f32))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(m.rms_norm_eps as f32),
        )
        .meta("llama.rope.dimension_count", u(m.head_dim));
    // A byte-level vocabulary of the 256 bytes (id = byte), no merges; byte 10 ('\n')
    // ends a sequence.
    let spelling = bytes_to_unicode();
    let tokens: Vec<Value> = spelling
        .iter()
        .map(|c| Value::String(c.to_string()))
        .collect();
    w.meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String("default".into()))
        .meta("tokenizer.ggml.tokens", Value::Array(tokens))
        .meta(
            "tokenizer.ggml.token_type",
            Value::Array(vec![Value::I32(1); 256]),
        )
        .meta("tokenizer.ggml.merges", Value::Array(vec![]))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(10))
        .meta("tokenizer.chat_template", Value::String(TEMPLATE.into()));
    edit(&mut w);
    let mut names: Vec<&str> = graph.weights().into_iter().map(|(_, n)| n).collect();
    names.sort();
    names.dedup();
    for name in names {
        let t = weights.get(name).expect("weight");
        let shape = t.shape().to_vec();
        let mut values = t.to_vec_f32();
        let heads = if name.ends_with("q_proj.weight") {
            Some(m.num_heads)
        } else if name.ends_with("k_proj.weight") {
            Some(m.num_kv_heads)
        } else {
            None
        };
        if let Some(h) = heads {
            values = permute(&values, shape[0], shape[1], h as usize);
        }
        w.f32_tensor(&gguf_name(name), &shape, &values);
    }
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, w.to_bytes()).expect("write gguf");
    path
}
