//! Each verifier error, provoked on a small graph, and every violation reported.

use fusec_ir::graph::OutputKind;
use fusec_ir::op::InputKind;
use fusec_ir::{verify, BinaryOp, DType, Graph, Op, Shape, TensorType, Type, VerifyError};

/// The first violation `verify` reports.
fn first(g: &Graph) -> Result<(), VerifyError> {
    verify(g).map_err(|v| v.first().clone())
}

fn tt(dims: &[u64]) -> TensorType {
    TensorType::new(DType::F32, Shape::fixed(dims))
}

fn input(g: &mut Graph, name: &str, kind: InputKind, dims: &[u64]) -> fusec_ir::NodeId {
    g.add_leaf(
        Op::Input {
            name: name.into(),
            kind,
        },
        tt(dims),
    )
    .expect("leaf types")
}

#[test]
fn a_well_formed_graph_verifies() {
    let mut g = Graph::new("ok");
    let x = input(&mut g, "x", InputKind::Data, &[4]);
    let st = input(&mut g, "s", InputKind::State, &[4]);
    let y = g.add(Op::Binary(BinaryOp::Add), &[x, st]).expect("types");
    g.add_output("y", OutputKind::Data, y);
    g.add_output("s", OutputKind::State, y);
    assert_eq!(first(&g), Ok(()));
}

#[test]
fn type_mismatch() {
    let mut g = Graph::new("t");
    let x = input(&mut g, "x", InputKind::Data, &[4]);
    let y = g.add_typed(
        Op::Unary(fusec_ir::UnaryOp::Neg),
        &[x],
        Type::Tensor(tt(&[5])),
    );
    g.add_output("y", OutputKind::Data, y);
    assert!(matches!(
        first(&g),
        Err(VerifyError::TypeMismatch { value: 1, .. })
    ));
}

#[test]
fn ill_typed_operands() {
    let mut g = Graph::new("t");
    let x = input(&mut g, "x", InputKind::Data, &[4]);
    let z = input(&mut g, "z", InputKind::Data, &[5]);
    let y = g.add_typed(Op::Binary(BinaryOp::Add), &[x, z], Type::Tensor(tt(&[4])));
    g.add_output("y", OutputKind::Data, y);
    let e = first(&g).unwrap_err();
    assert!(e.to_string().contains("do not broadcast"), "{e}");
}

#[test]
fn wrong_arity() {
    let mut g = Graph::new("t");
    let x = input(&mut g, "x", InputKind::Data, &[4]);
    let y = g.add_typed(Op::Binary(BinaryOp::Add), &[x], Type::Tensor(tt(&[4])));
    g.add_output("y", OutputKind::Data, y);
    let e = first(&g).unwrap_err();
    assert!(e.to_string().contains("takes 2 operand(s), got 1"), "{e}");
}

#[test]
fn cycle() {
    let mut g = Graph::new("t");
    let x = input(&mut g, "x", InputKind::Data, &[4]);
    let a = g
        .add(Op::Unary(fusec_ir::UnaryOp::Neg), &[x])
        .expect("types");
    let b = g
        .add(Op::Unary(fusec_ir::UnaryOp::Neg), &[a])
        .expect("types");
    // Rewire a's operand to b: a -> b -> a.
    g.replace_all_uses(x, b);
    g.add_output("y", OutputKind::Data, b);
    assert_eq!(first(&g), Err(VerifyError::Cycle));
}

#[test]
fn duplicate_names() {
    let mut g = Graph::new("t");
    let w1 = g
        .add_leaf(Op::Weight { name: "w".into() }, tt(&[4]))
        .expect("leaf");
    let w2 = g
        .add_leaf(Op::Weight { name: "w".into() }, tt(&[4]))
        .expect("leaf");
    let y = g.add(Op::Binary(BinaryOp::Add), &[w1, w2]).expect("types");
    g.add_output("y", OutputKind::Data, y);
    assert_eq!(first(&g), Err(VerifyError::DuplicateWeight("w".into())));

    let mut g = Graph::new("t");
    let a = input(&mut g, "x", InputKind::Data, &[4]);
    let b = input(&mut g, "x", InputKind::Data, &[4]);
    let y = g.add(Op::Binary(BinaryOp::Add), &[a, b]).expect("types");
    g.add_output("y", OutputKind::Data, y);
    assert_eq!(first(&g), Err(VerifyError::DuplicateInput("x".into())));

    let mut g = Graph::new("t");
    let a = input(&mut g, "x", InputKind::Data, &[4]);
    g.add_output("y", OutputKind::Data, a);
    g.add_output("y", OutputKind::Data, a);
    assert_eq!(first(&g), Err(VerifyError::DuplicateOutput("y".into())));

    let mut g = Graph::new("t");
    let a = g
        .add_leaf(
            Op::Weight {
                name: String::new(),
            },
            tt(&[4]),
        )
        .expect("leaf");
    g.add_output("y", OutputKind::Data, a);
    assert_eq!(first(&g), Err(VerifyError::EmptyName("weight")));
}

#[test]
fn state_pairs() {
    let mut g = Graph::new("t");
    let s = input(&mut g, "s", InputKind::State, &[4]);
    g.add_output("y", OutputKind::Data, s);
    assert_eq!(first(&g), Err(VerifyError::StateWithoutOutput("s".into())));

    let mut g = Graph::new("t");
    let x = input(&mut g, "x", InputKind::Data, &[4]);
    g.add_output("s", OutputKind::State, x);
    assert_eq!(first(&g), Err(VerifyError::StateWithoutInput("s".into())));

    let mut g = Graph::new("t");
    let s = input(&mut g, "s", InputKind::State, &[4]);
    let c = g.add(Op::Cast { to: DType::I32 }, &[s]).expect("types");
    g.add_output("s", OutputKind::State, c);
    assert!(matches!(
        first(&g),
        Err(VerifyError::StateTypeMismatch { .. })
    ));
}

#[test]
fn tuples_only_through_get() {
    let mut g = Graph::new("t");
    let x = input(&mut g, "x", InputKind::Data, &[4]);
    let tup = g.add_typed(Op::Copy, &[x], Type::Tuple(vec![tt(&[4]), tt(&[4])]));
    g.add_output("y", OutputKind::Data, tup);
    // Copy of a tensor infers a tensor, not the declared tuple.
    assert!(matches!(first(&g), Err(VerifyError::TypeMismatch { .. })));
}

#[test]
fn every_violation_is_reported_one_per_line() {
    // A declared type that is not the inferred one, and a state input never written.
    let mut g = Graph::new("t");
    let x = input(&mut g, "x", InputKind::Data, &[4]);
    let y = g.add_typed(
        Op::Unary(fusec_ir::UnaryOp::Neg),
        &[x],
        Type::Tensor(tt(&[5])),
    );
    input(&mut g, "s", InputKind::State, &[4]);
    g.add_output("y", OutputKind::Data, y);
    let v = verify(&g).unwrap_err();
    assert_eq!(v.len(), 2, "{v}");
    let all = v.clone().into_vec();
    assert!(
        matches!(all[0], VerifyError::TypeMismatch { value: 1, .. }),
        "{all:?}"
    );
    assert_eq!(all[1], VerifyError::StateWithoutOutput("s".into()));
    let text = v.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], all[0].to_string());
    assert_eq!(
        lines[1],
        "state input `s` has no state output of the same name"
    );
}
