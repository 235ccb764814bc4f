//! Seeded random weights, so that every example runs without a checkpoint.
//!
//! The distribution follows Hugging Face's Llama initialization:
//! - rank-1 weights (the RMSNorm gains) are all ones;
//! - every other weight is drawn i.i.d. from a normal distribution with mean 0 and
//!   standard deviation [`INIT_STD`] (0.02, `initializer_range`'s default).
//!
//! Each tensor has its own [`SplitMix64`] stream, seeded from the run's seed and the
//! tensor's name, so a tensor's values depend on nothing else (not on the order or the
//! set of other weights), on every platform and thread count.
//!
//! A lowered graph's quantized weights (`W.fp8`, `W.scale`) are made from a random
//! `W`, drawn as the unlowered graph draws it, so both graphs run the same model.

use fusec_ir::Graph;
use rayon::prelude::*;

use crate::error::Error;
use crate::quant::{self, Derived, KvScales};
use crate::tensor::WeightTensor;
use crate::weights::{fixed_shape, WeightSource, Weights};

/// The standard deviation of random matrices.
pub const INIT_STD: f64 = 0.02;

/// SplitMix64 (Steele, Lea and Flood, 2014): a small, fast 64-bit generator with good
/// statistical quality for test data and initialization.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
    /// The second value of the last Box-Muller pair.
    spare: Option<f64>,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 {
            state: seed,
            spare: None,
        }
    }

    /// A generator for the stream named `name` under `seed`.
    pub fn for_name(seed: u64, name: &str) -> SplitMix64 {
        // FNV-1a of the name, mixed with the seed through one SplitMix64 step.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut g = SplitMix64::new(seed ^ h);
        SplitMix64::new(g.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform integer in `0..n` (`n > 0`; 0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A standard normal value (Box-Muller; the pair's second value is kept for the
    /// next call).
    pub fn normal(&mut self) -> f64 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let r = (-2.0 * (1.0 - self.next_f64()).ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * self.next_f64();
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

impl Weights {
    /// Seeded random weights for every weight of `graph` (see the module
    /// documentation).
    pub fn random(graph: &Graph, seed: u64) -> Result<Weights, Error> {
        random_weights(graph, seed)
    }
}

/// Random weights for every weight of `graph`, in its declared dtypes.
pub fn random_weights(graph: &Graph, seed: u64) -> Result<Weights, Error> {
    let derived = quant::derived_weights(graph)?;
    let mut wanted = Vec::new();
    for (id, name) in graph.weights() {
        let ty = graph
            .ty(id)
            .tensor()
            .ok_or_else(|| Error::InvalidGraph(format!("weight `{name}` has a tuple type")))?;
        match derived.get(name) {
            Some(Derived::Gemv {
                base, to, shape, ..
            }) => wanted.push((base.clone(), *to, shape.clone())),
            Some(Derived::KvScale { .. }) => {
                return Err(Error::Uncalibrated {
                    tensor: name.to_string(),
                })
            }
            None => wanted.push((name.to_string(), ty.dtype, fixed_shape(name, ty)?)),
        }
    }
    wanted.sort_by(|a, b| a.0.cmp(&b.0));
    wanted.dedup_by(|a, b| a.0 == b.0);
    let tensors = wanted
        .into_par_iter()
        .map(|(name, dtype, shape)| {
            let n = shape.iter().product();
            let values = if shape.len() == 1 {
                vec![1.0f32; n]
            } else {
                let mut rng = SplitMix64::for_name(seed, &name);
                (0..n).map(|_| (rng.normal() * INIT_STD) as f32).collect()
            };
            let t = WeightTensor::from_f32(dtype, &shape, values)
                .map_err(|e| Error::InvalidGraph(format!("weight `{name}`: {e}")))?;
            Ok((name, t))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let source = WeightSource::Random { seed };
    let mut weights = Weights::new(source.clone());
    for (name, t) in tensors {
        weights.insert(name, t, source.clone());
    }
    if derived.is_empty() {
        Ok(weights)
    } else {
        quant::lower_weights(&weights, graph, &KvScales::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map(|_| SplitMix64::for_name(7, "w").next_u64())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            SplitMix64::for_name(7, "w").next_u64(),
            SplitMix64::for_name(7, "v").next_u64()
        );
        assert_ne!(
            SplitMix64::for_name(7, "w").next_u64(),
            SplitMix64::for_name(8, "w").next_u64()
        );
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut g = SplitMix64::new(1);
        let n = 20_000;
        let xs: Vec<f64> = (0..n).map(|_| g.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }
}
