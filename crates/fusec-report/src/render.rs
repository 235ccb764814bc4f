//! The four forms of a report: text and Markdown (tables only), HTML (tables and
//! charts, one self-contained page), and JSON (the report's data).

use std::fmt::Write;

use crate::assemble::Report;
use crate::doc::{document, Align, Block, Table};
use crate::error::ReportError;
use crate::svg::esc;

/// Width that text paragraphs wrap at.
const WRAP: usize = 96;

/// The report's data as pretty-printed JSON.
pub fn json(r: &Report) -> Result<String, ReportError> {
    serde_json::to_string_pretty(r)
        .map(|s| s + "\n")
        .map_err(|e| ReportError::Internal(format!("cannot serialise the report: {e}")))
}

/// The words of a text, with a unit kept on the line of its number (`264.72 kB`).
fn words(text: &str) -> Vec<String> {
    const UNITS: [&str; 11] = ["B", "kB", "MB", "GB", "TB", "us", "k", "M", "G", "T", "ms"];
    let mut out: Vec<String> = Vec::new();
    for w in text.split_whitespace() {
        let unit = UNITS.contains(&w.trim_end_matches([',', '.', ';', ')']));
        match out.last_mut() {
            Some(prev) if unit && prev.ends_with(|c: char| c.is_ascii_digit()) => {
                prev.push(' ');
                prev.push_str(w);
            }
            _ => out.push(w.to_string()),
        }
    }
    out
}

