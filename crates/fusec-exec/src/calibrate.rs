//! KV-cache scales of an FP8 graph, calibrated by a run.
//!
//! The static scales of an FP8 KV cache (`past.L.key.scale`, `past.L.value.scale :
//! f32[]`, operands 9 and 10 of `fused.decode_attention`) depend on the activations,
//! not on the weights, so no checkpoint can give them and `fusec_weights::quant` cannot
//! derive them. [`calibrate_kv_scales`] runs the prompt through the unlowered graph
//! (bf16 for FP8), and each cache's scale is `KV_SCALE_MARGIN * absmax / 448`, where
//! `absmax` is the largest magnitude in that cache after the prompt (keys after RoPE,
//! as cached). `fusec_weights::lower_weights` then takes the scales by name.
//!
//! **Why a margin of 2.** A static scale must also cover the tokens generated after
//! calibration; an entry beyond `448 * scale` saturates. E4M3 is a floating-point
//! format, so a larger scale costs no relative precision for normal values: it only
//! moves the subnormal threshold (`2^-6 * scale`) up by the same factor, which with a
//! margin of 2 is still `absmax / 14336`. Indeed a power-of-two margin changes no
//! stored code except where the smaller scale would saturate (or the larger one makes
//! a value subnormal): `x / (2s)` is exactly half of `x / s`. One binade of headroom is
//! therefore nearly free, and it absorbs the growth of the caches' range measured on
//! the fixture: the absmax over all 21 positions is at most 1.24x the absmax over the
//! 5-token prompt (layer 0's keys), which a margin of 1 would saturate.

use std::collections::BTreeMap;

use fusec_ir::step;
use fusec_ir::{numerics, DType, Graph};
use fusec_weights::quant::{derived_weights, Derived, KvScales};
use fusec_weights::Weights;

use crate::decode::Session;
use crate::error::Error;
use crate::exec::Executor;

/// The headroom of a calibrated KV-cache scale over the calibration run's absmax (see
/// the module documentation).
pub const KV_SCALE_MARGIN: f32 = 2.0;

/// Calibrates the KV-cache scales of `lowered` by running `prompts` (one per sequence,
/// of one length) through `graph`, the same model unlowered, with `weights` (see the
/// module documentation). Returns each scale by weight name, and each cache's absmax.
pub fn calibrate_kv_scales(
    lowered: &Graph,
    graph: &Graph,
    weights: &Weights,
    prompts: &[Vec<i32>],
) -> Result<(KvScales, BTreeMap<String, f32>), Error> {
    let wanted: Vec<(String, String, DType)> = derived_weights(lowered)?
        .into_iter()
        .filter_map(|(name, d)| match d {
            Derived::KvScale { state } => {
                let format = lowered
                    .inputs()
                    .into_iter()
                    .find(|(_, n, _)| *n == state)
                    .and_then(|(id, _, _)| lowered.ty(id).tensor().map(|t| t.dtype))
                    .unwrap_or(DType::Fp8E4M3);
                Some((name, state, format))
            }
            Derived::Gemv { .. } => None,
        })
        .collect();
    let mut scales = KvScales::new();
    let mut absmaxes = BTreeMap::new();
    if wanted.is_empty() {
        return Ok((scales, absmaxes));
    }
    let len = prompts.first().map_or(0, Vec::len);
    if len == 0 || prompts.iter().any(|p| p.len() != len) {
        return Err(Error::BadInput {
            name: step::INPUT_IDS.into(),
            message: "calibration needs non-empty prompts of one length".into(),
        });
    }
    let exec = Executor::new(graph.clone(), weights)?;
    let mut session = Session::with_capacity(exec, prompts.len(), len)?;
    let mut tokens = Vec::with_capacity(prompts.len());
    for pos in 0..len {
        tokens.clear();
        tokens.extend(prompts.iter().map(|p| p[pos]));
        session.step(&tokens)?;
    }
    for (name, state, format) in wanted {
        let cache = session.state(&state).ok_or_else(|| {
            Error::InvalidGraph(format!(
                "calibration: the unlowered graph has no cache `{state}`"
            ))
        })?;
        let absmax = cache
            .to_vec_f32()
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()));
        scales.insert(name, numerics::scale_for(absmax * KV_SCALE_MARGIN, format));
        absmaxes.insert(state, absmax);
    }
    Ok((scales, absmaxes))
}
