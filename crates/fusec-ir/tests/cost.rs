//! The cost model on a graph small enough to count by hand: bytes read and written,
//! FLOPs and launches per node, the floor, and the roofline time on a GPU.

use fusec_ir::cost::{estimate_seconds, graph_cost};
use fusec_ir::hardware::gpu;
use fusec_ir::shape::Bindings;
use fusec_ir::text::parse;

/// Granite's scaled residual, eager: `y = r + (x W^T) * 0.22` at batch 2.
const GRAPH: &str = r#"graph "scaled-residual" {
  %0 = input{name="x"} : bf16[B,1,16]
  %1 = input{name="r"} : bf16[B,1,8]
  %2 = weight@o : bf16[8,16]
  %3 = linear(%0, %2) : bf16[B,1,8]
  %4 = scalar{value=0.22} : f32[]
  %5 = binary.mul(%3, %4) : bf16[B,1,8]
  %6 = binary.add(%1, %5) : bf16[B,1,8]
  output "y" = %6
}
"#;

#[test]
fn a_small_graph_costs_what_is_counted_by_hand() {
    let g = parse(GRAPH).expect("parses");
    let b = Bindings::new().with("B", 2);
    let c = graph_cost(&g, &b).expect("costs");
    let per_node: Vec<(u64, u64, u64, u64)> = c
        .nodes
        .iter()
        .map(|(_, k)| (k.launches, k.bytes_read, k.bytes_written, k.flops))
        .collect();
    assert_eq!(
        per_node,
        vec![
            // linear: x 2*16 bf16 (64 B) and W 8*16 bf16 (256 B) read, 2*8 bf16 (32 B)
            // written; 2 FLOPs per weight element per row: 2 * 2 * 8 * 16 = 512.
            (1, 64 + 256, 32, 512),
            // mul by a scalar constant (baked into the kernel: nothing read for it):
            // 32 B in, 32 B out, one FLOP per element.
            (1, 32, 32, 16),
            // add: r and the product read (64 B), 32 B written, 16 FLOPs.
            (1, 64, 32, 16),
        ]
    );
    assert_eq!(c.total.launches, 3);
    assert_eq!(c.total.bytes_read, 320 + 32 + 64);
    assert_eq!(c.total.bytes_written, 96);
    assert_eq!(c.total.flops, 544);
    // The floor: the weight once (256 B) plus the inputs and the output (64 + 32 + 32).
    assert_eq!(c.floor.weight_bytes, 256);
    assert_eq!(c.floor.total(), 256 + 64 + 32 + 32);

    // The roofline on an H100 SXM: 1.3 us per launch plus, per kernel, the larger of
    // bytes / bandwidth and FLOPs / peak; at these sizes the bytes win everywhere.
    let h100 = gpu("h100-sxm").expect("built in");
    let bw = h100.bandwidth_gbs() * 1e9;
    let want = 3.0 * 1.3e-6 + (352.0 + 64.0 + 96.0) / bw;
    let got = estimate_seconds(&g, &c, h100);
    assert!((got - want).abs() < 1e-15, "{got} against {want}");
}

/// A paged step's lengths: per row where bound, else every row's `L`, each capped by
/// the table's reach and a window.
#[test]
fn paged_positions_come_from_the_bound_lengths() {
    use fusec_ir::step::{self, paged_bindings, paged_positions};
    let b = paged_bindings(&[3, 20, 0], 4, 30);
    assert_eq!(b.get(step::BATCH), Some(3));
    assert_eq!(b.get(step::MAX_BLOCKS), Some(8));
    // 1 + 5 + 1 blocks: a length of 0 is the row's new entry.
    assert_eq!(b.get(step::POOL_BLOCKS), Some(7));
    assert_eq!(paged_positions(&b, 3, 32, None), Some(3 + 20 + 1));
    assert_eq!(paged_positions(&b, 3, 32, Some(8)), Some(3 + 8 + 1));
    assert_eq!(paged_positions(&b, 3, 16, None), Some(3 + 16 + 1));
    // Every row's length, and none bound.
    let uniform = step::bindings(2, 15);
    assert_eq!(paged_positions(&uniform, 2, 64, None), Some(2 * 16));
    assert_eq!(paged_positions(&uniform, 2, 64, Some(4)), Some(2 * 4));
    assert_eq!(
        paged_positions(&fusec_ir::Bindings::new(), 2, 64, None),
        None
    );
    // A row without its own length takes `L`, and without `L` the lengths are unknown.
    let some = fusec_ir::Bindings::new().with(&step::seq_len(0), 5);
    assert_eq!(paged_positions(&some, 2, 64, None), None);
    assert_eq!(
        paged_positions(&some.with(step::SEQ_LEN, 7), 2, 64, None),
        Some(5 + 7)
    );
}

/// CUDA launches a paged attention as two kernels; every other launching op as one.
#[test]
fn cuda_launches_per_op() {
    use fusec_ir::{FusedOp, Op};
    assert_eq!(Op::Fused(FusedOp::PagedAttention).cuda_launches(), 2);
    assert_eq!(Op::Fused(FusedOp::PagedDecodeAttention).cuda_launches(), 2);
    assert_eq!(Op::Fused(FusedOp::DecodeAttention).cuda_launches(), 1);
    assert_eq!(Op::Copy.cuda_launches(), 1);
}
