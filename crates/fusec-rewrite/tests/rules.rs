//! Rules as data through the Rust API: the built-in files load, bad rules are rejected
//! by name, a rule written in Rust fires. What a rule does to a graph is tested by the
//! files under `tests/filetests/` (see `filetests.rs`).

mod common;

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
            Err(format!("{g} vs {u}").into())
        }
    });
    set.add_rule(rule).expect("valid rule");
    let (after, _) = common::fuse_text(SWAPPED_SWIGLU, &set);
    assert!(after.contains("rules=[swiglu-up-first-rust]"), "{after}");
}

/// Found by `tests/fuzz_parsers.rs`: a comment with multi-byte characters shifted the
/// offsets of everything after it, and slicing the text there panicked.
#[test]
fn comments_with_multibyte_characters_keep_offsets() {
    let mut set = RuleSet::builtin().expect("built-in rules load");
    set.add_file(
        "user.rules",
        "# é ü → ∑ all the way\n# x * 1 = x\nrule times-one-é\n  (binary.mul ?x (scalar{value=1.0})) => ?x\n",
    )
    .expect("loads");
    let e = add_err("# ∑∑∑∑∑∑∑∑∑∑∑∑∑∑∑∑\nrule r\n  (binary.mul ?x) => ?x\n");
    assert!(e.starts_with("user.rules:3:4: rule `r`"), "{e}");
}

/// Arity, condition signatures, literals and nesting are checked when a rule loads.
#[test]
fn rules_are_checked_against_the_op_table_and_the_conditions() {
    for (body, needle) in [
        (
            "(binary.mul ?x) => ?x",
            "`binary.mul` takes 2 operands, the pattern gives it 1",
        ),
        ("(unary.neg ?x) => (binary.add ?x)", "takes 2 operands"),
        (
            "(binary.mul ?a ?b) => ?a if (same-type ?a)",
            "condition `same-type` takes 2",
        ),
        (
            "(binary.mul ?a ?b) => ?a if (rotate-half ?a ?b ?a)",
            "argument 1 of condition `rotate-half` must be an integer",
        ),
        ("(binary.mul ?a ?b) => ?a if", "`if` without a condition"),
        ("(binary.mul ?a ?b) => ?a iffy", "`if` must be followed"),
        (
            "(binary.mul ?a (scalar{value=1e999})) => ?a",
            "not a finite number",
        ),
        (
            "(binary.mul ?a ?b) => ?a if (has-dtype ?a -inf)",
            "not a finite number",
        ),
    ] {
        let e = add_err(&format!("# algebra\nrule r\n  {body}\n"));
        assert!(e.contains("rule `r`") && e.contains(needle), "{body}: {e}");
    }
    let deep = format!("{}?x{}", "(unary.neg ".repeat(100), ")".repeat(100));
    let e = add_err(&format!("# algebra\nrule r\n  {deep} => ?x\n"));
    assert!(e.contains("deeper than 64"), "{e}");
}