/// Greedy word wrap; `indent` starts every line after the first.
fn wrap(text: &str, first: &str, indent: &str) -> String {
    let mut out = String::new();
    let mut line = first.to_string();
    let mut empty = true;
    for word in words(text) {
        if !empty && line.chars().count() + 1 + word.chars().count() > WRAP {
            out.push_str(line.trim_end());
            out.push('\n');
            line = indent.to_string();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(&word);
        empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

fn pad(cell: &str, width: usize, align: Align) -> String {
    let n = cell.chars().count();
    let fill = " ".repeat(width.saturating_sub(n));
    match align {
        Align::Left => format!("{cell}{fill}"),
        Align::Right => format!("{fill}{cell}"),
    }
}

fn text_table(t: &Table) -> String {
    let cols = t.header.len();
    let mut widths: Vec<usize> = t.header.iter().map(|h| h.chars().count()).collect();
    for row in &t.rows {
        for (i, c) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate().take(cols) {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(&pad(c, widths[i], t.align[i]));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&t.header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(&rule);
    for row in &t.rows {
        line(row);
    }
    out
}

/// The plain-text form.
pub fn text(r: &Report) -> String {
    let mut out = String::new();
    for block in document(r) {
        match block {
            Block::Title(t) => {
                let _ = writeln!(out, "{t}\n{}", "=".repeat(t.chars().count()));
            }
            Block::Heading(h) => {
                let _ = writeln!(out, "\n== {h}");
            }
            Block::Subheading(h) => {
                let _ = writeln!(out, "\n-- {h}");
            }
            Block::Para(p) => {
                out.push('\n');
                out.push_str(&wrap(&p, "", ""));
            }
            Block::List(items) => {
                out.push('\n');
                for i in items {
                    out.push_str(&wrap(&i, "- ", "  "));
                }
            }
            Block::Table(t) => {
                out.push('\n');
                out.push_str(&text_table(&t));
            }
            Block::Chart { .. } => {}
        }
    }
    out
}

/// Escapes the dollar signs of prices, which some Markdown renderers read as math.
fn md_text(s: &str) -> String {
    s.replace('$', "\\$")
}

fn md_cell(s: &str) -> String {
    md_text(s).replace('|', "\\|")
}

/// The Markdown form: the same tables, without the charts.
pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    for block in document(r) {
        match block {
            Block::Title(t) => {
                let _ = writeln!(
                    out,
                    "# {t}\n\nCharts are in the HTML form (`fusec report --format html`)."
                );
            }
            Block::Heading(h) => {
                let _ = writeln!(out, "\n## {h}");
            }
            Block::Subheading(h) => {
                let _ = writeln!(out, "\n### {h}");
            }
            Block::Para(p) => {
                let _ = writeln!(out, "\n{}", md_text(&p));
            }
            Block::List(items) => {
                out.push('\n');
                for i in items {
                    let _ = writeln!(out, "- {}", md_text(&i));
                }
            }
            Block::Table(t) => {
                out.push('\n');
                let header: Vec<String> = t.header.iter().map(|h| md_cell(h)).collect();
                let _ = writeln!(out, "| {} |", header.join(" | "));
                let rule: Vec<&str> = t
                    .align
                    .iter()
                    .map(|a| match a {
                        Align::Left => "---",
                        Align::Right => "---:",
                    })
                    .collect();
                let _ = writeln!(out, "| {} |", rule.join(" | "));
                for row in &t.rows {
                    let cells: Vec<String> = row.iter().map(|c| md_cell(c)).collect();
                    let _ = writeln!(out, "| {} |", cells.join(" | "));
                }
            }
            Block::Chart { .. } => {}
        }
    }
    out
}

/// Escapes text for HTML and turns `backticks` into `<code>`.
fn inline(s: &str) -> String {
    let escaped = esc(s);
    let mut out = String::with_capacity(escaped.len());
    let mut open = false;
    for c in escaped.chars() {
        if c == '`' {
            out.push_str(if open { "</code>" } else { "<code>" });
            open = !open;
        } else {
            out.push(c);
        }
    }
    if open {
        out.push_str("</code>");
    }
    out
}

const STYLE: &str =
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;\
max-width:1200px;padding:0 1em;color:#222;line-height:1.45}\
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}\
h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #eee}\
h3{font-size:1.05em}\
table{border-collapse:collapse;margin:.6em 0;font-size:.86em}\
th,td{border:1px solid #ddd;padding:.25em .55em;vertical-align:top}\
th{background:#f4f4f4}td.r{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
td:first-child{white-space:nowrap}\
tr:nth-child(even) td{background:#fafafa}\
figure{margin:1em 0}figcaption{font-size:.9em;color:#555;max-width:760px}\
svg{max-width:100%;height:auto;border:1px solid #eee}\
code{background:#f2f2f2;padding:0 .2em;border-radius:3px}\
details summary{cursor:pointer;color:#1f4e99;margin:.4em 0}\
.scroll{overflow-x:auto}";

fn html_table(t: &Table) -> String {
    let mut out = String::from("<div class=\"scroll\"><table>\n<thead><tr>");
    for h in &t.header {
        let _ = write!(out, "<th>{}</th>", inline(h));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for row in &t.rows {
        out.push_str("<tr>");
        for (i, c) in row.iter().enumerate() {
            let class = match t.align.get(i) {
                Some(Align::Right) => " class=\"r\"",
                _ => "",
            };
            let _ = write!(out, "<td{class}>{}</td>", inline(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table></div>\n");
    match t.folded {
        None => out,
        Some(folded) => format!(
            "<details{}><summary>{} kernels (rows)</summary>\n{out}</details>\n",
            if folded { "" } else { " open" },
            t.rows.len()
        ),
    }
}

/// The HTML form: one page with inline CSS and SVG, no scripts, no external links,
/// which opens from disk without a server.
pub fn html(r: &Report) -> String {
    let mut body = String::new();
    let mut title = String::new();
    for block in document(r) {
        match block {
            Block::Title(t) => {
                let _ = writeln!(body, "<h1>{}</h1>", inline(&t));
                title = t;
            }
            Block::Heading(h) => {
                let _ = writeln!(body, "<h2>{}</h2>", inline(&h));
            }
            Block::Subheading(h) => {
                let _ = writeln!(body, "<h3>{}</h3>", inline(&h));
            }
            Block::Para(p) => {
                let _ = writeln!(body, "<p>{}</p>", inline(&p));
            }
            Block::List(items) => {
                body.push_str("<ul>\n");
                for i in items {
                    let _ = writeln!(body, "<li>{}</li>", inline(&i));
                }
                body.push_str("</ul>\n");
            }
            Block::Table(t) => body.push_str(&html_table(&t)),
            Block::Chart { id, caption, svg } => {
                let _ = write!(
                    body,
                    "<figure id=\"fig-{id}\">\n{svg}<figcaption>{}</figcaption>\n</figure>\n",
                    inline(&caption)
                );
            }
        }
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"generator\" content=\"fusec report ({})\">\n<title>{}</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        r.schema,
        esc(&title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_breaks_between_words() {
        let long = "word ".repeat(40);
        let w = wrap(&long, "- ", "  ");
        assert!(w.lines().all(|l| l.chars().count() <= WRAP));
        assert!(w.starts_with("- word"));
        assert!(w.lines().nth(1).is_some_and(|l| l.starts_with("  word")));
    }

    #[test]
    fn inline_code_and_escapes() {
        assert_eq!(inline("a `b<c>` d"), "a <code>b&lt;c&gt;</code> d");
    }
}
