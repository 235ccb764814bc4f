//! Each primitive kernel against a plain `f64` reference on random shapes and layouts
//! (contiguous, transposed, sliced and broadcast views).

use fusec_exec::kernels::elementwise::{binary, cast, unary, Arg};
use fusec_exec::kernels::gather::embedding;
use fusec_exec::kernels::matmul::{linear, matmul};
use fusec_exec::kernels::movement::{cat, copy};
use fusec_exec::kernels::reduce::{argmax, reduce, softmax};
use fusec_exec::{KernelError, SplitMix64, Tensor};
use fusec_ir::{BinaryOp, DType, ReduceOp, UnaryOp};
use proptest::prelude::*;

/// Every index of `shape`, row-major.
fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![vec![]];
    for &d in shape {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                (0..d).map(move |i| {
                    let mut p = prefix.clone();
                    p.push(i);
                    p
                })
            })
            .collect();
    }
    out
}

fn at(t: &Tensor, index: &[usize]) -> f64 {
    t.get(index).expect("index in range")
}

/// A tensor of logical shape `shape` with values from `gen`, laid out as `layout`
/// says: 0 contiguous, 1 transposed (first and last axes), 2 a slice of a wider
/// tensor, 3 broadcast along the first axis.
fn make(
    shape: &[usize],
    layout: u8,
    rng: &mut SplitMix64,
    gen: &dyn Fn(&mut SplitMix64) -> f32,
) -> Tensor {
    let rank = shape.len();
    let fill = |s: &[usize], rng: &mut SplitMix64| {
        let n = s.iter().product();
        Tensor::from_f32(DType::F32, s, (0..n).map(|_| gen(rng)).collect()).expect("sizes match")
    };
    match layout {
        1 if rank >= 2 => {
            let mut s = shape.to_vec();
            s.swap(0, rank - 1);
            fill(&s, rng).transpose(0, rank - 1).expect("axes in range")
        }
        2 if rank >= 1 => {
            let mut s = shape.to_vec();
            s[rank - 1] += 3;
            fill(&s, rng)
                .slice(rank - 1, 1, shape[rank - 1] + 1)
                .expect("in range")
        }
        3 if rank >= 1 => {
            let mut s = shape.to_vec();
            s[0] = 1;
            fill(&s, rng).expand(shape).expect("size-1 axis")
        }
        _ => fill(shape, rng),
    }
}

fn normal(rng: &mut SplitMix64) -> f32 {
    rng.normal() as f32
}

fn positive(rng: &mut SplitMix64) -> f32 {
    rng.uniform(0.1, 3.0) as f32
}

fn close(actual: f64, expected: f64, tol: f64) -> bool {
    (actual - expected).abs() <= tol * (1.0 + expected.abs())
        || (actual.is_nan() && expected.is_nan())
}

fn shape_strategy(max_rank: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..5, 1..=max_rank)
}

