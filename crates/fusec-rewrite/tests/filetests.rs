//! Rule tests as files, after Cranelift's filetests (`cranelift/filetests`): every
//! `tests/filetests/**/*.fir` is an IR graph in the text form with directives in `;`
//! comments (which the IR parser skips), so adding a rule test means adding a file.
//!
//! Directives, one per whole-line comment:
//!
//! - `; rules: norm mlp`: the built-in rule files (topics) to load, `all` (the default
//!   when absent) or `none`;
//! - `; rule-file: examples/rules/swiglu-up-first.rules`: a rule file, relative to the
//!   repository root;
//! - `;| ...`: a line of an inline rule file (the `--rules` syntax), topic `inline`;
//! - `; bind: B=1 S=31`: the symbol values the cost model uses (default `B=1 S=31`);
//! - `; gpu: h100-sxm`: the target of the cost model (the default);
//! - `; check: TEXT`: the fused IR contains TEXT after the end of the previous
//!   `check:` match (LLVM FileCheck's ordered `CHECK:`), provenance comments included,
//!   so `; check: rules=[...]` can follow the check of its op on the same line;
//! - `; not: TEXT`: no line of the fused IR contains TEXT in its code (provenance
//!   comments, which list the eager ops a node covers, are left out);
//! - `; near-miss: RULE [at %N]: TEXT`: RULE matched but a condition failed, with a
//!   reason containing TEXT (at eager position `%N` when given);
//! - `; no-near-miss: RULE`: RULE is not reported as a near miss;
//! - `; rejected: TEXT`: an application was rejected with an error containing TEXT;
//! - `; no-rejection:`: no application was rejected (a condition kept the rule from
//!   matching where its result would not type-check);
//! - `; output:`: the rest of the file is the whole expected fused IR, each line
//!   prefixed by `; `. Run with `FUSEC_BLESS=1` to write it from the current output
//!   (only files that have the marker are rewritten); review the diff.
//!
//! Any other `; word:` line is an error, so a misspelt directive cannot pass silently.
//! Every file runs; the test fails listing every failing file, not only the first.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use fusec_ir::{text, Bindings};
use fusec_rewrite::ruleset::BUILTIN_RULE_FILES;
use fusec_rewrite::{fuse, Limits, Options, RuleSet};

/// The marker of the expected-output block.
const OUTPUT: &str = "; output:";

/// One expectation about the fusion result.
#[derive(Debug)]
enum Directive {
    Check(String),
    Not(String),
    NearMiss {
        rule: String,
        at: Option<usize>,
        reason: String,
    },
    NoNearMiss(String),
    Rejected(String),
    NoRejection,
}

/// A parsed test file.
#[derive(Debug)]
struct FileTest {
    topics: Option<Vec<String>>,
    rule_files: Vec<String>,
    inline_rules: String,
    bindings: Bindings,
    gpu: String,
    /// Each directive with its 1-based line.
    directives: Vec<(usize, Directive)>,
    /// The expected output (lines without their `; ` prefix), when the file has the
    /// `; output:` block, and the byte offset where the block starts.
    output: Option<(usize, String)>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn parse_near_miss(value: &str) -> Result<Directive, String> {
    let (head, reason) = value
        .split_once(':')
        .ok_or("expected `RULE [at %N]: REASON`")?;
    let mut words = head.split_whitespace();
    let rule = words
        .next()
        .ok_or("a near miss names its rule")?
        .to_string();
    let at = match (words.next(), words.next(), words.next()) {
        (None, _, _) => None,
        (Some("at"), Some(n), None) => Some(
            n.trim_start_matches('%')
                .parse()
                .map_err(|_| format!("bad position `{n}`"))?,
        ),
        _ => return Err("expected `RULE [at %N]: REASON`".into()),
    };
    Ok(Directive::NearMiss {
        rule,
        at,
        reason: reason.trim().to_string(),
    })
}

fn parse_bindings(value: &str) -> Result<Bindings, String> {
    let mut b = Bindings::new();
    for pair in value.split_whitespace() {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("expected SYMBOL=VALUE, got `{pair}`"))?;
        let v: u64 = v.parse().map_err(|_| format!("bad value in `{pair}`"))?;
        b = b.with(k, v);
    }
    Ok(b)
}

