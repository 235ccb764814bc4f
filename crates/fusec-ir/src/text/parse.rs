//! Parser for the canonical text form (see [`super::print`]).

use std::collections::HashMap;

use super::token::{Cursor, LexError};
use crate::graph::{Graph, NodeId, OutputKind, Provenance};
use crate::op::Op;
use crate::types::Type;

/// A syntax or type error in IR text, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

fn at(line: usize, text: &str, offset: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        column: text[..offset.min(text.len())].chars().count() + 1,
        message: message.into(),
    }
}

fn lex(line: usize, text: &str, e: LexError) -> ParseError {
    at(line, text, e.offset, e.message)
}

/// Parses IR text into a graph. Every node's declared type is checked against the type
/// its op infers from its operands; run the verifier for the whole-graph invariants.
pub fn parse(src: &str) -> Result<Graph, ParseError> {
    let mut graph: Option<Graph> = None;
    let mut values: HashMap<usize, NodeId> = HashMap::new();
    let mut layer: Option<u32> = None;
    let mut closed = false;
    let mut last_line = 0;
    for (i, raw) in src.lines().enumerate() {
        let line_no = i + 1;
        last_line = line_no;
        // Split off the comment, outside string literals.
        let (code, comment) = split_comment(raw);
        let trimmed = code.trim_end();
        let mut c = Cursor::new(trimmed);
        c.skip_ws();
        if c.at_end() {
            continue;
        }
        if closed {
            return Err(at(line_no, raw, c.pos, "text after the end of the graph"));
        }
        let Some(g) = graph.as_mut() else {
            graph = Some(parse_header(&mut c).map_err(|e| lex(line_no, raw, e))?);
            continue;
        };
        if c.eat("}") {
            if layer.take().is_none() {
                closed = true;
            }
            continue;
        }
        if c.rest().starts_with("layer ") {
            c.expect("layer ").map_err(|e| lex(line_no, raw, e))?;
            c.skip_ws();
            let n = c.uint().map_err(|e| lex(line_no, raw, e))?;
            c.skip_ws();
            c.expect("{").map_err(|e| lex(line_no, raw, e))?;
            if layer.is_some() {
                return Err(at(line_no, raw, 0, "layer blocks do not nest"));
            }
            layer = Some(u32::try_from(n).map_err(|_| at(line_no, raw, 0, "layer too large"))?);
            continue;
        }
        for (kw, kind) in [("output ", OutputKind::Data), ("state ", OutputKind::State)] {
            if c.rest().starts_with(kw) {
                c.expect(kw).map_err(|e| lex(line_no, raw, e))?;
                c.skip_ws();
                let name = c.string().map_err(|e| lex(line_no, raw, e))?;
                c.skip_ws();
                c.expect("=").map_err(|e| lex(line_no, raw, e))?;
                c.skip_ws();
                let id = value_ref(&mut c, &values).map_err(|e| lex(line_no, raw, e))?;
                g.add_output(name, kind, id);
                break;
            }
        }
        if !c.rest().starts_with('%') {
            if !c.at_end() {
                return Err(at(
                    line_no,
                    raw,
                    c.pos,
                    "expected `%N = op...`, `layer N {`, `output`, `state` or `}`",
                ));
            }
            continue;
        }
        // %N = op(%a, %b) : type
        let def_at = c.pos;
        c.expect("%").map_err(|e| lex(line_no, raw, e))?;
        let n = c.uint().map_err(|e| lex(line_no, raw, e))? as usize;
        if n != values.len() {
            return Err(at(
                line_no,
                raw,
                def_at,
                format!(
                    "values must be numbered densely in order: expected %{}, found %{n}",
                    values.len()
                ),
            ));
        }
        c.skip_ws();
        c.expect("=").map_err(|e| lex(line_no, raw, e))?;
        c.skip_ws();
        let op_at = c.pos;
        let op: Op = c.op().map_err(|e| lex(line_no, raw, e))?;
        let mut operands = Vec::new();
        if c.eat("(") {
            loop {
                c.skip_ws();
                operands.push(value_ref(&mut c, &values).map_err(|e| lex(line_no, raw, e))?);
                c.skip_ws();
                if c.eat(")") {
                    break;
                }
                c.expect(",").map_err(|e| lex(line_no, raw, e))?;
            }
        }
        c.skip_ws();
        c.expect(":").map_err(|e| lex(line_no, raw, e))?;
        c.skip_ws();
        let ty_at = c.pos;
        let ty = c.ty().map_err(|e| lex(line_no, raw, e))?;
        c.skip_ws();
        if !c.at_end() {
            return Err(at(
                line_no,
                raw,
                c.pos,
                format!("unexpected `{}`", c.rest()),
            ));
        }
        let operand_types: Vec<&Type> = operands.iter().map(|&o| g.ty(o)).collect();
        let inferred = op
            .infer(&operand_types, Some(&ty))
            .map_err(|e| at(line_no, raw, op_at, e.to_string()))?;
        if inferred != ty {
            return Err(at(
                line_no,
                raw,
                ty_at,
                format!("declared type {ty} differs from the inferred type {inferred}"),
            ));
        }
        let id = g.add_typed(op, &operands, ty);
        let node = g.node_mut(id);
        node.layer = layer;
        if let Some(comment) = comment {
            node.provenance = parse_provenance(comment.trim());
        }
        values.insert(n, id);
    }
    match graph {
        None => Err(ParseError {
            line: 1,
            column: 1,
            message: "expected `graph \"name\" {`".into(),
        }),
        Some(_) if !closed => Err(ParseError {
            line: last_line.max(1),
            column: 1,
            message: "the graph is not closed with `}`".into(),
        }),
        Some(g) => Ok(g),
    }
}

