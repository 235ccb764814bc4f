//! The logits processors against transformers' on fixed logits
//! (tests/fixtures/smollm2/sampling.json, made by scripts/make_text_references.py).

use fusec_text::sampling::{min_p, repetition_penalty, temperature, top_k, top_p};

#[test]
fn processors_match_transformers_on_fixed_logits() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/smollm2/sampling.json"
    );
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
    let numbers = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .expect("numbers")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    };
    let logits: Vec<f32> = numbers(&fixture["logits"])
        .iter()
        .map(|&v| v as f32)
        .collect();
    let seen: Vec<u32> = numbers(&fixture["seen"])
        .iter()
        .map(|&v| v as u32)
        .collect();
    for case in fixture["cases"].as_array().expect("cases") {
        let o = &case["options"];
        let f = |k: &str| o.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
        let mut x = logits.clone();
        if let Some(r) = f("repetition_penalty") {
            repetition_penalty(&mut x, &seen, r);
        }
        if let Some(t) = f("temperature") {
            temperature(&mut x, t);
            if let Some(k) = o.get("top_k").and_then(|v| v.as_u64()) {
                top_k(&mut x, k as usize);
            }
            if let Some(p) = f("top_p") {
                top_p(&mut x, p);
            }
            if let Some(p) = f("min_p") {
                min_p(&mut x, p);
            }
        }
        let want = case["processed"].as_array().expect("processed");
        for (i, (got, want)) in x.iter().zip(want).enumerate() {
            match want.as_f64() {
                None => assert_eq!(*got, f32::NEG_INFINITY, "{o}: token {i} should be filtered"),
                Some(w) => assert!(
                    (f64::from(*got) - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{o}: token {i}: {got} vs {w}"
                ),
            }
        }
    }
}
