//! Refusing a run that cannot fit: before weights and caches are allocated, the
//! bytes they need are estimated and compared with what the machine can give, so that
//! a model too large ends with a clear error instead of the allocator aborting the
//! process.
//!
//! What the machine can give is the least of `MemAvailable` (proc(5),
//! /proc/meminfo), the cgroup v2 limit less what the cgroup uses
//! (`memory.max - memory.current`), and the address-space limit (`ulimit -v`,
//! /proc/self/limits), or what `--max-memory` says.

use fusec_model::frontend::Precision;
use fusec_model::ModelSpec;

/// Bytes per weight and KV-cache element a precision holds. An FP8 run makes its
/// weights from 16-bit ones (the checkpoint's, or the calibration graph's), so it
/// holds both while it starts: 2 + 1 bytes; an integer run likewise from `f32` ones.
fn element_bytes(precision: Precision) -> u128 {
    match precision {
        Precision::F32 => 4,
        Precision::F16 | Precision::Bf16 => 2,
        Precision::Fp8 => 3,
        // Integer weights are made from the f32 ones, held while they start, and the
        // KV cache stays f32: 4 + 1 bytes (at most) per weight.
        Precision::Int8 | Precision::Int4 | Precision::Q4_1 | Precision::Q4K | Precision::Gguf => 5,
    }
}

/// The least a decode of `spec` in `precision` holds: the weights, and a KV cache of
/// `positions` positions for `batch` sequences, in 128-bit arithmetic.
pub fn least_bytes(spec: &ModelSpec, precision: Precision, batch: u64, positions: u64) -> u128 {
    let m = &spec.model;
    let e = element_bytes(precision);
    let weights = u128::from(m.parameter_count()) * e;
    let kv = 2
        * u128::from(m.num_layers)
        * u128::from(batch)
        * u128::from(positions)
        * u128::from(m.num_kv_heads)
        * u128::from(m.head_dim)
        * e;
    weights + kv
}

/// What the machine can give this process, and where that figure comes from.
pub fn available() -> Option<(u64, &'static str)> {
    let mut best: Option<(u64, &'static str)> = None;
    let mut consider = |v: Option<u64>, what: &'static str| {
        if let Some(v) = v {
            if best.is_none_or(|(b, _)| v < b) {
                best = Some((v, what));
            }
        }
    };
    consider(meminfo_available(), "MemAvailable in /proc/meminfo");
    consider(cgroup_room(), "the cgroup's memory.max");
    consider(address_space_limit(), "the address-space limit (ulimit -v)");
    best
}

fn meminfo_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

fn cgroup_room() -> Option<u64> {
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let max = read("memory.max")?;
    Some(max.saturating_sub(read("memory.current").unwrap_or(0)))
}

fn address_space_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max address space"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Parses a byte count: a number with an optional binary suffix `K`, `M`, `G` or `T`
/// (`KiB`, `GB` and so on are read the same way), e.g. `512M` or `8G`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a byte count (e.g. 512M or 8G)"))?;
    let shift = match suffix
        .trim()
        .trim_end_matches(['B', 'b'])
        .trim_end_matches('i')
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("`{text}` is not a byte count (e.g. 512M or 8G)")),
    };
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("`{text}` is too large a byte count"))
}

/// Refuses `need` bytes for `what` when they exceed `max_memory` (if given) or what
/// the machine can give.
pub fn check(need: u128, what: &str, max_memory: Option<u64>) -> Result<(), String> {
    let (limit, source) = match max_memory {
        Some(m) => (m, "--max-memory"),
        None => match available() {
            Some(a) => a,
            None => return Ok(()),
        },
    };
    if need > u128::from(limit) {
        return Err(format!(
            "{what} needs at least {} of memory (weights and KV cache), more than the {} that {source} allows: use a smaller model, batch, context or precision",
            human(need),
            human(u128::from(limit)),
        ));
    }
    Ok(())
}

fn human(bytes: u128) -> String {
    let gb = bytes as f64 / 1e9;
    if gb >= 1.0 {
        format!("{gb:.2} GB")
    } else {
        format!("{:.2} MB", bytes as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_with_suffixes() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("8G"), Ok(8 << 30));
        assert_eq!(parse_bytes("8GiB"), Ok(8 << 30));
        assert_eq!(parse_bytes("3m"), Ok(3 << 20));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999T").is_err());
        assert!(parse_bytes("1Q").is_err());
    }

    #[test]
    fn a_need_beyond_the_cap_is_refused_by_name() {
        let err = check(2 << 30, "decoding llama", Some(1 << 30)).expect_err("refused");
        assert!(
            err.contains("decoding llama") && err.contains("--max-memory"),
            "{err}"
        );
        assert!(check(1 << 20, "x", Some(1 << 30)).is_ok());
    }
}
