//! Registering a fusion rule from Rust, with a condition written as a closure.
//!
//! `cargo run --example custom_rule` fuses a small MLP whose SwiGLU product is written
//! up-projection first, which the built-in `swiglu` rule does not match, and prints the
//! fused graph. The same rule as a file is `examples/rules/swiglu-up-first.rules`.

use fusec::ir::{hardware, text, Bindings};
use fusec::rewrite::{fuse, Limits, Options, Rule, RuleSet};

const GRAPH: &str = r#"graph "mlp" layers=1 {
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rules = RuleSet::builtin()?;
    let rule = Rule::new(
        "swiglu-up-first",
        "(x Wu^T) * silu(x Wg^T) = swiglu(x, Wg, Wu), as multiplication commutes",
        "(binary.mul (linear ?x ?Wu) (unary.silu (linear ?x ?Wg)))",
        "(fused.swiglu ?x ?Wg ?Wu)",
    )?
    .when("gate and up weights have one shape", |ctx, m| {
        let (gate, up) = (ctx.tensor(m.vars["Wg"])?, ctx.tensor(m.vars["Wu"])?);
        if gate == up {
            Ok(())
        } else {
            Err(format!("gate {gate} and up {up} differ").into())
        }
    });
    rules.add_rule(rule)?;

    let graph = text::parse(GRAPH)?;
    let bindings = Bindings::new().with("B", 1).with("S", 0);
    let gpu = hardware::gpu("h100-sxm").ok_or("no such GPU")?;
    let (fused, report) = fuse(
        &graph,
        &Options {
            rules: &rules,
            gpu,
            bindings: &bindings,
            limits: Limits::default(),
        },
    )?;
    print!("{}", text::print(&fused)?);
    println!("; saturation: {}", report.stop_reason);
    Ok(())
}
