//! The report's charts, written as SVG by hand: a roofline with one point per kernel,
//! stacked bars of time per step, and lines for the sweeps.
//!
//! Each chart is a self-contained `<svg>` element with an `id` (`roofline`,
//! `step-bars`, `context-sweep`, `batch-sweep`) and presentation attributes instead of
//! CSS, so it renders the same inline in the HTML page or saved on its own. Every mark
//! carries a `<title>` with its figures, which browsers show on hover. Coordinates are
//! printed with one decimal, so the markup is deterministic.

use std::fmt::Write;

use crate::assemble::Report;
use crate::format::{self, sig};
use fusec_ir::KernelClass;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 80.0;
/// Room for the legend on the right.
const RIGHT: f64 = 200.0;
const TOP: f64 = 20.0;
const BOTTOM: f64 = 56.0;

/// Colours of the variants, in order (eager, fused, fused+fp8, ...).
const VARIANT_COLORS: [&str; 6] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// Colours of the stacked segments: the kernel classes, then launch overhead.
const CLASS_COLORS: [&str; 5] = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#bab0ac"];

pub(crate) fn variant_color(i: usize) -> &'static str {
    VARIANT_COLORS[i % VARIANT_COLORS.len()]
}

/// Escapes text for XML content and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

/// A map from data values to pixels along one axis.
#[derive(Copy, Clone, Debug)]
struct Scale {
    lo: f64,
    hi: f64,
    log: bool,
    px_lo: f64,
    px_hi: f64,
}

impl Scale {
    fn at(&self, v: f64) -> f64 {
        let t = if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        self.px_lo + t * (self.px_hi - self.px_lo)
    }
}

fn x_scale(lo: f64, hi: f64, log: bool) -> Scale {
    Scale {
        lo,
        hi,
        log,
        px_lo: LEFT,
        px_hi: WIDTH - RIGHT,
    }
}

fn y_scale(lo: f64, hi: f64, log: bool) -> Scale {
    Scale {
        lo,
        hi,
        log,
        px_lo: HEIGHT - BOTTOM,
        px_hi: TOP,
    }
}

/// The decades that enclose `[lo, hi]` (both positive).
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    let a = lo.log10().floor() as i32;
    let b = (hi.log10().ceil() as i32).max(a + 1);
    (10f64.powi(a), 10f64.powi(b))
}

/// One tick per decade of a log axis within `[lo, hi]`, labelled by `label`.
fn decade_ticks(lo: f64, hi: f64, label: fn(f64) -> String) -> Vec<(f64, String)> {
    // A relative tolerance keeps the end decades that `lo` and `hi` sit on exactly.
    let (a, b) = (
        (lo.log10() - 1e-9).ceil() as i32,
        (hi.log10() + 1e-9).floor() as i32,
    );
    (a..=b)
        .map(|k| {
            let v = 10f64.powi(k);
            (v, label(v))
        })
        .collect()
}

/// About five round ticks from 0 to at least `max` on a linear axis, and the axis top.
fn linear_ticks(max: f64) -> (Vec<(f64, String)>, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let n = (max / step).ceil() as u32;
    let ticks = (0..=n)
        .map(|i| {
            let v = f64::from(i) * step;
            (v, tick_label(v))
        })
        .collect();
    (ticks, f64::from(n) * step)
}

