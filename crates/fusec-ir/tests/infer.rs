//! Shape and dtype inference of every op, and its errors.

use fusec_ir::op::{Attr, InputKind};
use fusec_ir::{BinaryOp, DType, Dim, Op, ReduceOp, Shape, TensorType, Type, UnaryOp, F64};

fn t(dtype: DType, dims: &[Dim]) -> Type {
    Type::Tensor(TensorType::new(dtype, Shape(dims.to_vec())))
}
fn f(n: u64) -> Dim {
    Dim::Fixed(n)
}
fn b() -> Dim {
    Dim::sym("B")
}
fn s() -> Dim {
    Dim::sym("S")
}
fn infer(op: Op, operands: &[&Type]) -> Result<Type, String> {
    op.infer(operands, None).map_err(|e| e.to_string())
}

#[test]
fn elementwise_and_broadcast() {
    let x = t(DType::F32, &[b(), f(1), f(64)]);
    let w = t(DType::F32, &[f(64)]);
    assert_eq!(infer(Op::Binary(BinaryOp::Mul), &[&w, &x]), Ok(x.clone()));
    assert_eq!(infer(Op::Unary(UnaryOp::Rsqrt), &[&x]), Ok(x.clone()));
    let scalar = t(DType::F32, &[]);
    let xb = t(DType::Bf16, &[b(), f(1), f(64)]);
    // A scalar takes the tensor's dtype, as a Python scalar does.
    assert_eq!(
        infer(Op::Binary(BinaryOp::Add), &[&xb, &scalar]),
        Ok(xb.clone())
    );
    assert!(infer(Op::Binary(BinaryOp::Add), &[&xb, &x])
        .unwrap_err()
        .contains("dtype mismatch"));
    let bad = t(DType::F32, &[f(63)]);
    assert!(infer(Op::Binary(BinaryOp::Add), &[&x, &bad])
        .unwrap_err()
        .contains("do not broadcast"));
    let ids = t(DType::I32, &[b(), f(1)]);
    assert!(infer(Op::Unary(UnaryOp::Exp), &[&ids]).is_err());
    assert_eq!(
        infer(Op::Cast { to: DType::F32 }, &[&ids]),
        Ok(t(DType::F32, &[b(), f(1)]))
    );
}

#[test]
fn reductions() {
    let x = t(DType::F32, &[b(), f(4), f(1), s().plus(1)]);
    let keep = Op::Reduce {
        kind: ReduceOp::Mean,
        axis: 3,
        keepdim: true,
    };
    assert_eq!(
        infer(keep, &[&x]),
        Ok(t(DType::F32, &[b(), f(4), f(1), f(1)]))
    );
    let drop = Op::Reduce {
        kind: ReduceOp::Max,
        axis: 1,
        keepdim: false,
    };
    assert_eq!(
        infer(drop, &[&x]),
        Ok(t(DType::F32, &[b(), f(1), s().plus(1)]))
    );
    assert_eq!(
        infer(Op::Argmax { axis: 3 }, &[&x]),
        Ok(t(DType::I32, &[b(), f(4), f(1)]))
    );
    assert_eq!(infer(Op::Softmax { axis: 3 }, &[&x]), Ok(x.clone()));
    assert!(infer(Op::Softmax { axis: 4 }, &[&x])
        .unwrap_err()
        .contains("axis 4 out of range"));
}

#[test]
fn contractions() {
    let q = t(DType::F32, &[b(), f(4), f(1), f(16)]);
    let kt = t(DType::F32, &[b(), f(4), f(16), s().plus(1)]);
    assert_eq!(
        infer(Op::MatMul, &[&q, &kt]),
        Ok(t(DType::F32, &[b(), f(4), f(1), s().plus(1)]))
    );
    assert!(infer(Op::MatMul, &[&kt, &kt])
        .unwrap_err()
        .contains("contracted dimensions differ"));
    let x = t(DType::F32, &[b(), f(1), f(64)]);
    let w = t(DType::F32, &[f(176), f(64)]);
    assert_eq!(
        infer(Op::Linear, &[&x, &w]),
        Ok(t(DType::F32, &[b(), f(1), f(176)]))
    );
    assert!(infer(Op::Linear, &[&x, &t(DType::F32, &[f(64), f(176)])])
        .unwrap_err()
        .contains("input features differ"));
    let table = t(DType::Bf16, &[f(256), f(64)]);
    let ids = t(DType::I32, &[b(), f(1)]);
    assert_eq!(
        infer(Op::Embedding, &[&table, &ids]),
        Ok(t(DType::Bf16, &[b(), f(1), f(64)]))
    );
    assert!(infer(Op::Embedding, &[&table, &x])
        .unwrap_err()
        .contains("must be i32"));
}

#[test]
fn cat_adds_symbolic_lengths() {
    let past = t(DType::F32, &[b(), f(2), s(), f(16)]);
    let new = t(DType::F32, &[b(), f(2), f(1), f(16)]);
    assert_eq!(
        infer(Op::Cat { axis: 2 }, &[&past, &new]),
        Ok(t(DType::F32, &[b(), f(2), s().plus(1), f(16)]))
    );
    assert!(infer(Op::Cat { axis: 2 }, &[&past, &past])
        .unwrap_err()
        .contains("two symbolic dimensions"));
    assert!(infer(Op::Cat { axis: 1 }, &[&past, &new])
        .unwrap_err()
        .contains("dimension 2 differs"));
    assert!(infer(Op::Cat { axis: 2 }, &[&past])
        .unwrap_err()
        .contains("at least 2"));
}