impl FileTest {
    fn parse(src: &str) -> Result<FileTest, String> {
        let mut t = FileTest {
            topics: None,
            rule_files: Vec::new(),
            inline_rules: String::new(),
            bindings: Bindings::new().with("B", 1).with("S", 31),
            gpu: "h100-sxm".into(),
            directives: Vec::new(),
            output: None,
        };
        let mut offset = 0;
        for (i, line) in src.split_inclusive('\n').enumerate() {
            let line_no = i + 1;
            let start = offset;
            offset += line.len();
            let line = line.trim_end_matches(['\n', '\r']);
            if line == OUTPUT {
                let expected: Vec<&str> = src[offset..]
                    .lines()
                    .map(|l| l.strip_prefix("; ").unwrap_or(l.trim_start_matches(';')))
                    .collect();
                let mut text = expected.join("\n");
                if !text.is_empty() {
                    text.push('\n');
                }
                t.output = Some((start, text));
                break;
            }
            let Some(comment) = line.trim_start().strip_prefix(';') else {
                continue;
            };
            if let Some(rule_line) = comment.strip_prefix('|') {
                t.inline_rules
                    .push_str(rule_line.strip_prefix(' ').unwrap_or(rule_line));
                t.inline_rules.push('\n');
                continue;
            }
            let Some((key, value)) = comment.split_once(':') else {
                continue;
            };
            let key = key.trim();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                // Prose, not a directive.
                continue;
            }
            let value = value.trim();
            let err = |m: String| format!("line {line_no}: {m}");
            match key {
                "rules" => {
                    t.topics = match value {
                        "all" => None,
                        "none" => Some(Vec::new()),
                        v => Some(v.split_whitespace().map(String::from).collect()),
                    }
                }
                "rule-file" => t.rule_files.push(value.to_string()),
                "bind" => t.bindings = parse_bindings(value).map_err(err)?,
                "gpu" => t.gpu = value.to_string(),
                "check" => t.directives.push((line_no, Directive::Check(value.into()))),
                "not" => t.directives.push((line_no, Directive::Not(value.into()))),
                "near-miss" => t
                    .directives
                    .push((line_no, parse_near_miss(value).map_err(err)?)),
                "no-near-miss" => t
                    .directives
                    .push((line_no, Directive::NoNearMiss(value.into()))),
                "rejected" => t
                    .directives
                    .push((line_no, Directive::Rejected(value.into()))),
                "no-rejection" => t.directives.push((line_no, Directive::NoRejection)),
                other => return Err(err(format!("unknown directive `{other}:`"))),
            }
        }
        if t.directives.is_empty() && t.output.is_none() {
            return Err("the file states no expectation (`; check:` ... or `; output:`)".into());
        }
        Ok(t)
    }

    fn rule_set(&self) -> Result<RuleSet, String> {
        let mut set = RuleSet::empty();
        for (topic, text) in BUILTIN_RULE_FILES {
            let wanted = match &self.topics {
                None => true,
                Some(ts) => ts.iter().any(|t| t == topic),
            };
            if wanted {
                set.add_file(&format!("{topic}.rules"), text)
                    .map_err(|e| e.to_string())?;
            }
        }
        for t in self.topics.iter().flatten() {
            if !BUILTIN_RULE_FILES.iter().any(|(topic, _)| topic == t) {
                return Err(format!("no built-in rule file `{t}.rules`"));
            }
        }
        for f in &self.rule_files {
            let text = std::fs::read_to_string(repo_root().join(f))
                .map_err(|e| format!("rule file `{f}`: {e}"))?;
            set.add_file(f, &text).map_err(|e| e.to_string())?;
        }
        if !self.inline_rules.is_empty() {
            set.add_file("inline.rules", &self.inline_rules)
                .map_err(|e| e.to_string())?;
        }
        Ok(set)
    }
}

/// What running one file gave: its failures, and the file's text with the output block
/// rewritten when blessing changed it.
#[derive(Debug, Default)]
struct Outcome {
    failures: Vec<String>,
    blessed: Option<String>,
}