/// A linear tick value without trailing zeros: `2.5`, `7500`.
fn tick_label(v: f64) -> String {
    let s = sig(v);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `1`, `10`, `0.1`, `1e4`: a power of ten, short.
fn power_label(v: f64) -> String {
    let k = v.log10().round() as i32;
    match k {
        -3..=-1 => format!("{}", 10f64.powi(k)),
        0..=3 => format!("{:.0}", 10f64.powi(k)),
        _ => format!("1e{k}"),
    }
}

/// `1 G`, `10 T`: FLOP/s with a unit.
fn rate_label(v: f64) -> String {
    format::count(v.round() as u64)
        .replace(".00", "")
        .replace(' ', "\u{a0}")
}

/// An SVG document under construction.
struct Svg {
    out: String,
}

impl Svg {
    fn new(id: &str, title: &str) -> Svg {
        let mut out = String::new();
        let _ = write!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{id}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
             width=\"{WIDTH}\" height=\"{HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\" \
             role=\"img\" aria-label=\"{t}\">\n<title>{t}</title>\n\
             <rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"#ffffff\"/>\n",
            t = esc(title)
        );
        Svg { out }
    }

    fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), stroke: &str, dash: bool) {
        let dash = if dash {
            " stroke-dasharray=\"4 3\""
        } else {
            ""
        };
        let _ = writeln!(
            self.out,
            "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{stroke}\"{dash}/>"
        );
    }

    fn text(&mut self, x: f64, y: f64, anchor: &str, text: &str) {
        let _ = writeln!(
            self.out,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\">{}</text>",
            esc(text)
        );
    }

    /// Text turned a quarter anticlockwise around its anchor (a y-axis label).
    fn vtext(&mut self, x: f64, y: f64, text: &str) {
        let _ = writeln!(
            self.out,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"middle\" \
             transform=\"rotate(-90 {x:.1} {y:.1})\">{}</text>",
            esc(text)
        );
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, title: &str) {
        let _ = writeln!(
            self.out,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{fill}\" \
             stroke=\"#ffffff\" stroke-width=\"0.5\"><title>{}</title></rect>",
            esc(title)
        );
    }

    fn circle(&mut self, (cx, cy): (f64, f64), r: f64, color: &str, filled: bool, title: &str) {
        let fill = if filled { color } else { "#ffffff" };
        let _ = writeln!(
            self.out,
            "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"{r:.1}\" fill=\"{fill}\" fill-opacity=\"0.65\" \
             stroke=\"{color}\" stroke-width=\"1.2\"><title>{}</title></circle>",
            esc(title)
        );
    }

    fn polyline(&mut self, points: &[(f64, f64)], stroke: &str, width: f64, dash: bool) {
        let pts: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let dash = if dash {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        let _ = writeln!(
            self.out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{stroke}\" stroke-width=\"{width}\"{dash}/>",
            pts.join(" ")
        );
    }

    /// Axes with ticks, grid lines and labels.
    fn axes(
        &mut self,
        x: &Scale,
        y: &Scale,
        xticks: &[(f64, String)],
        yticks: &[(f64, String)],
        xlabel: &str,
        ylabel: &str,
    ) {
        let (x0, x1) = (x.px_lo, x.px_hi);
        let (y0, y1) = (y.px_lo, y.px_hi);
        for (v, label) in yticks {
            let py = y.at(*v);
            self.line((x0, py), (x1, py), "#e5e5e5", false);
            self.text(x0 - 6.0, py + 4.0, "end", label);
        }
        for (v, label) in xticks {
            let px = x.at(*v);
            self.line((px, y0), (px, y1), "#e5e5e5", false);
            self.text(px, y0 + 16.0, "middle", label);
        }
        self.line((x0, y0), (x1, y0), "#333333", false);
        self.line((x0, y0), (x0, y1), "#333333", false);
        self.text((x0 + x1) / 2.0, HEIGHT - 12.0, "middle", xlabel);
        self.vtext(18.0, (y0 + y1) / 2.0, ylabel);
    }

    /// A legend entry on the right: a swatch drawn by `swatch` and a label.
    fn legend_text(&mut self, row: usize, label: &str) -> (f64, f64) {
        let x = WIDTH - RIGHT + 20.0;
        let y = TOP + 10.0 + 20.0 * row as f64;
        self.text(x + 18.0, y + 4.0, "start", label);
        (x, y)
    }

    fn finish(mut self) -> String {
        self.out.push_str("</svg>\n");
        self.out
    }
}

