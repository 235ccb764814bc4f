//! Every stage handles every row of the op table: for each op kind's example graph
//! (`fusec_ir::op::example`), the cost model counts it, fusion carries it through the
//! e-graph, the CPU executor runs it, CUDA codegen emits it, the report classes it, and
//! precision lowering reads its roles. A stage that forgets an op fails here with the
//! op's name.

use std::collections::HashMap;

use fusec::codegen::{generate, DecodeShape, Options as CodegenOptions};
use fusec::exec::{Executor, Tensor, Weights};
use fusec::ir::op::{example, OpKind};
use fusec::ir::{cost, hardware, step, text, DType, Graph};
use fusec::rewrite::{fuse, precision, Limits, Options, RuleSet};

/// The step's bindings: batch 1, 3 cached positions.
fn bindings() -> fusec::ir::Bindings {
    step::bindings(1, 3)
}

fn example(kind: OpKind) -> Graph {
    example::graph(kind).unwrap_or_else(|e| panic!("{}: {e}", kind.info().name))
}

/// Inputs for every `input` and `state` leaf: zeros for ids, small values otherwise.
fn inputs(g: &Graph) -> HashMap<String, Tensor> {
    let b = bindings();
    let mut map = HashMap::new();
    for (id, name, _) in g.inputs() {
        let ty = g.ty(id).tensor().expect("tensor input");
        let shape: Vec<usize> = ty
            .shape
            .eval(&b)
            .expect("bound")
            .into_iter()
            .map(|d| d as usize)
            .collect();
        let n: usize = shape.iter().product();
        let t = if ty.dtype == DType::I32 {
            Tensor::from_i32(&shape, vec![0; n]).expect("ids")
        } else {
            let data = (0..n).map(|i| 0.25 + (i % 7) as f32 * 0.125).collect();
            Tensor::from_f32(ty.dtype, &shape, data).expect("values")
        };
        map.insert(name.to_string(), t);
    }
    map
}

fn has(g: &Graph, kind: OpKind) -> bool {
    g.node_ids().any(|id| g.op(id).kind() == kind)
}

#[test]
fn the_cost_model_counts_every_op() {
    for &kind in OpKind::ALL {
        let g = example(kind);
        let c = cost::graph_cost(&g, &bindings())
            .unwrap_or_else(|e| panic!("{}: {e}", kind.info().name));
        let counted = c.nodes.iter().any(|(id, _)| g.op(*id).kind() == kind);
        assert_eq!(
            counted,
            kind.info().launches(),
            "{}: launching ops and only those are kernels of the cost model",
            kind.info().name
        );
    }
}

#[test]
fn fusion_carries_every_op_through_the_egraph() {
    let rules = RuleSet::empty();
    let gpu = hardware::gpu("h100-sxm").expect("built in");
    let b = bindings();
    for &kind in OpKind::ALL {
        let g = example(kind);
        let opts = Options {
            rules: &rules,
            gpu,
            bindings: &b,
            limits: Limits::default(),
        };
        let (mut fused, _) =
            fuse(&g, &opts).unwrap_or_else(|e| panic!("{}: {e}", kind.info().name));
        // Fusion notes how saturation went on the graph line; the nodes are the test.
        fused.attrs.retain(|k, _| !k.starts_with("egraph."));
        assert_eq!(
            text::print(&fused).expect("prints"),
            text::print(&g).expect("prints"),
            "{}: with no rules, fusion gives the graph back",
            kind.info().name
        );
    }
}

#[test]
fn the_cpu_executor_runs_every_op() {
    for &kind in OpKind::ALL {
        let name = kind.info().name;
        let g = example(kind);
        let weights = Weights::random(&g, 7).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut exec = Executor::new(g.clone(), &weights).unwrap_or_else(|e| panic!("{name}: {e}"));
        let out = exec
            .run(&bindings(), inputs(&g))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let launched = out.stats.launches;
        let expected = cost::graph_cost(&g, &bindings())
            .expect("costs")
            .total
            .launches;
        assert_eq!(launched, expected, "{name}: measured launches");
        assert_eq!(out.outputs.len(), g.outputs().len(), "{name}: outputs");
    }
}

#[test]
fn codegen_emits_every_op() {
    for &kind in OpKind::ALL {
        let name = kind.info().name;
        let g = example(kind);
        let out = generate(&g, &DecodeShape::new(1, 16), &CodegenOptions::default());
        let out = out.unwrap_or_else(|e| panic!("{name}: {e}"));
        let launched = out.plan.launches.iter().any(|l| l.op.starts_with(name));
        assert_eq!(
            launched,
            kind.info().launches(),
            "{name}: a launch in the plan"
        );
    }
}

#[test]
fn the_report_and_precision_read_every_op() {
    for &kind in OpKind::ALL {
        let name = kind.info().name;
        let g = example(kind);
        for id in g.node_ids() {
            let op = g.op(id);
            assert_eq!(op.kernel_class().is_some(), op.launches_kernel(), "{name}");
            // Example weights carry no roles: precision leaves their GEMVs alone.
            assert_eq!(precision::classify(&g, id), None, "{name}");
        }
        assert!(has(&g, kind), "{name}: the example holds the op");
    }
}
