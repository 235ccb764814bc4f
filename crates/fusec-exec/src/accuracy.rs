//! The accuracy of a lowered run against a reference run, step by step.
//!
//! Both runs are teacher-forced on the same tokens (`Session::generate_forced`), so
//! each step compares logits computed from identical inputs and a flipped token does
//! not change what later steps see. Per step:
//!
//! - the relative L2 error `||x - r|| / ||r||` of the logits `x` against the reference
//!   `r`;
//! - top-1 agreement: whether both pick the same greedy token (ties to the lowest id);
//! - the KL divergence `KL(P_r || P_x) = sum P_r (log P_r - log P_x)` of the softmax
//!   distributions, in nats, computed in `f64` with log-softmax;
//! - the reference's margin between its top two logits, which says how close to a tie
//!   a disagreement was.

use ndarray::ArrayView2;

/// One step's comparison.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepAccuracy {
    pub step: usize,
    pub rel_l2: f64,
    pub top1_agree: bool,
    /// KL(reference || lowered), in nats.
    pub kl: f64,
    pub reference_top1: usize,
    pub top1: usize,
    /// The reference's top-1 logit minus its top-2 logit.
    pub reference_margin: f64,
}

/// A run's comparison: every step and the totals.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Accuracy {
    pub steps: Vec<StepAccuracy>,
    /// Steps whose top-1 tokens agree.
    pub top1_agreement: usize,
    pub max_rel_l2: f64,
    pub mean_kl: f64,
    pub max_kl: f64,
}

/// The greedy token of a logits row: the first maximum (NaN counts as largest, as in
/// `torch.argmax`).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        let b = row[best];
        if b.is_nan() {
            break;
        }
        if v > b || v.is_nan() {
            best = i;
        }
    }
    best
}

/// `||x - r|| / ||r||` in `f64` (0 when both are zero).
pub fn rel_l2(x: &[f32], r: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(r) {
        num += (f64::from(a) - f64::from(b)).powi(2);
        den += f64::from(b).powi(2);
    }
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}

/// `log softmax(x)` in `f64`.
fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let lse = max
        + x.iter()
            .map(|&v| (f64::from(v) - max).exp())
            .sum::<f64>()
            .ln();
    x.iter().map(|&v| f64::from(v) - lse).collect()
}

/// `KL(softmax(r) || softmax(x))` in nats.
pub fn kl_divergence(r: &[f32], x: &[f32]) -> f64 {
    let (lr, lx) = (log_softmax(r), log_softmax(x));
    lr.iter()
        .zip(&lx)
        .map(|(&a, &b)| {
            if a == f64::NEG_INFINITY {
                0.0
            } else {
                a.exp() * (a - b)
            }
        })
        .sum::<f64>()
        .max(0.0)
}

/// The top-1 logit minus the top-2 logit (infinite for fewer than two).
pub fn top2_margin(row: &[f32]) -> f64 {
    let (mut a, mut b) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &v in row {
        let v = f64::from(v);
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

/// Compares one step's logits with the reference's.
pub fn compare_step(step: usize, reference: &[f32], lowered: &[f32]) -> StepAccuracy {
    let (reference_top1, top1) = (argmax(reference), argmax(lowered));
    StepAccuracy {
        step,
        rel_l2: rel_l2(lowered, reference),
        top1_agree: reference_top1 == top1,
        kl: kl_divergence(reference, lowered),
        reference_top1,
        top1,
        reference_margin: top2_margin(reference),
    }
}

/// Compares the logits rows (`[step, vocab]`) of two teacher-forced runs, step by
/// step.
pub fn compare(reference: ArrayView2<'_, f32>, lowered: ArrayView2<'_, f32>) -> Accuracy {
    let steps: Vec<StepAccuracy> = reference
        .outer_iter()
        .zip(lowered.outer_iter())
        .enumerate()
        .map(|(i, (r, x))| compare_step(i, &r.to_vec(), &x.to_vec()))
        .collect();
    let n = steps.len().max(1) as f64;
    Accuracy {
        top1_agreement: steps.iter().filter(|s| s.top1_agree).count(),
        max_rel_l2: steps.iter().fold(0.0, |m, s| m.max(s.rel_l2)),
        mean_kl: steps.iter().map(|s| s.kl).sum::<f64>() / n,
        max_kl: steps.iter().fold(0.0, |m, s| m.max(s.kl)),
        steps,
    }
}

/// The comparison as the table `fusec run --compare` prints.
pub fn render(acc: &Accuracy, name: &str, reference: &str) -> String {
    let mut out = format!(
        "accuracy of {name} against {reference}, teacher-forced on the {reference} tokens\n{:>5} {:>12} {:>6} {:>12} {:>10}\n",
        "step", "rel L2", "top-1", "KL (nats)", "ref margin"
    );
    for s in &acc.steps {
        out.push_str(&format!(
            "{:>5} {:>12.3e} {:>6} {:>12.3e} {:>10.4}\n",
            s.step,
            s.rel_l2,
            if s.top1_agree {
                "same".to_string()
            } else {
                format!("{}!={}", s.top1, s.reference_top1)
            },
            s.kl,
            s.reference_margin
        ));
    }
    out.push_str(&format!(
        "top-1 agreement {}/{}, max rel L2 {:.3e}, mean KL {:.3e}, max KL {:.3e}\n",
        acc.top1_agreement,
        acc.steps.len(),
        acc.max_rel_l2,
        acc.mean_kl,
        acc.max_kl
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_identical_and_shifted_logits() {
        let r = [1.0, 3.0, 2.0];
        let a = compare_step(0, &r, &r);
        assert_eq!((a.rel_l2, a.kl, a.top1_agree, a.top1), (0.0, 0.0, true, 1));
        assert_eq!(a.reference_margin, 1.0);
        // A constant shift changes no probability.
        let shifted = [2.0, 4.0, 3.0];
        assert!(kl_divergence(&r, &shifted) < 1e-12);
        let flipped = compare_step(1, &r, &[1.0, 2.0, 3.0]);
        assert!(!flipped.top1_agree && flipped.kl > 0.1);
        assert_eq!(argmax(&[1.0, 5.0, 5.0]), 1, "ties go to the lowest id");
        let (r, x) = (
            ndarray::arr2(&[[r[0], r[1], r[2]]]),
            ndarray::arr2(&[[1.0, 2.0, 3.0]]),
        );
        let acc = compare(r.view(), x.view());
        assert_eq!(acc.top1_agreement, 0);
        assert!(render(&acc, "fp8", "f32").contains("2!=1"));
    }
}
