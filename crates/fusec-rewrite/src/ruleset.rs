//! Rule files and rule sets.
//!
//! A rule file is a list of rules, each preceded by a comment that states its algebra:
//!
//! ```text
//! # x * 1 = x
//! rule mul-one
//!   (binary.mul ?x (scalar{value=1.0}))
//!   => ?x
//! ```
//!
//! `if` adds conditions after the right-hand side: `if (is-state ?past)`. The built-in
//! rules are compiled in from `rules/*.rules` and loaded by the same parser as a
//! user's `--rules` file.

use std::collections::BTreeMap;
use std::sync::Arc;

use fusec_ir::text::token::Cursor;

use crate::condition::{builtin_conditions, builtin_signatures, ArgKind, CondFn};
use crate::pattern::Pat;
use crate::rule::{ArgPat, Condition, Rule, RuleError};

/// The built-in rule files, by topic, in the order they are loaded.
pub const BUILTIN_RULE_FILES: &[(&str, &str)] = &[
    ("algebra", include_str!("../rules/algebra.rules")),
    ("softmax", include_str!("../rules/softmax.rules")),
    ("norm", include_str!("../rules/norm.rules")),
    ("rope", include_str!("../rules/rope.rules")),
    ("kv", include_str!("../rules/kv.rules")),
    ("attention", include_str!("../rules/attention.rules")),
    ("mlp", include_str!("../rules/mlp.rules")),
    ("epilogue", include_str!("../rules/epilogue.rules")),
];

/// A syntax or validation error in a rule file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {}{message}", rule.as_ref().map(|r| format!("rule `{r}`: ")).unwrap_or_default())]
pub struct RuleFileError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub rule: Option<String>,
    pub message: String,
}

