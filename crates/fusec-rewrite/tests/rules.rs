//! Rules as data: the built-in files load, bad rules are rejected by name, user rules
//! from files and from Rust fire.

mod common;

use fusec_ir::{FusedOp, Op};
use fusec_rewrite::{Rule, RuleSet};

fn add_err(text: &str) -> String {
    let mut set = RuleSet::builtin().expect("built-in rules load");
    set.add_file("user.rules", text)
        .expect_err("the rule is bad")
        .to_string()
}

#[test]
fn builtin_rules_load_with_algebra_and_topics() {
    let set = RuleSet::builtin().expect("built-in rules load");
    let topics: std::collections::BTreeSet<&str> =
        set.rules().iter().map(|r| r.topic.as_str()).collect();
    for t in [
        "softmax",
        "attention",
        "kv",
        "norm",
        "rope",
        "mlp",
        "epilogue",
    ] {
        assert!(topics.contains(t), "topic {t}");
    }
    for r in set.rules() {
        assert!(!r.algebra.is_empty(), "{} states its algebra", r.name);
    }
}

#[test]
fn malformed_rules_are_rejected_by_name() {
    let e = add_err("# x\nrule broken\n  (binary.add ?a ?b\n  => ?a\n");
    assert!(
        e.contains("user.rules:") && e.contains("rule `broken`"),
        "{e}"
    );
    let e = add_err("# x\nrule unbound\n  (unary.neg ?a)\n  => (unary.neg ?b)\n");
    assert!(
        e.contains("rule `unbound`") && e.contains("`?b` is used on the right but not bound"),
        "{e}"
    );
    let e = add_err("# x\nrule unbound-attr\n  (unary.neg ?a)\n  => (softmax{axis=$k} ?a)\n");
    assert!(e.contains("`$k` is used on the right but not bound"), "{e}");
    let e = add_err("# x\nrule no-such-op\n  (unary.frob ?a)\n  => ?a\n");
    assert!(
        e.contains("rule `no-such-op`") && e.contains("unknown op `unary.frob`"),
        "{e}"
    );
    let e = add_err("# x\nrule bad-attr\n  (softmax{axis=-1,dim=1} ?a)\n  => ?a\n");
    assert!(e.contains("has no attribute `dim`"), "{e}");
    let e = add_err("rule no-algebra\n  (unary.neg (unary.neg ?a))\n  => ?a\n");
    assert!(
        e.contains("rule `no-algebra`") && e.contains("algebra"),
        "{e}"
    );
    let e = add_err("# x\nrule wild-rhs\n  (softmax{axis=_} ?a)\n  => (softmax{axis=_} ?a)\n");
    assert!(
        e.contains("`_` may only appear on the left-hand side"),
        "{e}"
    );
    let e = add_err("# x\nrule unknown-cond\n  (unary.neg ?a)\n  => ?a\n  if (is-purple ?a)\n");
    assert!(e.contains("unknown condition `is-purple`"), "{e}");
    let e = add_err("# x\nrule mul-one\n  (unary.neg (unary.neg ?a))\n  => ?a\n");
    assert!(e.contains("already loaded"), "{e}");
    // The line of the error is the rule's.
    let e = add_err("# a\nrule ok-one\n  (unary.neg (unary.neg ?a))\n  => ?a\n\n# b\nrule bad\n  (unary.neg ?a)\n  => (unary.neg ?zz)\n");
    assert!(e.starts_with("user.rules:7:"), "{e}");
}

const SWAPPED_SWIGLU: &str = r#"graph "mlp" layers=1 {
  %0 = input{name="x"} : f32[B,1,8]
  layer 0 {
    %1 = weight@up : f32[16,8]
    %2 = weight@gate : f32[16,8]
    %3 = linear(%0, %1) : f32[B,1,16]
    %4 = linear(%0, %2) : f32[B,1,16]
    %5 = unary.silu(%4) : f32[B,1,16]
    %6 = binary.mul(%3, %5) : f32[B,1,16]
  }
  output "y" = %6
}
"#;

#[test]
fn a_user_rule_file_fires() {
    let mut set = RuleSet::builtin().expect("built-in rules load");
    let (before, _) = common::fuse_text(SWAPPED_SWIGLU, &set);
    assert!(!before.contains("fused.swiglu"), "{before}");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/rules/swiglu-up-first.rules"
    );
    let text = std::fs::read_to_string(path).expect("example rule file");
    set.add_file("swiglu-up-first.rules", &text)
        .expect("the example loads");
    let (after, _) = common::fuse_text(SWAPPED_SWIGLU, &set);
    assert!(
        after.contains("%1 = weight@gate") && after.contains("fused.swiglu(%0, %1, %2)"),
        "{after}"
    );
    assert!(after.contains("rules=[swiglu-up-first]"), "{after}");
}

