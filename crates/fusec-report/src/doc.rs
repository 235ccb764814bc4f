//! The report as a document: headings, paragraphs, tables and charts, in order. The
//! text, Markdown and HTML renderers format the same document, so the three forms
//! always hold the same figures.

use crate::assemble::{KernelRow, Report, VariantReport};
use crate::format::{bytes, count, dollars, params, pct, sig, signed_bytes, us};
use crate::svg;
use fusec_ir::KernelClass;

/// How a table column is aligned.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    pub header: Vec<String>,
    pub align: Vec<Align>,
    pub rows: Vec<Vec<String>>,
    /// Whether the HTML form folds the table away by default (long kernel lists).
    pub folded: Option<bool>,
}

impl Table {
    /// A table whose first `left` columns are text and the rest numbers.
    fn new(header: Vec<String>, left: usize) -> Table {
        let align = (0..header.len())
            .map(|i| if i < left { Align::Left } else { Align::Right })
            .collect();
        Table {
            header,
            align,
            rows: Vec::new(),
            folded: None,
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Block {
    Title(String),
    Heading(String),
    /// A heading one level down.
    Subheading(String),
    Para(String),
    List(Vec<String>),
    Table(Table),
    /// A chart: its element id, a caption, and the SVG markup. Only HTML shows it.
    Chart {
        id: &'static str,
        caption: String,
        svg: String,
    },
}

fn s(v: impl Into<String>) -> String {
    v.into()
}

fn fits(f: Option<bool>) -> &'static str {
    match f {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
}

/// The whole document of a report.
pub fn document(r: &Report) -> Vec<Block> {
    let mut d = Vec::new();
    let g = &r.gpu;
    d.push(Block::Title(format!(
        "fusec report: {} on {}",
        r.model.name, g.name
    )));
    let m = &r.model;
    d.push(Block::Para(format!(
        "Model {}: {} layers, {} parameters, hidden {}, {} query / {} KV heads of {}, \
         MLP {}, vocabulary {}, max_seq_len {}, checkpoint {}. Decode point: batch {}, \
         context {} (KV length after the step); precision {}.",
        m.name,
        m.layers,
        params(m.parameters),
        m.hidden_size,
        m.num_heads,
        m.num_kv_heads,
        m.head_dim,
        m.intermediate_size,
        m.vocab_size,
        m.max_seq_len,
        m.dtype,
        r.batch,
        r.context,
        r.precision
    )));
    if let Some(w) = &m.window {
        d.push(Block::Para(format!(
            "Sliding window: {} of {} layers attend to the last {} positions only, and their \
             KV caches hold at most {} positions, so the KV bytes a step reads and the cache \
             memory stop growing at context {}.",
            w.windowed_layers, m.layers, w.positions, w.positions, w.positions
        )));
    }
    let c = &r.cost_model;
    d.push(Block::Para(format!(
        "GPU {} ({}). Cost model: each kernel takes {}, with bandwidth {} GB/s ({}), \
         launch overhead {} us, and {}; a step takes {}. This is {}.",
        g.name,
        g.description,
        c.kernel_time,
        sig(c.bandwidth_gbs),
        c.bandwidth_source,
        c.launch_us,
        c.math_peaks,
        c.step_time,
        c.bound
    )));
    d.push(Block::Para(format!(
        "Cost per million tokens at ${}/GPU-hour: $/Mtok = {}, where tokens_per_s = {}. \
         MBU (model bandwidth utilisation, an upper bound here) = {}.",
        sig(r.price_per_hour),
        c.dollars_per_million_tokens,
        c.tokens_per_s,
        c.mbu
    )));
    let variants: Vec<String> = r
        .variants
        .iter()
        .map(|v| format!("{}: {}", v.name, v.description))
        .collect();
    d.push(Block::List(variants));

    d.push(Block::Heading(format!(
        "Summary (batch {}, context {})",
        r.batch, r.context
    )));
    let summary: Vec<String> = r
        .variants
        .iter()
        .map(|v| {
            let vs = v.saved.as_ref().map_or(String::new(), |x| {
                format!(
                    "; {:.2}x faster than {}, {} fewer launches, {} less traffic",
                    x.speedup,
                    r.variants[0].name,
                    x.launches_per_step,
                    signed_bytes(x.bytes_per_step)
                )
            });
            format!(
                "{}: {} us/token, {} tokens/s, {} per million tokens, roofline MBU {}, {} launches \
                 and {} per step{vs}.",
                v.name,
                us(v.us_per_token),
                sig(v.tokens_per_s),
                dollars(v.dollars_per_million_tokens),
                pct(v.mbu),
                v.per_step.launches,
                bytes(v.per_step.bytes_read + v.per_step.bytes_written)
            )
        })
        .collect();
    d.push(Block::List(summary));

    per_step(&mut d, r);
    per_layer(&mut d, r);
    time_by_class(&mut d, r);
    for (i, v) in r.variants.iter().enumerate() {
        kernels(&mut d, r, v, i == 0);
    }
    d.push(Block::Chart {
        id: "roofline",
        caption: format!(
            "Roofline on {}: each kernel of the step is a point (identical kernels of \
             different layers share one; area by share of step time); lines are the \
             bandwidth slope and the math peaks.",
            g.name
        ),
        svg: svg::roofline(r),
    });
    context_sweep(&mut d, r);
    prefill(&mut d, r);
    batch_sweep(&mut d, r);
    gpus(&mut d, r);
    measured(&mut d, r);
    if !r.notes.is_empty() {
        d.push(Block::Heading(s("Notes")));
        d.push(Block::List(r.notes.clone()));
    }
    d
}

/// A row of a table with one column per variant.
fn line(t: &mut Table, r: &Report, label: impl Into<String>, f: impl Fn(&VariantReport) -> String) {
    let mut row = vec![label.into()];
    row.extend(r.variants.iter().map(f));
    t.row(row);
}

fn per_step(d: &mut Vec<Block>, r: &Report) {
    d.push(Block::Heading(s("Per step")));
    let base = &r.variants[0].name;
    let mut header = vec![s("")];
    header.extend(r.variants.iter().map(|v| v.name.clone()));
    let mut t = Table::new(header, 1);
    let saved = |v: &VariantReport, f: fn(&crate::assemble::Saved) -> String| {
        v.saved.as_ref().map_or(s("-"), f)
    };
    line(&mut t, r, "launches/step", |v| {
        v.per_step.launches.to_string()
    });
    line(&mut t, r, "launches/layer", |v| {
        format!("{:.1}", v.per_layer.launches)
    });
    line(&mut t, r, "bytes read/step", |v| {
        bytes(v.per_step.bytes_read)
    });
    line(&mut t, r, "bytes written/step", |v| {
        bytes(v.per_step.bytes_written)
    });
    line(&mut t, r, "bytes/step", |v| {
        bytes(v.per_step.bytes_read + v.per_step.bytes_written)
    });
    line(&mut t, r, "FLOPs/step", |v| count(v.per_step.flops));
    line(&mut t, r, "floor bytes/step", |v| bytes(v.floor_bytes));
    line(&mut t, r, "x floor", |v| format!("{:.3}", v.floor_ratio));
    line(&mut t, r, format!("launches saved vs {base}"), |v| {
        saved(v, |s| s.launches_per_step.to_string())
    });
    line(&mut t, r, format!("bytes saved vs {base}"), |v| {
        saved(v, |s| signed_bytes(s.bytes_per_step))
    });
    line(&mut t, r, "est. us/step", |v| us(v.per_step.us));
    line(&mut t, r, "est. us/token", |v| us(v.us_per_token));
    line(&mut t, r, "tokens/s", |v| sig(v.tokens_per_s));
    line(&mut t, r, format!("speedup vs {base}"), |v| {
        saved(v, |s| format!("{:.2}x", s.speedup))
    });
    line(&mut t, r, "$/M tokens", |v| {
        dollars(v.dollars_per_million_tokens)
    });
    line(&mut t, r, "MBU (roofline bound)", |v| pct(v.mbu));
    line(&mut t, r, "weights + KV cache", |v| bytes(v.resident_bytes));
    line(&mut t, r, "fits in GPU memory", |v| s(fits(v.fits)));
    d.push(Block::Table(t));
    let floors: Vec<String> = r
        .variants
        .iter()
        .map(|v| {
            let f = &v.floor;
            format!(
                "{} floor {} = weights {} + KV read {} + KV write {} + io {}",
                v.name,
                bytes(v.floor_bytes),
                bytes(f.weight_bytes),
                bytes(f.kv_read_bytes),
                bytes(f.kv_write_bytes),
                bytes(f.io_bytes)
            )
        })
        .collect();
    d.push(Block::List(floors));
}

fn per_layer(d: &mut Vec<Block>, r: &Report) {
    d.push(Block::Heading(format!(
        "Per layer (averaged over {} layers)",
        r.model.layers
    )));
    let mut t = Table::new(
        [
            "variant",
            "launches",
            "bytes read",
            "bytes written",
            "FLOPs",
            "est. us",
            "launches saved",
            "bytes saved",
        ]
        .map(s)
        .to_vec(),
        1,
    );
    for v in &r.variants {
        let l = &v.per_layer;
        t.row(vec![
            v.name.clone(),
            format!("{:.1}", l.launches),
            bytes(l.bytes_read.round() as u64),
            bytes(l.bytes_written.round() as u64),
            count(l.flops.round() as u64),
            us(l.us),
            v.saved
                .as_ref()
                .map_or(s("-"), |s| format!("{:.1}", s.launches_per_layer)),
            v.saved
                .as_ref()
                .map_or(s("-"), |s| signed_bytes(s.bytes_per_layer.round() as i64)),
        ]);
    }
    d.push(Block::Table(t));
}

fn time_by_class(d: &mut Vec<Block>, r: &Report) {
    d.push(Block::Heading(s(
        "Estimated time per step by kind of kernel (us)",
    )));
    let mut header = vec![s("")];
    header.extend(r.variants.iter().map(|v| v.name.clone()));
    let mut t = Table::new(header, 1);
    for (i, k) in KernelClass::ALL.iter().enumerate() {
        line(&mut t, r, k.label(), |v| us(v.time_by_class[i].us));
    }
    line(&mut t, r, "launch overhead", |v| {
        us(v.time_by_bound.launch_us)
    });
    line(&mut t, r, "total", |v| us(v.per_step.us));
    line(&mut t, r, "of which memory-bound", |v| {
        us(v.time_by_bound.memory_us)
    });
    line(&mut t, r, "of which compute-bound", |v| {
        us(v.time_by_bound.compute_us)
    });
    d.push(Block::Table(t));
    d.push(Block::Chart {
        id: "step-bars",
        caption: s("Estimated time per step, stacked by kind of kernel, one bar per variant."),
        svg: svg::step_bars(r),
    });
}

fn replaces(k: &KernelRow) -> String {
    if k.replaces.is_empty() {
        return s("-");
    }
    k.replaces
        .iter()
        .map(|r| {
            if r.count == 1 {
                r.op.clone()
            } else {
                format!("{} x{}", r.op, r.count)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn kernels(d: &mut Vec<Block>, r: &Report, v: &VariantReport, baseline: bool) {
    let per_layer: u64 = v
        .kernels
        .iter()
        .filter(|k| k.scope == "layer")
        .map(|k| k.count)
        .sum();
    let per_step: u64 = v
        .kernels
        .iter()
        .filter(|k| k.scope == "step")
        .map(|k| k.count)
        .sum();
    d.push(Block::Heading(format!("Kernels: {}", v.name)));
    d.push(Block::Para(format!(
        "{} kernels in layers ({:.1} per layer) and {} once per step, at batch {} and \
         context {}; identical kernels of different layers share a row. Bytes, FLOPs and \
         time are per launch; `first` numbers the first launch as in the variant's IR dump.",
        per_layer, v.per_layer.launches, per_step, r.batch, r.context
    )));
    let mut t = Table::new(
        [
            "launches",
            "scope",
            "kernel",
            "first",
            "read",
            "written",
            "FLOPs",
            "FLOP/B",
            "bound",
            "us each",
            "us all",
            "replaces (eager kernels)",
        ]
        .map(s)
        .to_vec(),
        0,
    );
    for (i, a) in t.align.iter_mut().enumerate() {
        if matches!(i, 1 | 2 | 3 | 8 | 11) {
            *a = Align::Left;
        }
    }
    t.folded = Some(baseline);
    for k in &v.kernels {
        t.row(vec![
            k.count.to_string(),
            k.scope.clone(),
            k.op.clone(),
            k.first.clone(),
            bytes(k.bytes_read),
            bytes(k.bytes_written),
            count(k.flops),
            sig(k.intensity),
            s(k.bound.name()),
            us(k.us),
            us(k.total_us),
            if k.replaced_kernels == 0 {
                s("-")
            } else {
                format!("{} ({})", k.replaced_kernels, replaces(k))
            },
        ]);
    }
    d.push(Block::Table(t));
}

fn context_sweep(d: &mut Vec<Block>, r: &Report) {
    let cs = &r.context_sweep;
    d.push(Block::Heading(format!(
        "Context sweep (batch {}): time per token against KV length",
        cs.batch
    )));
    let mut header = vec![s("context")];
    header.extend(r.variants.iter().map(|v| format!("{} us/token", v.name)));
    header.extend(r.variants.iter().map(|v| format!("{} tokens/s", v.name)));
    header.extend(r.variants.iter().map(|v| format!("{} KV read", v.name)));
    let mut t = Table::new(header, 0);
    for p in &cs.points {
        let mut row = vec![p.context.to_string()];
        row.extend(p.variants.iter().map(|x| {
            let mut cell = us(x.us_per_token);
            if x.fits == Some(false) {
                cell.push_str(" (no fit)");
            }
            cell
        }));
        row.extend(p.variants.iter().map(|x| sig(x.tokens_per_s)));
        row.extend(p.variants.iter().map(|x| bytes(x.kv_read_bytes)));
        t.row(row);
    }
    d.push(Block::Table(t));
    d.push(Block::Chart {
        id: "context-sweep",
        caption: format!(
            "Estimated time per token against context length at batch {}, one line per \
             variant.",
            cs.batch
        ),
        svg: svg::context_lines(r),
    });
}

fn prefill(d: &mut Vec<Block>, r: &Report) {
    let Some(p) = &r.prefill else { return };
    d.push(Block::Heading(format!(
        "Prefill: time to first token against prompt length (batch {}, chunks of at most {} tokens)",
        p.batch, p.chunk
    )));
    d.push(Block::Para(s(
        "Each chunk is the prefill graph of its tokens after the ones before it, under \
         the same kernel time model as the decode step (a roofline bound); the first \
         token comes with the last chunk. `then us/token` is the decode step that \
         follows, at the prompt's length.",
    )));
    let header = [
        "prompt",
        "variant",
        "chunks",
        "TTFT ms",
        "prefill tokens/s",
        "bound",
        "launches",
        "FLOPs",
        "then us/token",
    ];
    let mut t = Table::new(header.iter().map(|h| s(*h)).collect(), 2);
    for point in &p.points {
        for v in &point.variants {
            t.row(vec![
                point.prompt.to_string(),
                v.variant.clone(),
                v.chunks.to_string(),
                sig(v.ttft_us / 1e3),
                sig(v.prefill_tokens_per_s),
                s(v.bound.name()),
                count(v.launches),
                count(v.flops),
                us(v.decode_us_per_token),
            ]);
        }
    }
    d.push(Block::Table(t));
}

fn batch_sweep(d: &mut Vec<Block>, r: &Report) {
    let bs = &r.batch_sweep;
    d.push(Block::Heading(format!(
        "Batch sweep (context {}): where decode stops being memory-bound",
        bs.context
    )));
    let mut header = vec![s("batch")];
    for v in &r.variants {
        header.push(format!("{} us/token", v.name));
        header.push(format!("{} tokens/s", v.name));
        header.push(format!("{} $/Mtok", v.name));
        header.push(format!("{} bound", v.name));
    }
    let mut t = Table::new(header, 0);
    for p in &bs.points {
        let mut row = vec![p.batch.to_string()];
        for x in &p.variants {
            row.push(us(x.us_per_token));
            row.push(sig(x.tokens_per_s));
            row.push(dollars(x.dollars_per_million_tokens));
            let mut b = s(x.bound.name());
            if x.fits == Some(false) {
                b.push_str(" (no fit)");
            }
            row.push(b);
        }
        t.row(row);
    }
    d.push(Block::Table(t));
    d.push(Block::Para(s(
        "`bound` is the largest part of the step: memory time of memory-bound kernels, \
         math time of compute-bound ones, or launch overheads. `no fit`: the weights and \
         KV cache exceed the GPU's memory.",
    )));
    d.push(Block::Chart {
        id: "batch-sweep",
        caption: format!(
            "Estimated tokens/s against batch size at context {}, one line per variant \
             (hollow markers: does not fit in GPU memory).",
            bs.context
        ),
        svg: svg::batch_lines(r),
    });
}

fn opt(v: Option<f64>) -> String {
    v.map_or(s("-"), sig)
}

fn gpus(d: &mut Vec<Block>, r: &Report) {
    d.push(Block::Heading(s("GPUs")));
    d.push(Block::Para(format!(
        "Datasheet figures (dense) and, where a lent machine was measured, measured ones. \
         This report uses {} (marked *).",
        r.gpu.name
    )));
    let mut t = Table::new(
        [
            "gpu",
            "description",
            "HBM GB/s",
            "copy GB/s (measured)",
            "f32 TFLOP/s",
            "bf16 TFLOP/s",
            "bf16 GEMM (measured)",
            "fp8 TFLOP/s",
            "memory GB",
            "launch us",
            "source",
        ]
        .map(s)
        .to_vec(),
        2,
    );
    t.align[10] = Align::Left;
    for g in &r.gpus {
        let mark = if g.name == r.gpu.name { "*" } else { "" };
        t.row(vec![
            format!("{}{mark}", g.name),
            g.description.to_string(),
            sig(g.hbm_gbs),
            opt(g.measured_copy_gbs),
            sig(g.f32_tflops),
            sig(g.bf16_tflops),
            opt(g.measured_bf16_tflops),
            opt(g.fp8_tflops),
            opt(g.memory_gb),
            sig(g.launch_us),
            g.source.to_string(),
        ]);
    }
    d.push(Block::Table(t));
}

fn measured(d: &mut Vec<Block>, r: &Report) {
    d.push(Block::Heading(s("Predicted vs measured")));
    let m = &r.measured;
    d.push(Block::Subheading(format!("GPU ({})", r.gpu.name)));
    let file = m.file.as_deref().unwrap_or("no measurements file");
    if m.gpu.is_empty() {
        d.push(Block::Para(format!(
            "No GPU measurements of {} on {} ({file}; measurements of other models or GPUs ignored: {}). \
             A GPU check records its results in a measurements.toml file (format in \
             crates/fusec-report/README.md) that `fusec report --measurements` reads.",
            r.model.name, r.gpu.name, m.ignored
        )));
    } else {
        d.push(Block::Para(format!(
            "From {file} (measurements of other models or GPUs ignored: {}).",
            m.ignored
        )));
        let mut t = Table::new(
            [
                "variant",
                "batch",
                "context",
                "predicted us/token",
                "measured us/token",
                "measured/predicted",
                "launches pred/meas",
                "bytes pred/meas",
                "source",
            ]
            .map(s)
            .to_vec(),
            1,
        );
        t.align[8] = Align::Left;
        for c in &m.gpu {
            t.row(vec![
                c.variant.clone(),
                c.batch.to_string(),
                c.context.to_string(),
                us(c.predicted_us_per_token),
                us(c.measured_us_per_token),
                format!("{:.2}", c.ratio),
                format!(
                    "{} / {}",
                    c.predicted_launches_per_step,
                    c.measured_launches_per_step
                        .map_or(s("-"), |x| x.to_string())
                ),
                format!(
                    "{} / {}",
                    bytes(c.predicted_bytes_per_step),
                    c.measured_bytes_per_step.map_or(s("-"), bytes)
                ),
                c.source.clone(),
            ]);
        }
        d.push(Block::Table(t));
    }
    if !m.ignored_reasons.is_empty() {
        d.push(Block::List(m.ignored_reasons.clone()));
    }
    if let Some(c) = &m.cpu {
        d.push(Block::Subheading(s("CPU executor")));
        d.push(Block::Para(format!(
            "One step of `{}` at batch {}, context {} on {}: {} us wall time. The counts \
             are the executor's, from its runtime tensors; they {} the cost model's. CPU \
             times show where a CPU spends the step; they are not GPU predictions.",
            c.variant,
            c.batch,
            c.context,
            c.description,
            us(c.step_us),
            if c.counts_agree {
                "agree with"
            } else {
                "DISAGREE with"
            }
        )));
        let mut t = Table::new(
            [
                "op",
                "launches pred",
                "launches meas",
                "bytes pred",
                "bytes meas",
                "time us (meas)",
                "GB/s (meas)",
            ]
            .map(s)
            .to_vec(),
            1,
        );
        for row in c.rows.iter().chain(std::iter::once(&c.total)) {
            t.row(vec![
                row.op.clone(),
                row.predicted_launches.to_string(),
                row.measured_launches.to_string(),
                bytes(row.predicted_bytes),
                bytes(row.measured_bytes),
                us(row.measured_us),
                format!("{:.2}", row.gb_per_s),
            ]);
        }
        d.push(Block::Table(t));
    }
}