/// Rules and the conditions they may call.
#[derive(Clone)]
pub struct RuleSet {
    rules: Vec<Arc<Rule>>,
    conditions: BTreeMap<String, CondFn>,
    /// The argument kinds of the conditions whose signature is known (the built-in
    /// ones), checked when a rule is added.
    signatures: BTreeMap<String, Vec<ArgKind>>,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field(
                "rules",
                &self.rules.iter().map(|r| &r.name).collect::<Vec<_>>(),
            )
            .field("conditions", &self.conditions.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for RuleSet {
    fn default() -> Self {
        Self::empty()
    }
}

impl RuleSet {
    /// No rules, the built-in conditions.
    pub fn empty() -> Self {
        Self {
            rules: Vec::new(),
            conditions: builtin_conditions(),
            signatures: builtin_signatures(),
        }
    }

    /// The built-in rules.
    pub fn builtin() -> Result<Self, RuleFileError> {
        let mut set = Self::empty();
        for (topic, text) in BUILTIN_RULE_FILES {
            set.add_file(&format!("{topic}.rules"), text)?;
        }
        Ok(set)
    }

    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    pub fn condition(&self, name: &str) -> Option<CondFn> {
        self.conditions.get(name).cloned()
    }

    /// Registers a condition that rule files can call as `(name args...)`.
    pub fn register_condition(&mut self, name: &str, f: CondFn) {
        self.conditions.insert(name.to_string(), f);
        // A replaced built-in may take other arguments.
        self.signatures.remove(name);
    }

    /// Adds a rule written in Rust, after validating it.
    pub fn add_rule(&mut self, rule: Rule) -> Result<(), RuleError> {
        rule.validate(&|n| self.conditions.contains_key(n))?;
        self.check_signatures(&rule)?;
        if self.rules.iter().any(|r| r.name == rule.name) {
            return Err(RuleError {
                rule: rule.name,
                message: "a rule of this name is already loaded".into(),
            });
        }
        self.rules.push(Arc::new(rule));
        Ok(())
    }

    /// Every call of a condition whose signature is known passes as many arguments as
    /// it takes, each of the right kind.
    fn check_signatures(&self, rule: &Rule) -> Result<(), RuleError> {
        let fail = |message: String| {
            Err(RuleError {
                rule: rule.name.clone(),
                message,
            })
        };
        for c in &rule.conditions {
            let Condition::Named { name, args } = c else {
                continue;
            };
            let Some(kinds) = self.signatures.get(name) else {
                continue;
            };
            if kinds.len() != args.len() {
                let wanted: Vec<&str> = kinds.iter().map(|k| k.describe()).collect();
                return fail(format!(
                    "condition `{name}` takes {} argument{} ({}), the rule gives {}",
                    kinds.len(),
                    if kinds.len() == 1 { "" } else { "s" },
                    wanted.join(", "),
                    args.len()
                ));
            }
            for (i, (kind, arg)) in kinds.iter().zip(args).enumerate() {
                let ok = match arg {
                    ArgPat::Var(_) => *kind == ArgKind::Class,
                    ArgPat::AttrVar(_) => *kind != ArgKind::Class,
                    ArgPat::Lit(lit) => kind.accepts(lit),
                };
                if !ok {
                    return fail(format!(
                        "argument {} of condition `{name}` must be {}",
                        i + 1,
                        kind.describe()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Parses a rule file and adds its rules. `file` names it in errors and is its topic.
    pub fn add_file(&mut self, file: &str, text: &str) -> Result<(), RuleFileError> {
        let topic = file
            .rsplit('/')
            .next()
            .unwrap_or(file)
            .trim_end_matches(".rules");
        for (rule, at) in parse_rules(file, topic, text)? {
            let name = rule.name.clone();
            self.add_rule(rule).map_err(|e| {
                let (line, column) = fusec_ir::text::line_col(text, at);
                RuleFileError {
                    file: file.to_string(),
                    line,
                    column,
                    rule: Some(name),
                    message: e.message,
                }
            })?;
        }
        Ok(())
    }
}

/// Replaces `#` comments with spaces, keeping offsets, and returns each comment line's
/// text by line start offset.
fn strip_comments(text: &str) -> (String, Vec<(usize, String)>) {
    let mut code = String::with_capacity(text.len());
    let mut comments = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        match line.find('#') {
            Some(i) => {
                code.push_str(&line[..i]);
                let rest = &line[i..];
                // One space per byte, so that offsets into `code` are offsets into
                // `text` even where a comment holds multi-byte characters.
                for c in rest.chars() {
                    if c == '\n' {
                        code.push('\n');
                    } else {
                        code.extend(std::iter::repeat_n(' ', c.len_utf8()));
                    }
                }
                if line[..i].trim().is_empty() {
                    comments.push((offset, rest[1..].trim().to_string()));
                }
            }
            None => code.push_str(line),
        }
        offset += line.len();
    }
    (code, comments)
}

fn parse_rules(file: &str, topic: &str, text: &str) -> Result<Vec<(Rule, usize)>, RuleFileError> {
    let (code, comments) = strip_comments(text);
    let err = |at: usize, rule: Option<&str>, message: String| {
        let (line, column) = fusec_ir::text::line_col(text, at);
        RuleFileError {
            file: file.to_string(),
            line,
            column,
            rule: rule.map(String::from),
            message,
        }
    };
    // Rule starts: `rule` as the first word of a line.
    let mut starts = Vec::new();
    let mut offset = 0;
    for line in code.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with("rule ") || trimmed == "rule" || trimmed == "rule\n" {
            starts.push(offset + (line.len() - trimmed.len()));
        } else if !trimmed.trim().is_empty() && starts.is_empty() {
            return Err(err(offset, None, "expected `rule NAME`".into()));
        }
        offset += line.len();
    }
    let mut rules = Vec::new();
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(code.len());
        let body = &code[..end];
        let mut pos = start + "rule".len();
        // The name.
        while body[pos..].starts_with([' ', '\t']) {
            pos += 1;
        }
        let name_len = body[pos..]
            .find(|c: char| c.is_whitespace())
            .unwrap_or(body.len() - pos);
        let name = body[pos..pos + name_len].to_string();
        if name.is_empty() {
            return Err(err(pos, None, "a rule needs a name".into()));
        }
        pos += name_len;
        // The algebra: the comment lines directly above the rule.
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let mut algebra_lines = Vec::new();
        let mut expect_end = line_start;
        for (at, c) in comments.iter().rev() {
            let line_end = text[*at..].find('\n').map_or(text.len(), |i| at + i + 1);
            if line_end == expect_end {
                algebra_lines.push(c.clone());
                expect_end = *at;
            } else if *at < expect_end {
                break;
            }
        }
        algebra_lines.reverse();
        let lhs = Pat::parse_at(body, &mut pos).map_err(|e| {
            err(
                e.offset,
                Some(&name),
                format!("left-hand side: {}", e.message),
            )
        })?;
        skip_ws(body, &mut pos);
        if !body[pos..].starts_with("=>") {
            return Err(err(
                pos,
                Some(&name),
                "expected `=>` after the left-hand side".into(),
            ));
        }
        pos += 2;
        let rhs = Pat::parse_at(body, &mut pos).map_err(|e| {
            err(
                e.offset,
                Some(&name),
                format!("right-hand side: {}", e.message),
            )
        })?;
        skip_ws(body, &mut pos);
        let mut conditions = Vec::new();
        if body[pos..].starts_with("if") {
            let if_at = pos;
            pos += 2;
            if body[pos..end].trim().is_empty() {
                return Err(err(if_at, Some(&name), "`if` without a condition".into()));
            }
            if !body[pos..end].starts_with(char::is_whitespace) {
                return Err(err(
                    if_at,
                    Some(&name),
                    "`if` must be followed by conditions `(name args...)`".into(),
                ));
            }
            loop {
                skip_ws(body, &mut pos);
                if pos >= end {
                    break;
                }
                conditions.push(
                    parse_condition(body, &mut pos).map_err(|(at, m)| err(at, Some(&name), m))?,
                );
            }
        }
        skip_ws(body, &mut pos);
        if pos < end {
            return Err(err(
                pos,
                Some(&name),
                format!("unexpected `{}`", body[pos..end].trim()),
            ));
        }
        rules.push((
            Rule {
                name,
                topic: topic.to_string(),
                algebra: algebra_lines.join("\n"),
                lhs,
                rhs,
                conditions,
                location: Some(format!(
                    "{file}:{}",
                    fusec_ir::text::line_col(text, start).0
                )),
            },
            start,
        ));
    }
    Ok(rules)
}

fn skip_ws(s: &str, pos: &mut usize) {
    while let Some(c) = s[*pos..].chars().next() {
        if c.is_whitespace() {
            *pos += c.len_utf8();
        } else {
            break;
        }
    }
}

/// `(name ?x $a 2.0 ...)`.
fn parse_condition(body: &str, pos: &mut usize) -> Result<Condition, (usize, String)> {
    if !body[*pos..].starts_with('(') {
        return Err((*pos, "expected a condition `(name args...)`".into()));
    }
    *pos += 1;
    let mut c = Cursor::new(body);
    c.pos = *pos;
    c.skip_ws();
    let name = c
        .ident_with_dash()
        .map_err(|e| (e.offset, e.message))?
        .to_string();
    let mut args = Vec::new();
    loop {
        while c.peek().is_some_and(char::is_whitespace) {
            c.pos += 1;
        }
        if c.eat(")") {
            break;
        }
        if c.at_end() {
            return Err((c.pos, "unclosed condition".into()));
        }
        let arg = if c.eat("?") {
            ArgPat::Var(
                c.ident_with_dash()
                    .map_err(|e| (e.offset, e.message))?
                    .to_string(),
            )
        } else if c.eat("$") {
            ArgPat::AttrVar(c.ident().map_err(|e| (e.offset, e.message))?.to_string())
        } else {
            let at = c.pos;
            let lit = c.attr_value().map_err(|e| (e.offset, e.message))?;
            crate::pattern::check_literal(&lit, at).map_err(|e| (e.offset, e.message))?;
            ArgPat::Lit(lit)
        };
        args.push(arg);
    }
    *pos = c.pos;
    Ok(Condition::Named { name, args })
}
