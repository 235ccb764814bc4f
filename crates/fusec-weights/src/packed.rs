//! Packed projections: checkpoint tensors that stack the weights of several of the
//! graph's projections, split at load.
//!
//! Phi-3 (transformers' models/phi3/modeling_phi3.py) computes q, k and v with one
//! `qkv_proj` and the MLP's gate and up with one `gate_up_proj`: `Phi3Attention` slices
//! the output of `qkv_proj` at `num_heads * head_dim` and `(num_heads + num_kv_heads) *
//! head_dim`, and `Phi3MLP` takes `gate, up = gate_up_proj(x).chunk(2, dim=-1)`. Rows
//! `r` of a packed `[out, in]` weight give output `r`, so those slices of the output are
//! the same rows of the weight: the packed tensor is the parts' weights stacked along
//! rows, in the order of [`PACKINGS`]. The graph names the parts as Llama does
//! (`self_attn.q_proj` ...), keeps Llama's fused kernels (the merged GEMV reads q, k
//! and v as one), and the loader cuts each part's rows out of the packed tensor when
//! the checkpoint has no tensor of the part's own name.

/// One packed projection: the module holding the packed weight and the modules whose
/// weights it stacks, rows in order.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    pub packed: &'static str,
    pub parts: &'static [&'static str],
}

/// The packings of Hugging Face checkpoints (Phi-3's `qkv_proj` and `gate_up_proj`).
pub const PACKINGS: &[Packing] = &[
    Packing {
        packed: "self_attn.qkv_proj",
        parts: &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    },
    Packing {
        packed: "mlp.gate_up_proj",
        parts: &["mlp.gate_proj", "mlp.up_proj"],
    },
];

/// Where a weight may lie in a packed tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedHome {
    /// The packed tensor's name, e.g. `model.layers.0.self_attn.qkv_proj.weight`.
    pub packed: String,
    /// The names of every part, rows in order (the weight among them).
    pub parts: Vec<String>,
}

/// The packed tensor that weight `name` (`<prefix>.<module>.weight`) is a part of, if
/// its module is one of a packing's parts.
pub fn home(name: &str) -> Option<PackedHome> {
    let stem = name.strip_suffix(".weight")?;
    PACKINGS.iter().find_map(|p| {
        p.parts.iter().find_map(|part| {
            let prefix = stem.strip_suffix(part)?.strip_suffix('.')?;
            Some(PackedHome {
                packed: format!("{prefix}.{}.weight", p.packed),
                parts: p
                    .parts
                    .iter()
                    .map(|q| format!("{prefix}.{q}.weight"))
                    .collect(),
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_find_their_packed_tensor() {
        let h = home("model.layers.3.self_attn.k_proj.weight").expect("a part");
        assert_eq!(h.packed, "model.layers.3.self_attn.qkv_proj.weight");
        assert_eq!(
            h.parts,
            [
                "model.layers.3.self_attn.q_proj.weight",
                "model.layers.3.self_attn.k_proj.weight",
                "model.layers.3.self_attn.v_proj.weight"
            ]
        );
        let h = home("model.layers.0.mlp.up_proj.weight").expect("a part");
        assert_eq!(h.packed, "model.layers.0.mlp.gate_up_proj.weight");
        assert_eq!(home("model.layers.0.mlp.down_proj.weight"), None);
        assert_eq!(home("model.layers.0.self_attn.q_proj.bias"), None);
    }
}