#[test]
fn a_rust_rule_with_a_condition_fires() {
    let mut set = RuleSet::builtin().expect("built-in rules load");
    let rule = Rule::new(
        "swiglu-up-first-rust",
        "(x Wu^T) * silu(x Wg^T) = swiglu(x, Wg, Wu)",
        "(binary.mul (linear ?x ?Wu) (unary.silu (linear ?x ?Wg)))",
        "(fused.swiglu ?x ?Wg ?Wu)",
    )
    .expect("patterns parse")
    .when("gate and up weights agree", |ctx, m| {
        let (g, u) = (ctx.tensor(m.vars["Wg"])?, ctx.tensor(m.vars["Wu"])?);
        if g == u {
            Ok(())
        } else {
            Err(format!("{g} vs {u}"))
        }
    });
    set.add_rule(rule).expect("valid rule");
    let (after, _) = common::fuse_text(SWAPPED_SWIGLU, &set);
    assert!(after.contains("rules=[swiglu-up-first-rust]"), "{after}");
}

#[test]
fn an_ill_typed_result_is_rejected_by_name() {
    let mut set = RuleSet::builtin().expect("built-in rules load");
    set.add_file(
        "bad.rules",
        "# wrong on purpose: a GEMV of two activations\nrule mul-to-linear\n  (binary.mul ?a ?b)\n  => (linear ?a ?b)\n",
    )
    .expect("statically fine");
    let (_, report) = common::fuse_text(SWAPPED_SWIGLU, &set);
    let rejected: Vec<String> = report.rejected.iter().map(|e| e.to_string()).collect();
    assert!(
        rejected
            .iter()
            .any(|e| e.contains("rule `mul-to-linear`") && e.contains("does not type-check")),
        "{rejected:?}"
    );
}

#[test]
fn decomposed_softmax_is_recognised() {
    let src = r#"graph "sm" {
  %0 = input{name="x"} : f32[B,4,1,S]
  %1 = reduce.max{axis=-1,keepdim=true}(%0) : f32[B,4,1,1]
  %2 = binary.sub(%0, %1) : f32[B,4,1,S]
  %3 = unary.exp(%2) : f32[B,4,1,S]
  %4 = reduce.sum{axis=-1,keepdim=true}(%3) : f32[B,4,1,1]
  %5 = binary.div(%3, %4) : f32[B,4,1,S]
  output "y" = %5
}
"#;
    let set = RuleSet::builtin().expect("built-in rules load");
    let (out, _) = common::fuse_text(src, &set);
    assert!(out.contains("softmax{axis=-1}(%0)"), "{out}");
    assert!(!out.contains("unary.exp"), "{out}");
}

#[test]
fn near_misses_say_why() {
    // A cat along -2 that is not of the state buffer: kv-append must not fire.
    let src = r#"graph "kv" {
  %0 = input{name="a"} : f32[B,2,S,4]
  %1 = input{name="b"} : f32[B,2,1,4]
  %2 = cat{axis=-2}(%0, %1) : f32[B,2,S+1,4]
  output "y" = %2
}
"#;
    let set = RuleSet::builtin().expect("built-in rules load");
    let g = fusec_ir::text::parse(src).expect("valid");
    let (f, report) = common::fuse_with(&g, &set, Default::default());
    assert!(f
        .node_ids()
        .all(|n| f.op(n) != &Op::Fused(FusedOp::KvAppend)));
    // kv-append is a one-op pattern, so it is not reported; the absence is the test.
    assert!(report.near_misses.iter().all(|m| m.rule != "kv-append"));
}

#[test]
fn a_rotation_that_is_not_rotate_half_is_a_near_miss() {
    // Slices at 3 of an 8-wide vector: the rope pattern matches, its condition fails.
    let src = r#"graph "rot" {
  %0 = input{name="x"} : f32[B,1,8]
  %1 = input{name="cos"} : f32[B,1,8]
  %2 = input{name="sin"} : f32[B,1,8]
  %3 = binary.mul(%0, %1) : f32[B,1,8]
  %4 = view.slice{axis=-1,end=8,start=3}(%0) : f32[B,1,5]
  %5 = unary.neg(%4) : f32[B,1,5]
  %6 = view.slice{axis=-1,end=3,start=0}(%0) : f32[B,1,3]
  %7 = cat{axis=-1}(%5, %6) : f32[B,1,8]
  %8 = binary.mul(%7, %2) : f32[B,1,8]
  %9 = binary.add(%3, %8) : f32[B,1,8]
  output "y" = %9
}
"#;
    let set = RuleSet::builtin().expect("built-in rules load");
    let (out, report) = common::fuse_text(src, &set);
    assert!(!out.contains("fused.rope"), "{out}");
    let miss = report
        .near_misses
        .iter()
        .find(|m| m.rule == "rope-rotate-half")
        .expect("a near miss is reported");
    assert_eq!(miss.at, 9, "at the add that roots the pattern");
    assert!(
        miss.reason
            .contains("slices at 3 and 8 do not halve the last dimension of [B,1,8]"),
        "{}",
        miss.reason
    );
}
