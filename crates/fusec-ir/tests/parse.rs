//! Parse errors carry a line and column, and type errors are caught at their line.

use fusec_ir::text::parse;

fn err(src: &str) -> (usize, usize, String) {
    let e = parse(src).expect_err("the text is invalid");
    (e.line, e.column, e.message)
}

const GOOD: &str = r#"graph "g" layers=1 {
  %0 = input{name="x"} : f32[B,4]
  layer 0 {
    %1 = unary.neg(%0) : f32[B,4]  ; rules=[r1,r2] covers=[unary.neg]
  }
  output "y" = %1
}
"#;

#[test]
fn good_text_round_trips_with_provenance() {
    let g = parse(GOOD).expect("parses");
    assert_eq!(fusec_ir::text::print(&g).expect("acyclic"), GOOD);
}

#[test]
fn errors_have_positions() {
    let (l, c, m) = err(
        "graph \"g\" {\n  %0 = input{name=\"x\"} : f32[4]\n  %1 = unary.nope(%0) : f32[4]\n}\n",
    );
    assert_eq!((l, c), (3, 8));
    assert!(m.contains("unknown op `unary.nope`"), "{m}");

    let (l, c, m) =
        err("graph \"g\" {\n  %0 = input{name=\"x\"} : f32[4]\n  %1 = unary.neg(%0) : f32[5]\n}\n");
    assert_eq!((l, c), (3, 24));
    assert!(
        m.contains("declared type f32[5] differs from the inferred type f32[4]"),
        "{m}"
    );

    let (l, c, m) =
        err("graph \"g\" {\n  %0 = input{name=\"x\"} : f32[4]\n  %1 = unary.neg(%7) : f32[4]\n}\n");
    assert_eq!((l, c), (3, 18));
    assert!(m.contains("%7 is used before it is defined"), "{m}");

    let (l, _, m) =
        err("graph \"g\" {\n  %0 = input{name=\"x\"} : f32[4]\n  %2 = unary.neg(%0) : f32[4]\n}\n");
    assert_eq!(l, 3);
    assert!(m.contains("expected %1, found %2"), "{m}");

    let (l, c, m) = err("graph \"g\" {\n  %0 = input{name=\"x\"} : f33[4]\n}\n");
    assert_eq!((l, c), (2, 26));
    assert!(m.contains("unknown dtype `f33`"), "{m}");

    let (l, _, m) = err("graph \"g\" {\n  %0 = input{name=\"x\"} : f32[4]\n");
    assert_eq!(l, 2);
    assert!(m.contains("not closed"), "{m}");

    let (l, c, m) = err("grph \"g\" {\n}\n");
    assert_eq!((l, c), (1, 1));
    assert!(m.contains("expected `graph`"), "{m}");
}

#[test]
fn dot_export_draws_every_node_and_edge() {
    let g = parse(GOOD).expect("parses");
    let dot = fusec_ir::dot::to_dot(&g).expect("acyclic");
    assert!(dot.starts_with("digraph \"g\" {"), "{dot}");
    assert!(
        dot.contains("n0 [label=\"%0 = input{name=\\\"x\\\"}\\nf32[B,4]\", style=dashed];"),
        "{dot}"
    );
    assert!(
        dot.contains("n1 [label=\"%1 = unary.neg\\nf32[B,4]\", style=solid];"),
        "{dot}"
    );
    assert!(dot.contains("n0 -> n1 [label=\"0\"];"), "{dot}");
    assert!(dot.contains("n1 -> \"out:y\";"), "{dot}");
}

/// Found by `tests/fuzz_parsers.rs`: names are printed with Rust's `{:?}` quoting, and
/// the parser did not read all of its escapes back (`\0`), so a parsed graph printed
/// text that no longer parsed.
#[test]
fn names_with_any_character_print_and_parse_back() {
    let src = "graph \"g\\u{1}\\0\\r'\u{7f}\" {\n  %0 = input{name=\"a\\0b\\u{fffd}\"} : f32[B,4]\n  output \"y\\t\" = %0\n}\n";
    let g = parse(src).expect("parses");
    let printed = fusec_ir::text::print(&g).expect("prints");
    let again = parse(&printed).expect("printed text parses");
    assert_eq!(fusec_ir::text::print(&again).expect("prints"), printed);
    assert_eq!(again.name, "g\u{1}\0\r'\u{7f}");
    for bad in ["\\u{110000}", "\\u{}", "\\u{1234567}", "\\u12", "\\q"] {
        let src = format!("graph \"{bad}\" {{\n}}\n");
        assert!(parse(&src).is_err(), "{bad}");
    }
}

/// Shapes are bounded so that element and byte counts cannot overflow.
#[test]
fn huge_dimensions_are_rejected_with_a_position() {
    for shape in [
        "[1099511627777]",
        "[1048576,1048576,1048576]",
        "[B+18446744073709551615]",
    ] {
        let src = format!("graph \"g\" {{\n  %0 = input{{name=\"a\"}} : f32{shape}\n}}\n");
        let (line, _, message) = err(&src);
        assert_eq!(line, 2, "{shape}: {message}");
        assert!(message.contains("too large"), "{shape}: {message}");
    }
}