/// The roofline: x is arithmetic intensity (FLOP/byte), y attained FLOP/s, both log.
/// Each kernel row of each variant is a circle whose area follows its share of the
/// step time; the roofs are the bandwidth slope and the GPU's math peaks.
pub(crate) fn roofline(r: &Report) -> String {
    let g = &r.gpu;
    let bw = r.cost_model.bandwidth_gbs * 1e9;
    let mut peaks: Vec<(&str, f64)> =
        vec![("f32", g.f32_tflops * 1e12), ("bf16", g.bf16_tflops * 1e12)];
    if let Some(f) = g.fp8_tflops {
        peaks.push(("fp8", f * 1e12));
    }
    let top = peaks.iter().map(|p| p.1).fold(0.0, f64::max);
    // (variant index, x, y, radius, title)
    let mut points = Vec::new();
    for (vi, v) in r.variants.iter().enumerate() {
        let step = v.per_step.us.max(1e-12);
        for k in &v.kernels {
            if k.flops == 0 || k.bytes_read + k.bytes_written == 0 || k.us <= 0.0 {
                continue;
            }
            let perf = k.flops as f64 / (k.us * 1e-6);
            let radius = 2.5 + 10.0 * (k.total_us / step).sqrt();
            let title = format!(
                "{}: {} x{} ({}), {} FLOP/B, {}FLOP/s, {}-bound, {} us each, {} of the step",
                v.name,
                k.op,
                k.count,
                k.scope,
                sig(k.intensity),
                rate_label(perf).replace('\u{a0}', " "),
                k.bound.name(),
                format::us(k.us),
                format::pct(k.total_us / step)
            );
            points.push((vi, k.intensity, perf, radius, title));
        }
    }
    let xmin = points.iter().map(|p| p.1).fold(0.1, f64::min);
    let xmax = points.iter().map(|p| p.1).fold(top / bw, f64::max);
    // The ends: a decade below the smallest intensity, and room right of the last
    // ridge point for the roof labels.
    let (xlo, xhi) = (decades(xmin, xmax).0, xmax * 3.0);
    let ymin = points.iter().map(|p| p.2).fold(bw * xlo, f64::min);
    // The top leaves room for the roof labels above the highest peak, not a decade.
    let (ylo, yhi) = (decades(ymin, top).0, top * 4.0);
    let x = x_scale(xlo, xhi, true);
    let y = y_scale(ylo, yhi, true);
    let mut svg = Svg::new(
        "roofline",
        &format!("Roofline of every kernel on {}", g.name),
    );
    svg.axes(
        &x,
        &y,
        &decade_ticks(xlo, xhi, power_label),
        &decade_ticks(ylo, yhi, rate_label),
        "arithmetic intensity (FLOP/byte)",
        "attained FLOP/s (estimated)",
    );
    // The bandwidth slope up to the highest peak, then one flat roof per peak.
    let ridge_top = top / bw;
    svg.polyline(
        &[(x.at(xlo), y.at(bw * xlo)), (x.at(ridge_top), y.at(top))],
        "#555555",
        1.5,
        false,
    );
    svg.text(
        x.at(xlo) + 6.0,
        y.at(bw * xlo) - 8.0,
        "start",
        &format!("{} GB/s", sig(r.cost_model.bandwidth_gbs)),
    );
    for (name, p) in &peaks {
        let ridge = p / bw;
        svg.polyline(
            &[(x.at(ridge), y.at(*p)), (x.at(xhi), y.at(*p))],
            "#555555",
            1.0,
            true,
        );
        // The highest roof is labelled above its line and the others below theirs, so
        // that close peaks (bf16 and fp8 are a factor of two apart) do not overprint.
        let dy = if *p >= top { -5.0 } else { 14.0 };
        svg.text(
            x.at(xhi) - 4.0,
            y.at(*p) + dy,
            "end",
            &format!("{name} {} TFLOP/s", sig(p / 1e12)),
        );
    }
    // Large circles first, so small ones stay visible on top.
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| points[b].3.total_cmp(&points[a].3).then(a.cmp(&b)));
    for i in order {
        let (vi, px, py, radius, title) = &points[i];
        svg.circle(
            (x.at(*px), y.at(*py)),
            *radius,
            variant_color(*vi),
            true,
            title,
        );
    }
    for (vi, v) in r.variants.iter().enumerate() {
        let (lx, ly) = svg.legend_text(vi, &v.name);
        svg.circle((lx + 6.0, ly), 5.0, variant_color(vi), true, &v.name);
    }
    svg.finish()
}

