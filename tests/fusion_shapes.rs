//! Fusion over random Llama shapes: every fused graph verifies, round-trips through its
//! text form, runs five kernels per layer, and never moves more bytes or launches more
//! kernels than the eager graph. (Numerical agreement of eager and fused graphs on
//! random configs is tested in fusec-exec.)

mod common;

use fusec::pipeline;
use fusec_ir::cost::graph_cost;
use fusec_ir::{text, verify, DType};
use proptest::prelude::*;

fn config() -> impl Strategy<Value = (u64, u64, u64, u64, u64, bool, bool, u64, u64)> {
    (
        1u64..=3,                                 // layers
        prop::sample::select(vec![1u64, 2, 4]),   // kv heads
        1u64..=3,                                 // query heads per kv head
        prop::sample::select(vec![8u64, 16, 20]), // head_dim
        1u64..=3,                                 // intermediate multiple of 16
        any::<bool>(),                            // tied embeddings
        any::<bool>(),                            // bf16 checkpoint
        1u64..=3,                                 // batch
        2u64..=40,                                // context
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn fused_graphs_are_valid_and_cheaper(
        (layers, kv, group, head_dim, inter, tied, bf16, batch, context) in config()
    ) {
        let mut spec = pipeline::load(&common::root().join("examples/tiny.toml"), None, None)
            .expect("example loads");
        let m = &mut spec.model;
        m.num_layers = layers;
        m.num_kv_heads = kv;
        m.num_heads = kv * group;
        m.head_dim = head_dim;
        m.hidden_size = 24;
        m.intermediate_size = 16 * inter;
        m.tie_word_embeddings = tied;
        m.dtype = if bf16 { DType::Bf16 } else { DType::F32 };
        spec.set_decode(Some(batch), Some(context)).expect("valid decode shape");

        let rules = pipeline::rules(&[]).expect("built-in rules");
        let eager = pipeline::eager(&spec).expect("eager graph builds");
        let (fused, report) = pipeline::fuse(&spec, &eager, &rules).expect("fuses");
        prop_assert!(!report.hit_limit);
        prop_assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        verify(&fused).expect("verifies");
        let printed = text::print(&fused).expect("acyclic");
        let reparsed = text::parse(&printed).expect("parses");
        prop_assert_eq!(text::print(&reparsed).expect("acyclic"), printed);

        let b = pipeline::bindings(&spec);
        let (e, f) = (graph_cost(&eager, &b).expect("bound"), graph_cost(&fused, &b).expect("bound"));
        prop_assert_eq!(f.launches_per_layer(), 5.0);
        prop_assert!(f.total.launches < e.total.launches);
        prop_assert!(f.total.bytes() <= e.total.bytes());
        prop_assert_eq!(f.floor, e.floor, "fusion does not change what must move");
    }
}
