//! Code generation errors on graphs built from the IR alone: a symbol the decode
//! shape does not bind, and options or shapes the kernels cannot be built for.

use fusec_codegen::{generate, DecodeShape, Error, Options};
use fusec_ir::{DType, Dim, Graph, InputKind, Op, OutputKind, Shape, TensorType};

fn graph_with_symbol(sym: &str) -> Graph {
    let mut g = Graph::new("t");
    let t = TensorType::new(DType::F32, Shape::new([Dim::sym(sym), Dim::Fixed(4)]));
    let x = g
        .add_leaf(
            Op::Input {
                name: "x".into(),
                kind: InputKind::Data,
            },
            t,
        )
        .expect("leaf");
    let y = g.add(Op::Unary(fusec_ir::UnaryOp::Exp), &[x]).expect("exp");
    g.add_output("y", OutputKind::Data, y);
    g
}

#[test]
fn unknown_symbols_and_bad_options_are_errors() {
    let shape = DecodeShape::new(1, 16);
    assert_eq!(
        generate(&graph_with_symbol("X"), &shape, &Options::default()),
        Err(Error::UnknownSymbol("X".into()))
    );
    assert!(generate(&graph_with_symbol("B"), &shape, &Options::default()).is_ok());
    let bad = Options {
        block_size: 100,
        ..Options::default()
    };
    assert!(matches!(
        generate(&graph_with_symbol("B"), &shape, &bad),
        Err(Error::Options(_))
    ));
    assert!(matches!(
        generate(
            &graph_with_symbol("B"),
            &DecodeShape::new(0, 16),
            &Options::default()
        ),
        Err(Error::Options(_))
    ));
}
