//! The op table is consistent: every row's name is unique and parses back, its operand
//! roles match its arity, its attribute keys are the ones its ops print, and its
//! example graph is well typed and contains it.

use std::collections::HashSet;

use fusec_ir::op::{example, op_names, Arity, Execution, OpKind, OperandRole};
use fusec_ir::{text, verify, Op};

/// The op of kind `kind` in its example graph.
fn example_op(kind: OpKind) -> Op {
    let g = example::graph(kind).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    let ops: Vec<Op> = g
        .node_ids()
        .map(|id| g.op(id).clone())
        .filter(|op| op.kind() == kind)
        .collect();
    assert!(
        !ops.is_empty(),
        "{kind:?}: the example graph has no such op"
    );
    ops[0].clone()
}

#[test]
fn names_are_unique_and_parse_back() {
    let mut seen = HashSet::new();
    for name in op_names() {
        assert!(seen.insert(name), "`{name}` names two rows");
    }
    for &kind in OpKind::ALL {
        let op = example_op(kind);
        assert_eq!(op.name(), kind.info().name);
        let token = op.to_string();
        let back: Op = token
            .parse()
            .unwrap_or_else(|e| panic!("{kind:?}: `{token}` does not parse back: {e}"));
        assert_eq!(back, op, "{kind:?}: `{token}`");
        assert_eq!(fusec_ir::op::kind_named(kind.info().name), Some(kind));
    }
}

#[test]
fn roles_match_arity() {
    for &kind in OpKind::ALL {
        let info = kind.info();
        match info.arity {
            Arity::Exactly(n) => {
                assert!(
                    info.rest.is_none(),
                    "{kind:?}: fixed arity with a rest role"
                );
                assert_eq!(info.operands.len(), n, "{kind:?}: roles vs arity {n}");
            }
            Arity::AtLeast(n) => {
                assert!(
                    info.rest.is_some(),
                    "{kind:?}: variable arity needs a rest role"
                );
                assert!(
                    info.operands.len() <= n,
                    "{kind:?}: more roles than arity {n}"
                );
            }
        }
        assert_eq!(
            info.arity == Arity::Exactly(0),
            info.execution == Execution::Leaf,
            "{kind:?}: leaves and only leaves take no operands"
        );
        // A cache appended in place names a result of the op, once.
        let results: Vec<usize> = info
            .operands
            .iter()
            .filter_map(|r| match r {
                OperandRole::Cache { result, .. } => Some(*result),
                _ => None,
            })
            .collect();
        let distinct: HashSet<usize> = results.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            results.len(),
            "{kind:?}: two caches, one result"
        );
    }
}

#[test]
fn attribute_keys_are_the_printed_ones() {
    for &kind in OpKind::ALL {
        let op = example_op(kind);
        let keys: Vec<&str> = op.attrs().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, kind.info().attrs, "{kind:?}");
    }
}

#[test]
fn examples_verify_and_round_trip() {
    for &kind in OpKind::ALL {
        let g = example::graph(kind).expect("example builds");
        verify(&g).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        let printed = text::print(&g).expect("prints");
        let again = text::print(&text::parse(&printed).expect("parses")).expect("prints");
        assert_eq!(printed, again, "{kind:?}");
    }
}

#[test]
fn views_leaves_and_folded_ops_launch_nothing() {
    for &kind in OpKind::ALL {
        let op = example_op(kind);
        let launches = matches!(kind.info().execution, Execution::Kernel(_));
        assert_eq!(op.launches_kernel(), launches, "{kind:?}");
        assert_eq!(op.kernel_class().is_some(), launches, "{kind:?}");
        assert_eq!(op.is_view(), kind.info().execution == Execution::View);
        assert_eq!(op.is_leaf(), kind.info().execution == Execution::Leaf);
    }
}