/// Runs one test file.
fn run(src: &str, bless: bool) -> Outcome {
    let mut out = Outcome::default();
    let test = match FileTest::parse(src) {
        Ok(t) => t,
        Err(e) => {
            out.failures.push(e);
            return out;
        }
    };
    let rules = match test.rule_set() {
        Ok(r) => r,
        Err(e) => {
            out.failures.push(format!("rules: {e}"));
            return out;
        }
    };
    let graph = match text::parse(src) {
        Ok(g) => g,
        Err(e) => {
            out.failures.push(format!("input graph: {e}"));
            return out;
        }
    };
    let Some(gpu) = fusec_ir::hardware::gpu(&test.gpu) else {
        out.failures.push(format!("unknown gpu `{}`", test.gpu));
        return out;
    };
    let opts = Options {
        rules: &rules,
        gpu,
        bindings: &test.bindings,
        limits: Limits::default(),
    };
    let (fused, report) = match fuse(&graph, &opts) {
        Ok(r) => r,
        Err(e) => {
            out.failures.push(format!("fusion failed: {e}"));
            return out;
        }
    };
    let printed = match text::print(&fused) {
        Ok(p) => p,
        Err(e) => {
            out.failures.push(format!("printing the fused graph: {e}"));
            return out;
        }
    };
    let lines: Vec<&str> = printed.lines().collect();
    // Where the next `check:` starts looking: the end of the previous match.
    let mut from = 0;
    for (line_no, d) in &test.directives {
        let fail = |m: String| format!("line {line_no}: {m}");
        match d {
            Directive::Check(s) => match printed[from..].find(s.as_str()) {
                Some(i) => from += i + s.len(),
                None => {
                    let after = printed[..from].lines().count();
                    out.failures.push(fail(format!(
                        "`check: {s}` is not found after output line {after}"
                    )))
                }
            },
            Directive::Not(s) => {
                if let Some(l) = lines.iter().find(|l| code(l).contains(s.as_str())) {
                    out.failures
                        .push(fail(format!("`not: {s}` matches `{}`", l.trim())));
                }
            }
            Directive::NearMiss { rule, at, reason } => {
                let found = report.near_misses.iter().any(|m| {
                    &m.rule == rule
                        && at.is_none_or(|a| a == m.at)
                        && m.reason.contains(reason.as_str())
                });
                if !found {
                    out.failures.push(fail(format!(
                        "no near miss of `{rule}`{} with `{reason}`; reported: {:?}",
                        at.map(|a| format!(" at %{a}")).unwrap_or_default(),
                        report.near_misses
                    )));
                }
            }
            Directive::NoNearMiss(rule) => {
                if let Some(m) = report.near_misses.iter().find(|m| &m.rule == rule) {
                    out.failures
                        .push(fail(format!("`{rule}` is a near miss: {m:?}")));
                }
            }
            Directive::NoRejection => {
                if !report.rejected.is_empty() {
                    out.failures
                        .push(fail(format!("rejected: {:?}", report.rejected)));
                }
            }
            Directive::Rejected(s) => {
                if !report
                    .rejected
                    .iter()
                    .any(|e| e.to_string().contains(s.as_str()))
                {
                    out.failures.push(fail(format!(
                        "no rejection contains `{s}`; rejected: {:?}",
                        report.rejected
                    )));
                }
            }
        }
    }
    if let Some((start, expected)) = &test.output {
        if *expected != printed {
            if bless {
                let mut text = src[..*start].to_string();
                text.push_str(OUTPUT);
                text.push('\n');
                for l in &lines {
                    let _ = writeln!(text, "; {l}");
                }
                out.blessed = Some(text);
            } else {
                out.failures.push(format!(
                    "the fused IR differs from the `; output:` block \
                     (FUSEC_BLESS=1 rewrites it):\n{}",
                    diff(expected, &printed)
                ));
            }
        }
    }
    if !out.failures.is_empty() {
        out.failures.push(format!("fused IR:\n{printed}"));
    }
    out
}

/// A line of IR without its provenance comment.
fn code(line: &str) -> &str {
    line.split_once(" ; ").map_or(line, |(c, _)| c)
}

/// The lines of `expected` and `actual` that differ, `-`/`+` prefixed, by position.
fn diff(expected: &str, actual: &str) -> String {
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let mut s = String::new();
    for i in 0..e.len().max(a.len()) {
        let (x, y) = (e.get(i), a.get(i));
        if x != y {
            if let Some(x) = x {
                let _ = writeln!(s, "-{x}");
            }
            if let Some(y) = y {
                let _ = writeln!(s, "+{y}");
            }
        }
    }
    s
}

