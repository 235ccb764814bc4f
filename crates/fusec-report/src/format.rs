//! Number formatting shared by the renderers: decimal units and a fixed number of
//! significant digits, so that tables stay narrow and the output is deterministic.

/// `1.23 GB`, with decimal units.
pub fn bytes(b: u64) -> String {
    scaled(
        b as f64,
        &[("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)],
        "B",
    )
}

/// Bytes that may be negative (a variant that moves more than the baseline).
pub fn signed_bytes(b: i64) -> String {
    if b < 0 {
        format!("-{}", bytes(b.unsigned_abs()))
    } else {
        bytes(b.unsigned_abs())
    }
}

/// `4.56 G`, with decimal units.
pub fn count(n: u64) -> String {
    scaled(
        n as f64,
        &[("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)],
        "",
    )
}

/// A parameter count: `8.03 B`, `125.25 M`.
pub fn params(n: u64) -> String {
    scaled(
        n as f64,
        &[("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)],
        "",
    )
}

fn scaled(v: f64, units: &[(&str, f64)], base: &str) -> String {
    for (unit, scale) in units {
        if v >= *scale {
            return format!("{:.2} {unit}", v / scale);
        }
    }
    if base.is_empty() {
        format!("{v}")
    } else {
        format!("{v} {base}")
    }
}

/// A positive quantity with about three significant digits and no exponent:
/// `5405`, `12.3`, `0.0417`.
pub fn sig(v: f64) -> String {
    if !v.is_finite() {
        return "-".to_string();
    }
    let a = v.abs();
    let decimals = if a >= 100.0 || a == 0.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 1.0 {
        2
    } else {
        // Two digits after the first significant one, at most nine decimals.
        let mut d = 2;
        let mut x = a;
        while x < 1.0 && d < 9 {
            x *= 10.0;
            d += 1;
        }
        d
    };
    format!("{v:.decimals$}")
}

/// Microseconds with one decimal (the time columns).
pub fn us(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A fraction as a percentage with one decimal.
pub fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

/// Dollars with about three significant digits.
pub fn dollars(v: f64) -> String {
    format!("${}", sig(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_digits() {
        assert_eq!(bytes(15_546_000_000), "15.55 GB");
        assert_eq!(bytes(999), "999 B");
        assert_eq!(signed_bytes(-2_000), "-2.00 kB");
        assert_eq!(count(17_190_000_000), "17.19 G");
        assert_eq!(sig(5405.12), "5405");
        assert_eq!(sig(12.34), "12.3");
        assert_eq!(sig(3.756), "3.76");
        assert_eq!(sig(0.04173), "0.0417");
        assert_eq!(pct(0.9578), "95.8%");
        assert_eq!(dollars(3.7537), "$3.75");
    }
}