fn parse_header(c: &mut Cursor<'_>) -> Result<Graph, LexError> {
    c.expect("graph")?;
    c.skip_ws();
    let name = c.string()?;
    let mut g = Graph::new(name);
    loop {
        c.skip_ws();
        if c.eat("{") {
            break;
        }
        let key = c.ident()?.to_string();
        c.expect("=")?;
        let start = c.pos;
        while matches!(c.peek(), Some(ch) if !ch.is_whitespace() && ch != '{') {
            c.pos += ch_len(c.peek());
        }
        if start == c.pos {
            return c.error(format!("graph attribute `{key}` has no value"));
        }
        g.attrs.insert(key, c.src[start..c.pos].to_string());
    }
    c.skip_ws();
    if !c.at_end() {
        return c.error("expected the end of the line after `{`");
    }
    Ok(g)
}

fn ch_len(c: Option<char>) -> usize {
    c.map_or(0, char::len_utf8)
}

fn value_ref(c: &mut Cursor<'_>, values: &HashMap<usize, NodeId>) -> Result<NodeId, LexError> {
    let at = c.pos;
    c.expect("%")?;
    let n = c.uint()? as usize;
    values.get(&n).copied().ok_or(LexError {
        offset: at,
        message: format!("%{n} is used before it is defined"),
    })
}

/// Splits `code ; comment` at the first `;` outside a string literal.
fn split_comment(line: &str) -> (&str, Option<&str>) {
    let mut in_string = false;
    let mut escaped = false;
    for (i, ch) in line.char_indices() {
        match ch {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            ';' if !in_string => return (&line[..i], Some(&line[i + 1..])),
            _ => {}
        }
    }
    (line, None)
}

/// Reads `rules=[a,b] covers=[x,y]`; any other comment carries no provenance.
fn parse_provenance(comment: &str) -> Provenance {
    let list = |key: &str| -> Vec<String> {
        let Some(start) = comment.find(&format!("{key}=[")) else {
            return Vec::new();
        };
        let rest = &comment[start + key.len() + 2..];
        let end = rest.find(']').unwrap_or(rest.len());
        rest[..end]
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    Provenance {
        rules: list("rules"),
        covers: list("covers"),
    }
}