/// A shape that broadcasts against `shape`: a suffix of it with some axes set to 1.
fn broadcast_partner(shape: &[usize], rng: &mut SplitMix64) -> Vec<usize> {
    let drop = rng.below(shape.len() as u64 + 1) as usize;
    shape[drop..]
        .iter()
        .map(|&d| if rng.below(3) == 0 { 1 } else { d })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn unary_ops(shape in shape_strategy(4), layout in 0u8..4, seed: u64, which in 0usize..7) {
        let op = UnaryOp::ALL[which];
        let mut rng = SplitMix64::new(seed);
        let gen: &dyn Fn(&mut SplitMix64) -> f32 = match op {
            UnaryOp::Rsqrt | UnaryOp::Sqrt => &positive,
            _ => &normal,
        };
        let x = make(&shape, layout, &mut rng, gen);
        let y = unary(op, &x).expect("runs");
        prop_assert_eq!(y.shape(), x.shape());
        for i in indices(&shape) {
            let want = op.apply(at(&x, &i));
            prop_assert!(close(at(&y, &i), want, 1e-5), "{} at {:?}: {} vs {}", op.name(), i, at(&y, &i), want);
        }
    }

    #[test]
    fn binary_ops_broadcast(shape in shape_strategy(4), la in 0u8..4, lb in 0u8..4, seed: u64, which in 0usize..5, swap: bool) {
        let op = BinaryOp::ALL[which];
        let mut rng = SplitMix64::new(seed);
        let partner = broadcast_partner(&shape, &mut rng);
        let gen: &dyn Fn(&mut SplitMix64) -> f32 = match op {
            BinaryOp::Pow | BinaryOp::Div => &positive,
            _ => &normal,
        };
        let (sa, sb) = if swap { (partner.clone(), shape.clone()) } else { (shape.clone(), partner.clone()) };
        let a = make(&sa, la, &mut rng, gen);
        let b = make(&sb, lb, &mut rng, gen);
        let y = binary(op, Arg::Tensor(&a), Arg::Tensor(&b)).expect("runs");
        prop_assert_eq!(y.shape(), shape.as_slice());
        let rank = shape.len();
        for i in indices(&shape) {
            let pick = |t: &Tensor| -> Vec<usize> {
                let pad = rank - t.rank();
                t.shape().iter().enumerate().map(|(k, &d)| if d == 1 { 0 } else { i[k + pad] }).collect()
            };
            let want = op.apply(at(&a, &pick(&a)), at(&b, &pick(&b)));
            prop_assert!(close(at(&y, &i), want, 1e-5), "{} at {:?}", op.name(), i);
        }
    }

    #[test]
    fn binary_ops_with_a_scalar(shape in shape_strategy(3), layout in 0u8..4, seed: u64, which in 0usize..5, exponent in prop::sample::select(vec![2.0f32, 3.0, 0.5, -0.5, -1.0, -2.0, 1.7])) {
        let op = BinaryOp::ALL[which];
        let mut rng = SplitMix64::new(seed);
        let x = make(&shape, layout, &mut rng, &positive);
        let s = if op == BinaryOp::Pow { exponent } else { rng.uniform(0.5, 2.0) as f32 };
        let y = binary(op, Arg::Tensor(&x), Arg::Scalar(s)).expect("runs");
        let z = binary(op, Arg::Scalar(s), Arg::Tensor(&x)).expect("runs");
        for i in indices(&shape) {
            prop_assert!(close(at(&y, &i), op.apply(at(&x, &i), f64::from(s)), 1e-5));
            prop_assert!(close(at(&z, &i), op.apply(f64::from(s), at(&x, &i)), 1e-5));
        }
    }

    #[test]
    fn casts_round_and_truncate(shape in shape_strategy(3), layout in 0u8..4, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let x = make(&shape, layout, &mut rng, &|r| (r.normal() * 100.0) as f32);
        let h = cast(&x, DType::F16).expect("runs");
        let b = cast(&x, DType::Bf16).expect("runs");
        let i32s = cast(&x, DType::I32).expect("runs");
        let back = cast(&i32s, DType::F32).expect("runs");
        prop_assert_eq!(h.dtype(), DType::F16);
        for i in indices(&shape) {
            let v = at(&x, &i) as f32;
            prop_assert_eq!(at(&h, &i), f64::from(half::f16::from_f32(v).to_f32()));
            prop_assert_eq!(at(&b, &i), f64::from(half::bf16::from_f32(v).to_f32()));
            prop_assert_eq!(at(&i32s, &i), f64::from(v).trunc());
            prop_assert_eq!(at(&back, &i), f64::from(v).trunc());
        }
    }

    #[test]
    fn reductions(shape in shape_strategy(4), layout in 0u8..4, seed: u64, axis_pick: usize, keepdim: bool, which in 0usize..3) {
        let kind = ReduceOp::ALL[which];
        let mut rng = SplitMix64::new(seed);
        let x = make(&shape, layout, &mut rng, &normal);
        let axis = axis_pick % shape.len();
        let y = reduce(kind, &x, axis, keepdim).expect("runs");
        for i in indices(&shape) {
            if i[axis] != 0 {
                continue;
            }
            let lane: Vec<f64> = (0..shape[axis]).map(|k| { let mut j = i.clone(); j[axis] = k; at(&x, &j) }).collect();
            let want = match kind {
                ReduceOp::Sum => lane.iter().sum(),
                ReduceOp::Mean => lane.iter().sum::<f64>() / lane.len() as f64,
                ReduceOp::Max => lane.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            };
            let mut out_i = i.clone();
            if !keepdim { out_i.remove(axis); }
            prop_assert!(close(at(&y, &out_i), want, 1e-5), "{} {:?}", kind.name(), i);
        }
    }

    #[test]
    fn argmax_ties_go_to_the_lowest_index(shape in shape_strategy(3), layout in 0u8..4, seed: u64, axis_pick: usize) {
        let mut rng = SplitMix64::new(seed);
        // Few distinct values, so that ties are common.
        let x = make(&shape, layout, &mut rng, &|r| r.below(3) as f32);
        let axis = axis_pick % shape.len();
        let y = argmax(&x, axis).expect("runs");
        prop_assert_eq!(y.dtype(), DType::I32);
        for i in indices(&shape) {
            if i[axis] != 0 { continue; }
            let lane: Vec<f64> = (0..shape[axis]).map(|k| { let mut j = i.clone(); j[axis] = k; at(&x, &j) }).collect();
            let max = lane.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let want = lane.iter().position(|&v| v == max).expect("non-empty");
            let mut out_i = i.clone();
            out_i.remove(axis);
            prop_assert_eq!(at(&y, &out_i), want as f64);
        }
    }

    #[test]
    fn softmax_normalizes(shape in shape_strategy(4), layout in 0u8..4, seed: u64, axis_pick: usize) {
        let mut rng = SplitMix64::new(seed);
        let x = make(&shape, layout, &mut rng, &|r| (r.normal() * 4.0) as f32);
        let axis = axis_pick % shape.len();
        let y = softmax(&x, axis).expect("runs");
        for i in indices(&shape) {
            let lane: Vec<f64> = (0..shape[axis]).map(|k| { let mut j = i.clone(); j[axis] = k; at(&x, &j) }).collect();
            let max = lane.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = lane.iter().map(|v| (v - max).exp()).sum();
            let want = (at(&x, &i) - max).exp() / sum;
            prop_assert!(close(at(&y, &i), want, 1e-5));
        }
    }

    #[test]
    fn matmul_with_broadcast_batches(batch in shape_strategy(2), m in 1usize..5, k in 1usize..7, n in 1usize..5, la in 0u8..4, lb in 0u8..3, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let b_batch = broadcast_partner(&batch, &mut rng);
        let mut sa = batch.clone();
        sa.extend([m, k]);
        let mut sb = b_batch.clone();
        sb.extend([k, n]);
        let a = make(&sa, la, &mut rng, &normal);
        // b laid out as [.., N, K] and transposed: the layout of a transposed K cache.
        let b = if lb == 1 {
            let mut st = b_batch.clone();
            st.extend([n, k]);
            let r = st.len();
            make(&st, 0, &mut rng, &normal).transpose(r - 2, r - 1).expect("in range")
        } else {
            make(&sb, lb, &mut rng, &normal)
        };
        let y = matmul(&a, &b).expect("runs");
        let mut out_shape = batch.clone();
        out_shape.extend([m, n]);
        prop_assert_eq!(y.shape(), out_shape.as_slice());
        let r = batch.len();
        for i in indices(&out_shape) {
            let pad = r - b_batch.len();
            let bi: Vec<usize> = b_batch.iter().enumerate().map(|(q, &d)| if d == 1 { 0 } else { i[q + pad] }).collect();
            let want: f64 = (0..k).map(|p| {
                let mut ai = i[..r].to_vec(); ai.extend([i[r], p]);
                let mut bj = bi.clone(); bj.extend([p, i[r + 1]]);
                at(&a, &ai) * at(&b, &bj)
            }).sum();
            prop_assert!(close(at(&y, &i), want, 1e-5), "{:?}", i);
        }
    }

    #[test]
    fn linear_is_x_times_w_transposed(rows in shape_strategy(2), ins in 1usize..20, outs in 1usize..9, layout in 0u8..3, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let mut sx = rows.clone();
        sx.push(ins);
        let x = make(&sx, layout, &mut rng, &normal);
        let w = make(&[outs, ins], 0, &mut rng, &normal);
        let y = linear(&x, &w).expect("runs");
        let mut out_shape = rows.clone();
        out_shape.push(outs);
        prop_assert_eq!(y.shape(), out_shape.as_slice());
        let r = rows.len();
        for i in indices(&out_shape) {
            let want: f64 = (0..ins).map(|p| {
                let mut xi = i[..r].to_vec(); xi.push(p);
                at(&x, &xi) * at(&w, &[i[r], p])
            }).sum();
            prop_assert!(close(at(&y, &i), want, 1e-5));
        }
    }

    #[test]
    fn embedding_gathers_rows(ids_shape in shape_strategy(2), vocab in 1usize..9, dim in 1usize..6, layout in 0u8..3, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let table = make(&[vocab, dim], layout, &mut rng, &normal);
        let n = ids_shape.iter().product();
        let ids: Vec<i32> = (0..n).map(|_| rng.below(vocab as u64) as i32).collect();
        let ids = Tensor::from_i32(&ids_shape, ids).expect("sizes match");
        let y = embedding(&table, &ids).expect("runs");
        for i in indices(y.shape()) {
            let id = at(&ids, &i[..i.len() - 1]) as usize;
            prop_assert_eq!(at(&y, &i), at(&table, &[id, i[i.len() - 1]]));
        }
        let bad = Tensor::from_i32(&[1], vec![vocab as i32]).expect("one id");
        prop_assert!(matches!(embedding(&table, &bad), Err(KernelError::TokenOutOfRange { .. })), "out-of-range id accepted");
    }

    #[test]
    fn cat_and_copy(shape in shape_strategy(4), axis_pick: usize, extra in 0usize..4, la in 0u8..4, lb in 0u8..4, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let axis = axis_pick % shape.len();
        let mut other = shape.clone();
        other[axis] = extra;
        let a = make(&shape, la, &mut rng, &normal);
        let b = make(&other, if extra == 0 { 0 } else { lb }, &mut rng, &normal);
        let y = cat(&[&a, &b], axis).expect("runs");
        prop_assert!(y.is_contiguous());
        for i in indices(y.shape()) {
            let want = if i[axis] < shape[axis] { at(&a, &i) } else {
                let mut j = i.clone(); j[axis] -= shape[axis]; at(&b, &j)
            };
            prop_assert_eq!(at(&y, &i), want);
        }
        let c = copy(&a).expect("runs");
        prop_assert!(c.is_contiguous());
        prop_assert_eq!(c.to_vec_f32(), a.to_vec_f32());
    }

    #[test]
    fn reshape_views_keep_row_major_order(shape in shape_strategy(4), layout in 0u8..4, seed: u64, split: usize) {
        let mut rng = SplitMix64::new(seed);
        let x = make(&shape, layout, &mut rng, &normal);
        // Flatten then split the flat axis in two: a view exactly when PyTorch's is.
        let n = x.numel();
        let divisors: Vec<usize> = (1..=n).filter(|d| n.is_multiple_of(*d)).collect();
        let d = divisors[split % divisors.len()];
        match x.reshape(&[d, n / d]) {
            Ok(v) => prop_assert_eq!(v.to_vec_f32(), x.to_vec_f32()),
            Err(_) => prop_assert!(!x.is_contiguous()),
        }
        if x.is_contiguous() {
            prop_assert!(x.reshape(&[n]).is_ok());
        }
    }
}

