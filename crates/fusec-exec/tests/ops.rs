//! Each primitive kernel against a plain `f64` reference on random shapes and layouts
//! (contiguous, transposed, sliced and broadcast views). The references are written
//! with `ndarray` over the operands' own views ([`Tensor::view_f32`]), so they share
//! neither the kernels' code nor their strided walks.

use fusec_exec::kernels::elementwise::{binary, cast, unary, Arg};
use fusec_exec::kernels::gather::embedding;
use fusec_exec::kernels::matmul::{linear, matmul};
use fusec_exec::kernels::movement::{cat, copy};
use fusec_exec::kernels::reduce::{argmax, reduce, softmax};
use fusec_exec::ndarray::{concatenate, Array3, ArrayD, Axis, IxDyn, Zip};
use fusec_exec::{KernelError, SplitMix64, Tensor};
use fusec_ir::{BinaryOp, DType, ReduceOp, UnaryOp};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// A tensor's values as an `f64` array, read through its view.
fn arr(t: &Tensor) -> ArrayD<f64> {
    match (t.view_f32(), t.view_i32()) {
        (Some(v), _) => v.mapv(f64::from),
        (None, Some(v)) => v.mapv(f64::from),
        (None, None) => panic!("a test tensor holds f32 or i32 values"),
    }
}