/// Every `.fir` file under `dir`, sorted.
fn test_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("readable test directory") {
            let p = entry.expect("readable entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "fir") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_filetest_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests");
    let files = test_files(&dir);
    assert!(files.len() >= 9, "tests/filetests holds the rule tests");
    let bless = std::env::var_os("FUSEC_BLESS").is_some_and(|v| v == "1");
    let mut report = String::new();
    let mut failed = 0;
    for f in &files {
        let src = std::fs::read_to_string(f).expect("readable test file");
        let outcome = run(&src, bless);
        let name = f.strip_prefix(&dir).unwrap_or(f).display().to_string();
        if let Some(text) = outcome.blessed {
            std::fs::write(f, text).expect("writable test file");
            eprintln!("blessed {name}");
        }
        if !outcome.failures.is_empty() {
            failed += 1;
            let _ = writeln!(report, "FAIL {name}");
            for m in outcome.failures {
                let _ = writeln!(report, "  {}", m.replace('\n', "\n    "));
            }
        }
    }
    assert!(
        failed == 0,
        "{failed} of {} filetests failed:\n{report}",
        files.len()
    );
}

// The runner itself: a wrong expectation must fail.

const NEG_NEG: &str = r#"; rules: none
;| # -(-x) = x
;| rule neg-neg
;|   (unary.neg (unary.neg ?x))
;|   => ?x
graph "t" {
  %0 = input{name="x"} : f32[B,4]
  %1 = unary.neg(%0) : f32[B,4]
  %2 = unary.neg(%1) : f32[B,4]
  %3 = unary.exp(%2) : f32[B,4]
  output "y" = %3
}
"#;

fn failures_with(directives: &str) -> Vec<String> {
    run(&format!("{directives}\n{NEG_NEG}"), false).failures
}

#[test]
fn the_runner_passes_true_checks() {
    let f = failures_with("; check: unary.exp(%0)\n; not: unary.neg");
    assert!(f.is_empty(), "{f:?}");
}

#[test]
fn the_runner_fails_a_wrong_check() {
    let f = failures_with("; check: unary.neg");
    assert!(f.iter().any(|m| m.contains("`check: unary.neg`")), "{f:?}");
}

#[test]
fn the_runner_fails_checks_out_of_order() {
    let f = failures_with("; check: unary.exp\n; check: input{name=\"x\"}");
    assert!(
        f.iter()
            .any(|m| m.contains("line 2:") && m.contains("not found after output line 3")),
        "{f:?}"
    );
}

#[test]
fn the_runner_fails_a_matching_not() {
    let f = failures_with("; not: unary.exp");
    assert!(
        f.iter().any(|m| m.contains("`not: unary.exp` matches")),
        "{f:?}"
    );
}

#[test]
fn the_runner_fails_a_missing_near_miss_and_rejection() {
    let f = failures_with("; near-miss: neg-neg: anything\n; rejected: anything");
    assert!(
        f.iter().any(|m| m.contains("no near miss of `neg-neg`")),
        "{f:?}"
    );
    assert!(
        f.iter().any(|m| m.contains("no rejection contains")),
        "{f:?}"
    );
}

#[test]
fn the_runner_rejects_unknown_directives_and_files_without_expectations() {
    let f = failures_with("; chek: unary.exp");
    assert!(
        f.iter().any(|m| m.contains("unknown directive `chek:`")),
        "{f:?}"
    );
    let f = failures_with("");
    assert!(f.iter().any(|m| m.contains("no expectation")), "{f:?}");
}

#[test]
fn the_runner_compares_and_blesses_the_output_block() {
    let stale = format!("{NEG_NEG}; output:\n; graph \"t\" {{\n; }}\n");
    let f = run(&stale, false).failures;
    assert!(
        f.iter()
            .any(|m| m.contains("differs from the `; output:` block")),
        "{f:?}"
    );
    let blessed = run(&stale, true)
        .blessed
        .expect("blessing rewrites the block");
    assert!(blessed.starts_with(NEG_NEG), "{blessed}");
    assert!(
        blessed.contains("; output:\n; graph \"t\" ") && blessed.contains(";   %1 = unary.exp(%0)"),
        "{blessed}"
    );
    let again = run(&blessed, false);
    assert!(
        again.failures.is_empty() && again.blessed.is_none(),
        "{again:?}"
    );
}