#[test]
fn half_precision_results_are_rounded() {
    let x = Tensor::from_f32(DType::Bf16, &[2], vec![1.0, 3.0]).expect("valid");
    let y = binary(BinaryOp::Div, Arg::Tensor(&x), Arg::Scalar(3.0)).expect("runs");
    assert_eq!(y.dtype(), DType::Bf16);
    assert_eq!(y.to_vec_f32()[0], half::bf16::from_f32(1.0 / 3.0).to_f32());
}

#[test]
fn kernels_reject_bad_operands() {
    let a = Tensor::zeros(DType::F32, &[2, 3]).expect("valid");
    let b = Tensor::zeros(DType::F32, &[4, 3]).expect("valid");
    assert!(binary(BinaryOp::Add, Arg::Tensor(&a), Arg::Tensor(&b)).is_err());
    assert!(matmul(&a, &b).is_err());
    assert!(linear(&a, &a.transpose(0, 1).expect("in range")).is_err());
    assert!(cat(&[&a, &b.transpose(0, 1).expect("in range")], 0).is_err());
    let ids = Tensor::zeros(DType::I32, &[2]).expect("valid");
    assert!(unary(UnaryOp::Exp, &ids).is_err());
    assert!(reduce(ReduceOp::Sum, &a, 2, false).is_err());
    assert!(embedding(&a, &ids.reshape(&[2, 1]).expect("viewable")).is_ok());
    assert!(embedding(&ids, &ids).is_err());
}

#[test]
fn casts_to_fp8_round_and_saturate() {
    let x = Tensor::from_f32(DType::F32, &[3], vec![0.3, -1e6, 1.0 + 1.0 / 16.0]).expect("valid");
    let q = cast(&x, DType::Fp8E4M3).expect("FP8 is supported");
    assert_eq!(q.dtype(), DType::Fp8E4M3);
    assert_eq!(q.to_vec_f32(), [0.3125, -448.0, 1.0]);
    assert_eq!(q.bytes(), 3);
}