/// Stacked bars of estimated time per step, one bar per variant, a segment per kernel
/// class plus launch overhead.
pub(crate) fn step_bars(r: &Report) -> String {
    let max = r.variants.iter().map(|v| v.per_step.us).fold(0.0, f64::max);
    let (yticks, ytop) = linear_ticks(max * 1.05);
    let y = y_scale(0.0, ytop, false);
    let n = r.variants.len() as f64;
    let plot_w = WIDTH - RIGHT - LEFT;
    let slot = plot_w / n;
    let bar_w = (slot * 0.55).min(110.0);
    let mut svg = Svg::new(
        "step-bars",
        &format!(
            "Estimated time per step on {}, by kind of kernel",
            r.gpu.name
        ),
    );
    // The x axis has categories, not values: draw it without ticks.
    let x = x_scale(0.0, 1.0, false);
    svg.axes(&x, &y, &[], &yticks, "variant", "estimated us per step");
    let labels: Vec<&str> = KernelClass::ALL
        .iter()
        .map(|k| k.label())
        .chain(std::iter::once("launch overhead"))
        .collect();
    for (vi, v) in r.variants.iter().enumerate() {
        let cx = LEFT + slot * (vi as f64 + 0.5);
        let x0 = cx - bar_w / 2.0;
        let parts: Vec<f64> = v
            .time_by_class
            .iter()
            .map(|c| c.us)
            .chain(std::iter::once(v.time_by_bound.launch_us))
            .collect();
        let mut acc = 0.0;
        for (i, us) in parts.iter().enumerate() {
            if *us <= 0.0 {
                continue;
            }
            let (top, bottom) = (y.at(acc + us), y.at(acc));
            svg.rect(
                x0,
                top,
                bar_w,
                bottom - top,
                CLASS_COLORS[i],
                &format!(
                    "{}: {} {} us ({})",
                    v.name,
                    labels[i],
                    format::us(*us),
                    format::pct(us / v.per_step.us)
                ),
            );
            acc += us;
        }
        svg.text(
            cx,
            y.at(acc) - 6.0,
            "middle",
            &format!("{} us", format::us(v.per_step.us)),
        );
        svg.text(cx, HEIGHT - BOTTOM + 16.0, "middle", &v.name);
    }
    for (i, label) in labels.iter().enumerate() {
        let (lx, ly) = svg.legend_text(i, label);
        svg.rect(lx, ly - 6.0, 12.0, 12.0, CLASS_COLORS[i], label);
    }
    svg.finish()
}

/// One line of a sweep chart: a variant's points, `(x, y, hollow, title)`.
struct Series {
    name: String,
    color: &'static str,
    points: Vec<(f64, f64, bool, String)>,
}

/// A line chart over swept integers (context or batch) on a log x axis with a tick at
/// every point; the y axis is linear from zero, or log.
fn lines(
    id: &str,
    title: &str,
    xs: &[u64],
    series: &[Series],
    ylog: bool,
    xlabel: &str,
    ylabel: &str,
) -> String {
    let xmin = xs.iter().copied().min().unwrap_or(1) as f64;
    let xmax = xs.iter().copied().max().unwrap_or(1) as f64;
    let (xlo, xhi) = if xmax > xmin {
        (xmin, xmax)
    } else {
        (xmin / 2.0, xmin * 2.0)
    };
    // A little room on both sides so end markers are not cut by the axes.
    let pad = (xhi / xlo).powf(0.04);
    let x = x_scale(xlo / pad, xhi * pad, true);
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let ymax = ys.clone().fold(0.0, f64::max);
    let (y, yticks) = if ylog {
        let ymin = ys.fold(f64::INFINITY, f64::min);
        let (lo, hi) = decades(ymin.min(ymax), ymax);
        (y_scale(lo, hi, true), decade_ticks(lo, hi, power_label))
    } else {
        let (ticks, top) = linear_ticks(ymax * 1.05);
        (y_scale(0.0, top, false), ticks)
    };
    let xticks: Vec<(f64, String)> = xs.iter().map(|&v| (v as f64, v.to_string())).collect();
    let mut svg = Svg::new(id, title);
    svg.axes(&x, &y, &xticks, &yticks, xlabel, ylabel);
    for s in series {
        let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (x.at(p.0), y.at(p.1))).collect();
        svg.polyline(&pts, s.color, 2.0, false);
        for (p, px) in s.points.iter().zip(&pts) {
            svg.circle(*px, 3.5, s.color, !p.2, &p.3);
        }
    }
    for (i, s) in series.iter().enumerate() {
        let (lx, ly) = svg.legend_text(i, &s.name);
        svg.line((lx, ly), (lx + 14.0, ly), s.color, false);
    }
    svg.finish()
}