/// Whether `actual` has `want`'s shape and every value within `tol` (relative, with an
/// absolute floor) of it; `tol = 0` asks for equal values.
fn check(actual: &Tensor, want: &ArrayD<f64>, tol: f64) -> Result<(), TestCaseError> {
    let got = arr(actual);
    prop_assert_eq!(got.shape(), want.shape());
    for ((i, &g), &w) in got.indexed_iter().zip(want.iter()) {
        prop_assert!(close(g, w, tol), "at {:?}: {} against {}", i, g, w);
    }
    Ok(())
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
        || actual == expected
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
        check(&y, &arr(&x).mapv(|v| op.apply(v)), 1e-5)?;
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
        let (xa, xb) = (arr(&a), arr(&b));
        let to = IxDyn(&shape);
        let want = Zip::from(&xa.broadcast(to.clone()).expect("broadcasts"))
            .and(&xb.broadcast(to).expect("broadcasts"))
            .map_collect(|&u, &v| op.apply(u, v));
        check(&y, &want, 1e-5)?;
    }

    #[test]
    fn binary_ops_with_a_scalar(shape in shape_strategy(3), layout in 0u8..4, seed: u64, which in 0usize..5, exponent in prop::sample::select(vec![2.0f32, 3.0, 0.5, -0.5, -1.0, -2.0, 1.7])) {
        let op = BinaryOp::ALL[which];
        let mut rng = SplitMix64::new(seed);
        let x = make(&shape, layout, &mut rng, &positive);
        let s = if op == BinaryOp::Pow { exponent } else { rng.uniform(0.5, 2.0) as f32 };
        let y = binary(op, Arg::Tensor(&x), Arg::Scalar(s)).expect("runs");
        let z = binary(op, Arg::Scalar(s), Arg::Tensor(&x)).expect("runs");
        let (xs, s) = (arr(&x), f64::from(s));
        check(&y, &xs.mapv(|v| op.apply(v, s)), 1e-5)?;
        check(&z, &xs.mapv(|v| op.apply(s, v)), 1e-5)?;
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
        let xs = arr(&x);
        check(&h, &xs.mapv(|v| f64::from(half::f16::from_f32(v as f32).to_f32())), 0.0)?;
        check(&b, &xs.mapv(|v| f64::from(half::bf16::from_f32(v as f32).to_f32())), 0.0)?;
        check(&i32s, &xs.mapv(f64::trunc), 0.0)?;
        check(&back, &xs.mapv(f64::trunc), 0.0)?;
    }

    #[test]
    fn reductions(shape in shape_strategy(4), layout in 0u8..4, seed: u64, axis_pick: usize, keepdim: bool, which in 0usize..3) {
        let kind = ReduceOp::ALL[which];
        let mut rng = SplitMix64::new(seed);
        let x = make(&shape, layout, &mut rng, &normal);
        let axis = Axis(axis_pick % shape.len());
        let y = reduce(kind, &x, axis.index(), keepdim).expect("runs");
        let xs = arr(&x);
        let want = match kind {
            ReduceOp::Sum => xs.sum_axis(axis),
            ReduceOp::Mean => xs.sum_axis(axis) / xs.len_of(axis) as f64,
            ReduceOp::Max => xs.fold_axis(axis, f64::NEG_INFINITY, |m, &v| m.max(v)),
        };
        let want = if keepdim { want.insert_axis(axis) } else { want };
        check(&y, &want, 1e-5)?;
    }

    #[test]
    fn argmax_ties_go_to_the_lowest_index(shape in shape_strategy(3), layout in 0u8..4, seed: u64, axis_pick: usize) {
        let mut rng = SplitMix64::new(seed);
        // Few distinct values, so that ties are common.
        let x = make(&shape, layout, &mut rng, &|r| r.below(3) as f32);
        let axis = Axis(axis_pick % shape.len());
        let y = argmax(&x, axis.index()).expect("runs");
        prop_assert_eq!(y.dtype(), DType::I32);
        let want = arr(&x).map_axis(axis, |lane| {
            let max = lane.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            lane.iter().position(|&v| v == max).expect("non-empty") as f64
        });
        check(&y, &want, 0.0)?;
    }

    #[test]
    fn softmax_normalizes(shape in shape_strategy(4), layout in 0u8..4, seed: u64, axis_pick: usize) {
        let mut rng = SplitMix64::new(seed);
        let x = make(&shape, layout, &mut rng, &|r| (r.normal() * 4.0) as f32);
        let axis = Axis(axis_pick % shape.len());
        let y = softmax(&x, axis.index()).expect("runs");
        let xs = arr(&x);
        let max = xs.fold_axis(axis, f64::NEG_INFINITY, |m, &v| m.max(v)).insert_axis(axis);
        let e = (&xs - &max).mapv(f64::exp);
        let want = &e / &e.sum_axis(axis).insert_axis(axis);
        check(&y, &want, 1e-5)?;
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
        // The batch axes broadcast, then one 2-D product per batch entry.
        let batches: usize = batch.iter().product();
        let stacked = |t: &Tensor, rows: usize, cols: usize| -> Array3<f64> {
            let mut to = batch.clone();
            to.extend([rows, cols]);
            let full = arr(t)
                .broadcast(IxDyn(&to))
                .expect("broadcasts")
                .as_standard_layout()
                .into_owned();
            full.into_shape_with_order((batches, rows, cols)).expect("same size")
        };
        let (xa, xb) = (stacked(&a, m, k), stacked(&b, k, n));
        let mut want = Array3::<f64>::zeros((batches, m, n));
        for (i, mut out) in want.outer_iter_mut().enumerate() {
            out.assign(&xa.index_axis(Axis(0), i).dot(&xb.index_axis(Axis(0), i)));
        }
        let mut out_shape = batch.clone();
        out_shape.extend([m, n]);
        let want = want.into_shape_with_order(IxDyn(&out_shape)).expect("same size");
        check(&y, &want, 1e-5)?;
    }

    #[test]
    fn linear_is_x_times_w_transposed(rows in shape_strategy(2), ins in 1usize..20, outs in 1usize..9, layout in 0u8..3, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let mut sx = rows.clone();
        sx.push(ins);
        let x = make(&sx, layout, &mut rng, &normal);
        let w = make(&[outs, ins], 0, &mut rng, &normal);
        let y = linear(&x, &w).expect("runs");
        let n: usize = rows.iter().product();
        let xs = arr(&x).as_standard_layout().into_owned().into_shape_with_order((n, ins)).expect("same size");
        let ws = arr(&w)
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((outs, ins))
            .expect("a matrix");
        let mut out_shape = rows.clone();
        out_shape.push(outs);
        let want = xs.dot(&ws.t()).as_standard_layout().into_owned();
        let want = want.into_shape_with_order(IxDyn(&out_shape)).expect("same size");
        check(&y, &want, 1e-5)?;
    }

    #[test]
    fn embedding_gathers_rows(ids_shape in shape_strategy(2), vocab in 1usize..9, dim in 1usize..6, layout in 0u8..3, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let table = make(&[vocab, dim], layout, &mut rng, &normal);
        let n = ids_shape.iter().product();
        let ids: Vec<i32> = (0..n).map(|_| rng.below(vocab as u64) as i32).collect();
        let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        let ids = Tensor::from_i32(&ids_shape, ids).expect("sizes match");
        let y = embedding(&table, &ids).expect("runs");
        let mut out_shape = ids_shape.clone();
        out_shape.push(dim);
        let want = arr(&table)
            .select(Axis(0), &rows)
            .into_shape_with_order(IxDyn(&out_shape))
            .expect("same size");
        check(&y, &want, 0.0)?;
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
        let want = concatenate(Axis(axis), &[arr(&a).view(), arr(&b).view()]).expect("shapes agree");
        check(&y, &want, 0.0)?;
        let c = copy(&a).expect("runs");
        prop_assert!(c.is_contiguous());
        check(&c, &arr(&a), 0.0)?;
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