#[test]
fn views() {
    let x = t(DType::F32, &[b(), f(1), f(64)]);
    let r = Op::Reshape {
        shape: Shape(vec![b(), f(1), f(4), f(16)]),
    };
    assert_eq!(
        infer(r, &[&x]),
        Ok(t(DType::F32, &[b(), f(1), f(4), f(16)]))
    );
    let bad = Op::Reshape {
        shape: Shape(vec![b(), f(65)]),
    };
    assert!(infer(bad, &[&x])
        .unwrap_err()
        .contains("element counts differ"));
    assert_eq!(
        infer(Op::Transpose { a: 0, b: 2 }, &[&x]),
        Ok(t(DType::F32, &[f(64), f(1), b()]))
    );
    let sl = Op::Slice {
        axis: 2,
        start: 8,
        end: 16,
    };
    assert_eq!(infer(sl, &[&x]), Ok(t(DType::F32, &[b(), f(1), f(8)])));
    let oob = Op::Slice {
        axis: 2,
        start: 8,
        end: 65,
    };
    assert!(infer(oob, &[&x]).unwrap_err().contains("out of 0..64"));
    let symbolic = Op::Slice {
        axis: 0,
        start: 0,
        end: 1,
    };
    assert!(infer(symbolic, &[&x]).unwrap_err().contains("symbolic"));
    assert_eq!(
        infer(Op::Unsqueeze { axis: 3 }, &[&x]),
        Ok(t(DType::F32, &[b(), f(1), f(64), f(1)]))
    );
    let e = Op::Expand {
        shape: Shape(vec![b(), f(3), f(64)]),
    };
    assert_eq!(infer(e, &[&x]), Ok(t(DType::F32, &[b(), f(3), f(64)])));
    let e = Op::Expand {
        shape: Shape(vec![b(), f(1), f(128)]),
    };
    assert!(infer(e, &[&x])
        .unwrap_err()
        .contains("only size-1 dimensions expand"));
}

#[test]
fn leaves_and_tuples() {
    let ty = t(DType::F32, &[f(4)]);
    let w = Op::Weight { name: "w".into() };
    assert_eq!(w.infer(&[], Some(&ty)), Ok(ty.clone()));
    assert!(w.infer(&[], None).is_err());
    let i = Op::Input {
        name: "x".into(),
        kind: InputKind::Data,
    };
    assert_eq!(i.infer(&[], Some(&ty)), Ok(ty.clone()));
    assert_eq!(
        infer(
            Op::RopeInvFreq {
                theta: F64(1e4),
                head_dim: 16
            },
            &[]
        ),
        Ok(t(DType::F32, &[f(8)]))
    );
    let tuple = Type::Tuple(vec![
        TensorType::new(DType::F32, Shape::fixed(&[2])),
        TensorType::new(DType::I32, Shape::fixed(&[3])),
    ]);
    assert_eq!(
        infer(Op::Get { index: 1 }, &[&tuple]),
        Ok(t(DType::I32, &[f(3)]))
    );
    assert!(infer(Op::Get { index: 2 }, &[&tuple]).is_err());
    assert!(infer(Op::Unary(UnaryOp::Neg), &[&tuple])
        .unwrap_err()
        .contains("tuple"));
}

#[test]
fn op_tokens_round_trip() {
    let ops = [
        Op::Reduce {
            kind: ReduceOp::Mean,
            axis: 2,
            keepdim: true,
        },
        Op::Reshape {
            shape: Shape(vec![b(), f(1), s().plus(1)]),
        },
        Op::Scalar { value: F64(1e-5) },
        Op::Weight {
            name: "model.layers.0.mlp.up_proj.weight".into(),
        },
        Op::Input {
            name: "past.0.key".into(),
            kind: InputKind::State,
        },
        Op::Cast { to: DType::Fp8E4M3 },
        Op::Slice {
            axis: 3,
            start: 0,
            end: 8,
        },
    ];
    for op in ops {
        let token = op.to_string();
        assert_eq!(token.parse::<Op>(), Ok(op), "{token}");
    }
    assert_eq!(
        "reduce.mean{axis=2,keepdim=true}"
            .parse::<Op>()
            .map(|o| o.attrs()),
        Ok(vec![("axis", Attr::Int(2)), ("keepdim", Attr::Bool(true))])
    );
    for (bad, why) in [
        ("reduce.mean{axis=2}", "needs attribute `keepdim`"),
        ("unary.neg{axis=2}", "has no attribute `axis`"),
        ("frobnicate", "unknown op"),
        ("linear@w", "only `weight` takes an @name"),
        ("cast{to=f64}", "not an attribute value"),
    ] {
        let e = bad.parse::<Op>().unwrap_err();
        assert!(e.message.contains(why), "{bad}: {}", e.message);
    }
}