/// Time per token against context, one line per variant.
pub(crate) fn context_lines(r: &Report) -> String {
    let cs = &r.context_sweep;
    let xs: Vec<u64> = cs.points.iter().map(|p| p.context).collect();
    let series: Vec<Series> = r
        .variants
        .iter()
        .enumerate()
        .map(|(vi, v)| Series {
            name: v.name.clone(),
            color: variant_color(vi),
            points: cs
                .points
                .iter()
                .map(|p| {
                    let q = &p.variants[vi];
                    (
                        p.context as f64,
                        q.us_per_token,
                        q.fits == Some(false),
                        format!(
                            "{} at context {}: {} us/token, KV read {}",
                            v.name,
                            p.context,
                            format::us(q.us_per_token),
                            format::bytes(q.kv_read_bytes)
                        ),
                    )
                })
                .collect(),
        })
        .collect();
    lines(
        "context-sweep",
        &format!(
            "Estimated time per token against context on {}, batch {}",
            r.gpu.name, cs.batch
        ),
        &xs,
        &series,
        false,
        "context (KV length after the step)",
        "estimated us per token",
    )
}

/// Tokens/s against batch, one line per variant, both axes log.
pub(crate) fn batch_lines(r: &Report) -> String {
    let bs = &r.batch_sweep;
    let xs: Vec<u64> = bs.points.iter().map(|p| p.batch).collect();
    let series: Vec<Series> = r
        .variants
        .iter()
        .enumerate()
        .map(|(vi, v)| Series {
            name: v.name.clone(),
            color: variant_color(vi),
            points: bs
                .points
                .iter()
                .map(|p| {
                    let q = &p.variants[vi];
                    (
                        p.batch as f64,
                        q.tokens_per_s,
                        q.fits == Some(false),
                        format!(
                            "{} at batch {}: {} tokens/s, {} us/token, {}-bound{}",
                            v.name,
                            p.batch,
                            sig(q.tokens_per_s),
                            format::us(q.us_per_token),
                            q.bound.name(),
                            if q.fits == Some(false) {
                                ", does not fit in memory"
                            } else {
                                ""
                            }
                        ),
                    )
                })
                .collect(),
        })
        .collect();
    lines(
        "batch-sweep",
        &format!(
            "Estimated tokens/s against batch on {}, context {}",
            r.gpu.name, bs.context
        ),
        &xs,
        &series,
        true,
        "batch (sequences per step)",
        "estimated tokens/s",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_and_ticks() {
        let s = x_scale(1.0, 100.0, true);
        assert!((s.at(10.0) - (LEFT + WIDTH - RIGHT) / 2.0).abs() < 1e-9);
        assert_eq!(decades(0.05, 300.0), (0.01, 1000.0));
        let (ticks, top) = linear_ticks(9.3);
        assert_eq!(top, 10.0);
        assert_eq!(ticks.len(), 6);
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
        assert_eq!(power_label(1e4), "1e4");
        assert_eq!(power_label(0.1), "0.1");
        assert_eq!(power_label(100.0), "100");
        assert_eq!(tick_label(7.5), "7.5");
        assert_eq!(tick_label(7500.0), "7500");
        assert_eq!(decade_ticks(0.1, 2000.0, power_label).len(), 5);
        assert_eq!(rate_label(1e12), "1\u{a0}T");
    }
}
