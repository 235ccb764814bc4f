//! A small cursor over one line of text, shared by the IR parser and op-token parsing
//! (the rule files of `fusec-rewrite` use op tokens too).

use std::collections::BTreeMap;

use crate::dtype::DType;
use crate::op::{op_from_parts, Attr, Op, OpParseError};

use crate::shape::{Dim, Shape};
use crate::types::{TensorType, Type};

/// The largest dimension (or symbol offset) the text form accepts.
pub const MAX_DIM: u64 = 1 << 40;
/// The most elements the fixed dimensions of one shape may hold together.
pub const MAX_FIXED_ELEMENTS: u64 = 1 << 50;

/// A position-tracking reader over a string. Errors carry the byte offset at which
/// they occurred; callers turn offsets into line and column.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    pub src: &'a str,
    pub pos: usize,
}

/// An error at a byte offset of the cursor's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LexError {
    pub offset: usize,
    pub message: String,
}

pub type LexResult<T> = Result<T, LexError>;

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

impl<'a> Cursor<'a> {
    pub fn new(src: &'a str) -> Self {
        Self { src, pos: 0 }
    }

    pub fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    pub fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    pub fn at_end(&self) -> bool {
        self.pos >= self.src.len()
    }

    pub fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if c == ' ' || c == '\t' {
                self.pos += c.len_utf8();
            } else {
                break;
            }
        }
    }

    pub fn error<T>(&self, message: impl Into<String>) -> LexResult<T> {
        Err(LexError {
            offset: self.pos,
            message: message.into(),
        })
    }

    /// Consumes `s` if the input continues with it.
    pub fn eat(&mut self, s: &str) -> bool {
        if self.rest().starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    pub fn expect(&mut self, s: &str) -> LexResult<()> {
        if self.eat(s) {
            Ok(())
        } else {
            let found: String = self.rest().chars().take(12).collect();
            if found.is_empty() {
                self.error(format!("expected `{s}`, found the end of the line"))
            } else {
                self.error(format!("expected `{s}`, found `{found}`"))
            }
        }
    }

    /// An identifier: letters, digits, `_` and `.`.
    pub fn ident(&mut self) -> LexResult<&'a str> {
        self.name_while(is_ident_char)
    }

    /// A name that may also contain `-` (rule and condition names).
    pub fn ident_with_dash(&mut self) -> LexResult<&'a str> {
        self.name_while(|c| is_ident_char(c) || c == '-')
    }

    /// The longest non-empty run of characters satisfying `accept`.
    fn name_while(&mut self, accept: impl Fn(char) -> bool) -> LexResult<&'a str> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if accept(c) {
                self.pos += c.len_utf8();
            } else {
                break;
            }
        }
        if start == self.pos {
            return self.error("expected a name");
        }
        Ok(&self.src[start..self.pos])
    }

    /// A weight name after `@`: anything up to whitespace, `(`, `)` or `,`.
    pub fn weight_name(&mut self) -> LexResult<&'a str> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c.is_whitespace() || matches!(c, '(' | ')' | ',') {
                break;
            }
            self.pos += c.len_utf8();
        }
        if start == self.pos {
            return self.error("expected a weight name after `@`");
        }
        Ok(&self.src[start..self.pos])
    }

    pub fn uint(&mut self) -> LexResult<u64> {
        let start = self.pos;
        while matches!(self.peek(), Some(c) if c.is_ascii_digit()) {
            self.pos += 1;
        }
        if start == self.pos {
            return self.error("expected a number");
        }
        self.src[start..self.pos].parse().map_err(|_| LexError {
            offset: start,
            message: "number too large".into(),
        })
    }

    /// A double-quoted string with the escapes Rust's `{:?}` writes, which is how the
    /// printer quotes names: `\"`, `\\`, `\n`, `\t`, `\r`, `\0`, `\'` and `\u{HEX}`
    /// (a name holding any character then prints and parses back).
    pub fn string(&mut self) -> LexResult<String> {
        self.expect("\"")?;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return self.error("unterminated string");
            };
            self.pos += c.len_utf8();
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let Some(e) = self.peek() else {
                        return self.error("unterminated string");
                    };
                    self.pos += e.len_utf8();
                    out.push(match e {
                        '"' => '"',
                        '\\' => '\\',
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        '0' => '\0',
                        '\'' => '\'',
                        'u' => self.unicode_escape()?,
                        other => return self.error(format!("unknown escape `\\{other}`")),
                    });
                }
                c => out.push(c),
            }
        }
    }

    /// The `{HEX}` of a `\u{HEX}` escape, as a character.
    fn unicode_escape(&mut self) -> LexResult<char> {
        let start = self.pos;
        if !self.eat("{") {
            return self.error("expected `{` after `\\u`");
        }
        let digits = self.pos;
        while matches!(self.peek(), Some(c) if c.is_ascii_hexdigit()) {
            self.pos += 1;
        }
        let hex = &self.src[digits..self.pos];
        if !self.eat("}") || hex.is_empty() || hex.len() > 6 {
            return Err(LexError {
                offset: start,
                message: "expected `{HEX}` after `\\u`".into(),
            });
        }
        u32::from_str_radix(hex, 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| LexError {
                offset: start,
                message: format!("`\\u{{{hex}}}` is not a character"),
            })
    }

    /// A shape: `[64,B,S+1]`.
    pub fn shape(&mut self) -> LexResult<Shape> {
        self.expect("[")?;
        let mut dims = Vec::new();
        if self.eat("]") {
            return Ok(Shape(dims));
        }
        // The product of the fixed dimensions so far, bounded so that element and byte
        // counts of parsed graphs stay far from 64-bit overflow.
        let mut fixed: u64 = 1;
        loop {
            let dim_at = self.pos;
            let dim = if matches!(self.peek(), Some(c) if c.is_ascii_digit()) {
                Dim::Fixed(self.uint()?)
            } else if self.eat("min(") {
                // A ring buffer's length, `min(S+1,8)`.
                let start = self.pos;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == '_') {
                    self.pos += 1;
                }
                if start == self.pos {
                    return self.error("expected a symbol in `min(..)`");
                }
                let name = self.src[start..self.pos].to_string();
                let plus = if self.eat("+") { self.uint()? } else { 0 };
                self.expect(",")?;
                let window = self.uint()?;
                self.expect(")")?;
                Dim::Window { name, plus, window }
            } else {
                let start = self.pos;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == '_') {
                    self.pos += 1;
                }
                if start == self.pos {
                    return self.error("expected a dimension (a number or a symbol)");
                }
                let name = &self.src[start..self.pos];
                let plus = if self.eat("+") { self.uint()? } else { 0 };
                Dim::Sym {
                    name: name.to_string(),
                    plus,
                }
            };
            let value = match &dim {
                Dim::Fixed(v) => *v,
                Dim::Sym { plus, .. } => *plus,
                Dim::Window { plus, window, .. } => (*plus).max(*window),
            };
            fixed = fixed.saturating_mul(value.max(1));
            if value > MAX_DIM || fixed > MAX_FIXED_ELEMENTS {
                return Err(LexError {
                    offset: dim_at,
                    message: format!(
                        "dimension {value} makes the shape too large (at most {MAX_DIM} a dimension and {MAX_FIXED_ELEMENTS} elements)"
                    ),
                });
            }
            dims.push(dim);
            if self.eat("]") {
                return Ok(Shape(dims));
            }
            self.expect(",")?;
        }
    }

    pub fn dtype(&mut self) -> LexResult<DType> {
        let start = self.pos;
        let name = self.ident()?;
        name.parse::<DType>().map_err(|e| LexError {
            offset: start,
            message: e.to_string(),
        })
    }

    pub fn tensor_type(&mut self) -> LexResult<TensorType> {
        let dtype = self.dtype()?;
        let shape = self.shape()?;
        Ok(TensorType::new(dtype, shape))
    }

    /// A type: `f32[B,64]` or a tuple `(f32[B,64], f32[B,2,S+1,16])`.
    pub fn ty(&mut self) -> LexResult<Type> {
        if self.eat("(") {
            let mut ts = Vec::new();
            loop {
                self.skip_ws();
                ts.push(self.tensor_type()?);
                self.skip_ws();
                if self.eat(")") {
                    return Ok(Type::Tuple(ts));
                }
                self.expect(",")?;
            }
        }
        Ok(Type::Tensor(self.tensor_type()?))
    }

    /// An attribute value (see [`Attr`]).
    pub fn attr_value(&mut self) -> LexResult<Attr> {
        match self.peek() {
            Some('"') => Ok(Attr::Str(self.string()?)),
            Some('[') => Ok(Attr::Shape(self.shape()?)),
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' => {
                let start = self.pos;
                self.pos += 1;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'))
                {
                    self.pos += 1;
                }
                let text = &self.src[start..self.pos];
                if let Ok(v) = text.parse::<i64>() {
                    return Ok(Attr::Int(v));
                }
                text.parse::<f64>().map(Attr::Float).map_err(|_| LexError {
                    offset: start,
                    message: format!("`{text}` is not a number"),
                })
            }
            _ => {
                let start = self.pos;
                let word = self.ident()?;
                match word {
                    "true" => Ok(Attr::Bool(true)),
                    "false" => Ok(Attr::Bool(false)),
                    "inf" => Ok(Attr::Float(f64::INFINITY)),
                    "NaN" => Ok(Attr::Float(f64::NAN)),
                    _ => word
                        .parse::<DType>()
                        .map(Attr::DType)
                        .map_err(|_| LexError {
                            offset: start,
                            message: format!("`{word}` is not an attribute value"),
                        }),
                }
            }
        }
    }

    /// An op token: `name`, `name{k=v,...}`, or `weight@name`.
    pub fn op(&mut self) -> LexResult<Op> {
        let start = self.pos;
        let name = self.ident()?;
        let mut attrs = BTreeMap::new();
        if self.eat("{") {
            loop {
                let key_at = self.pos;
                let key = self.ident()?;
                self.expect("=")?;
                let value = self.attr_value()?;
                if attrs.insert(key.to_string(), value).is_some() {
                    return Err(LexError {
                        offset: key_at,
                        message: format!("attribute `{key}` given twice"),
                    });
                }
                if self.eat("}") {
                    break;
                }
                self.expect(",")?;
            }
        }
        let weight_name = if self.eat("@") {
            Some(self.weight_name()?.to_string())
        } else {
            None
        };
        op_from_parts(name, attrs, weight_name).map_err(|e| LexError {
            offset: start,
            message: e.to_string(),
        })
    }
}

/// Parses a whole op token (see [`Op`]'s `FromStr`).
pub fn parse_op_token(token: &str) -> Result<Op, OpParseError> {
    let mut c = Cursor::new(token);
    let op = c.op().map_err(|e| OpParseError {
        offset: e.offset,
        message: e.message,
    })?;
    if !c.at_end() {
        return Err(OpParseError {
            offset: c.pos,
            message: format!("unexpected `{}` after the op", c.rest()),
        });
    }
    Ok(op)
}

impl std::str::FromStr for Op {
    type Err = OpParseError;

    /// Parses an op token as printed by `Display`.
    fn from_str(token: &str) -> Result<Op, OpParseError> {
        parse_op_token(token)
    }
}
