//! The layout's two rules, checked on the sources (`cargo test --test layering`):
//!
//! 1. Crates follow the pipeline one way: a crate depends (normally or for its tests)
//!    only on crates of earlier stages, and no library crate depends on the `fusec`
//!    package (the CLI).
//! 2. No two files of a crate import each other in a circle: the graph of `use crate::`,
//!    `use super::` and inline `crate::`/`super::` paths between a crate's files has no
//!    cycle. A path to an item that a module only re-exports (`pub use a::X`) leads to
//!    the file that defines it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use petgraph::algo::tarjan_scc;
use petgraph::graph::DiGraph;

/// The stages in pipeline order: each may depend only on the ones before it.
const STAGES: &[&str] = &[
    "fusec-ir",
    "fusec-gguf",
    "fusec-model",
    "fusec-text",
    "fusec-weights",
    "fusec-rewrite",
    "fusec-exec",
    "fusec-codegen",
    "fusec-cuda",
    "fusec-report",
    "fusec-serve",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn crates() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(root().join("crates")).expect("crates/") {
        let dir = entry.expect("entry").path();
        let manifest = dir.join("Cargo.toml");
        if manifest.exists() {
            let text = fs::read_to_string(&manifest).expect("manifest");
            let doc: toml::Table = text.parse().expect("manifest parses");
            let name = doc["package"]["name"].as_str().expect("name").to_string();
            out.push((name, dir));
        }
    }
    out.sort();
    out
}

/// The `fusec*` packages a manifest depends on, normally or for tests, by section.
fn fusec_deps(manifest: &Path) -> Vec<(String, String)> {
    let text = fs::read_to_string(manifest).expect("manifest");
    let doc: toml::Table = text.parse().expect("manifest parses");
    let mut out = Vec::new();
    for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
        if let Some(deps) = doc.get(section).and_then(|d| d.as_table()) {
            for (name, spec) in deps {
                let package = spec.get("package").and_then(|p| p.as_str()).unwrap_or(name);
                if package.starts_with("fusec") {
                    out.push((section.to_string(), package.to_string()));
                }
            }
        }
    }
    out
}

#[test]
fn crates_depend_only_on_earlier_stages() {
    let mut problems = Vec::new();
    for (name, dir) in crates() {
        let Some(stage) = STAGES.iter().position(|s| *s == name) else {
            problems.push(format!("{name} is not a stage: place it in STAGES"));
            continue;
        };
        for (section, dep) in fusec_deps(&dir.join("Cargo.toml")) {
            match STAGES.iter().position(|s| *s == dep) {
                Some(d) if d < stage => {}
                Some(_) => problems.push(format!("{name} [{section}] depends on later {dep}")),
                None => problems.push(format!("{name} [{section}] depends on {dep}")),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A crate's module files by module path (`["kernels", "gemv"]` for
/// `src/kernels/gemv.rs`); the crate root is the empty path.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<Vec<String>, PathBuf>) {
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(stem.to_string());
                walk(&path, &p, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let module = match stem {
                    "lib" | "main" | "mod" => prefix.to_vec(),
                    _ => {
                        let mut p = prefix.to_vec();
                        p.push(stem.to_string());
                        p
                    }
                };
                out.insert(module, path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

/// The source without comments and string literals (so paths in docs don't count).
fn code_only(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal like 'x' (lifetimes have no closing quote two bytes on).
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into full paths.
fn expand(tree: &str) -> Vec<Vec<String>> {
    // `X as Y` keeps `X`; then whitespace goes.
    let words: Vec<&str> = tree.split_whitespace().collect();
    let mut kept = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        if words.get(i + 1) == Some(&"as") {
            kept.push(words[i]);
            // Skip `as` and the alias, keeping any punctuation glued after the alias.
            let alias = words.get(i + 2).copied().unwrap_or("");
            kept.push(alias.trim_start_matches(|c: char| c.is_alphanumeric() || c == '_'));
            i += 3;
        } else {
            kept.push(words[i]);
            i += 1;
        }
    }
    let tree: String = kept.concat();
    fn go(prefix: &[String], t: &str, out: &mut Vec<Vec<String>>) {
        if let Some(open) = t.find('{') {
            let head: Vec<String> = t[..open]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let inner = &t[open + 1..t.rfind('}').unwrap_or(t.len())];
            let mut depth = 0;
            let mut start = 0;
            let mut p = prefix.to_vec();
            p.extend(head);
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        go(&p, &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            go(&p, &inner[start..], out);
        } else if !t.is_empty() {
            let mut p = prefix.to_vec();
            p.extend(t.split("::").map(str::to_string));
            out.push(p);
        }
    }
    let mut out = Vec::new();
    go(&[], &tree, &mut out);
    out
}

/// Every `use` path of a file, and every inline path starting with `crate::` or
/// `super::`, with whether it was a `pub use` (a re-export).
fn paths(code: &str) -> Vec<(bool, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = &rest[..at];
        let is_word_start = before
            .chars()
            .last()
            .is_none_or(|c| !c.is_alphanumeric() && c != '_');
        let after = &rest[at + 4..];
        let end = after.find(';').unwrap_or(after.len());
        if is_word_start {
            let public = before.trim_end().ends_with("pub") || before.trim_end().ends_with(')');
            for p in expand(&after[..end]) {
                out.push((public, p));
            }
            rest = &after[end..];
        } else {
            rest = after;
        }
    }
    // Inline paths: `crate::a::b` and `super::a` outside `use`.
    for start in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(at) = rest.find(start) {
            let tail = &rest[at..];
            let len = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            // Only whole paths: not the `super::` inside `super::super::x`, and not the
            // head of a `use` group (`crate::{a, b}`), which the `use` pass expands.
            let whole = rest[..at]
                .chars()
                .last()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':'));
            if whole && !tail[..len].ends_with("::") {
                let path: Vec<String> = tail[..len]
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                out.push((false, path));
            }
            rest = &rest[at + len.max(start.len())..];
        }
    }
    out
}

/// Resolves a path as written in module `from` to the crate-relative path it names:
/// `crate::` from the root, `self::` and `super::` from `from`, and a bare first segment
/// that is a child module of `from` (2018 paths). `None` for paths into other crates.
fn absolute(
    from: &[String],
    path: &[String],
    modules: &BTreeMap<Vec<String>, PathBuf>,
) -> Option<Vec<String>> {
    let mut base: Vec<String> = from.to_vec();
    let mut segs = path.iter().peekable();
    match segs.peek().map(|s| s.as_str()) {
        Some("crate") => {
            base.clear();
            segs.next();
        }
        Some("self") => {
            segs.next();
        }
        Some("super") => {
            while segs.peek().map(|s| s.as_str()) == Some("super") {
                segs.next();
                base.pop();
            }
        }
        Some(first) => {
            let mut child = base.clone();
            child.push(first.to_string());
            if !modules.contains_key(&child) {
                return None;
            }
        }
        None => return None,
    }
    base.extend(segs.cloned());
    Some(base)
}

/// The module file that defines what `path` names: the longest module prefix, then
/// through that module's re-exports of the next segment.
fn resolve(
    path: &[String],
    modules: &BTreeMap<Vec<String>, PathBuf>,
    reexports: &HashMap<Vec<String>, HashMap<String, Option<Vec<String>>>>,
    depth: usize,
) -> Option<Vec<String>> {
    let mut k = path.len();
    while k > 0 && !modules.contains_key(&path[..k]) {
        k -= 1;
    }
    let module = path[..k].to_vec();
    if depth < 8 {
        if let Some(next) = path.get(k) {
            if let Some(target) = reexports.get(&module).and_then(|r| r.get(next)) {
                // A re-export of another crate's item is not an import of this file.
                let target = target.as_ref()?;
                let mut full = target.clone();
                full.extend(path[k + 1..].iter().cloned());
                if let Some(m) = resolve(&full, modules, reexports, depth + 1) {
                    return Some(m);
                }
            }
        }
    }
    Some(module)
}

fn circles_in(src: &Path) -> Vec<String> {
    let modules = modules(src);
    let mut uses: HashMap<Vec<String>, Vec<(bool, Vec<String>)>> = HashMap::new();
    // By module, the names it re-exports: what they name here, or `None` for another
    // crate's item.
    let mut reexports: HashMap<Vec<String>, HashMap<String, Option<Vec<String>>>> = HashMap::new();
    for (module, file) in &modules {
        let text = fs::read_to_string(file).expect("source");
        // Unit-test modules see their file through `super::*`; they are not imports.
        let text = text.split("#[cfg(test)]").next().unwrap_or("").to_string();
        let mut resolved = Vec::new();
        for (public, p) in paths(&code_only(&text)) {
            let abs = absolute(module, &p, &modules);
            if public {
                if let Some(last) = p.last() {
                    reexports
                        .entry(module.clone())
                        .or_default()
                        .insert(last.clone(), abs.clone());
                }
            }
            if let Some(abs) = abs {
                resolved.push((public, abs));
            }
        }
        uses.insert(module.clone(), resolved);
    }
    let mut graph = DiGraph::<Vec<String>, ()>::new();
    let index: HashMap<Vec<String>, _> = modules
        .keys()
        .map(|m| (m.clone(), graph.add_node(m.clone())))
        .collect();
    let mut edges = BTreeSet::new();
    for (module, list) in &uses {
        for (_, abs) in list {
            if let Some(target) = resolve(abs, &modules, &reexports, 0) {
                if &target != module && edges.insert((module.clone(), target.clone())) {
                    graph.add_edge(index[module], index[&target], ());
                }
            }
        }
    }
    tarjan_scc(&graph)
        .into_iter()
        .filter(|scc| scc.len() > 1)
        .map(|scc| {
            let mut files: Vec<String> = scc
                .iter()
                .map(|&n| {
                    modules[&graph[n]]
                        .strip_prefix(src)
                        .unwrap_or(&modules[&graph[n]])
                        .display()
                        .to_string()
                })
                .collect();
            files.sort();
            // The imports inside the circle, so that the one to cut can be chosen.
            let name = |n| {
                modules[&graph[n]]
                    .strip_prefix(src)
                    .unwrap_or(&modules[&graph[n]])
                    .display()
                    .to_string()
            };
            let mut inside: Vec<String> = graph
                .edge_indices()
                .filter_map(|e| graph.edge_endpoints(e))
                .filter(|(a, b)| scc.contains(a) && scc.contains(b))
                .map(|(a, b)| format!("{} imports {}", name(a), name(b)))
                .collect();
            inside.sort();
            format!("{}\n    {}", files.join(" -> "), inside.join("\n    "))
        })
        .collect()
}

#[test]
fn no_two_files_import_each_other_in_a_circle() {
    let mut problems = Vec::new();
    let mut roots: Vec<(String, PathBuf)> = crates()
        .into_iter()
        .map(|(n, d)| (n, d.join("src")))
        .collect();
    roots.push(("fusec".into(), root().join("src")));
    for (name, src) in roots {
        for circle in circles_in(&src) {
            problems.push(format!("{name}: {circle}"));
        }
    }
    assert!(
        problems.is_empty(),
        "import circles:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_finds_a_circle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    fs::write(src.join("lib.rs"), "mod a;\nmod b;\nmod c;\n").expect("write");
    fs::write(src.join("a.rs"), "use crate::b::B;\npub struct A;\n").expect("write");
    fs::write(
        src.join("b.rs"),
        "pub struct B;\nfn f() { crate::c::g(); }\n",
    )
    .expect("write");
    fs::write(
        src.join("c.rs"),
        "use super::a::{A as Aliased, self as measured};\npub fn g() {}\n",
    )
    .expect("write");
    let circles = circles_in(src);
    assert_eq!(
        circles,
        ["a.rs -> b.rs -> c.rs\n    a.rs imports b.rs\n    b.rs imports c.rs\n    c.rs imports a.rs"],
        "{circles:?}"
    );
    fs::write(src.join("c.rs"), "pub fn g() {}\n").expect("write");
    assert!(circles_in(src).is_empty());
    // A path through the root's re-export of another crate does not import the root.
    fs::write(
        src.join("lib.rs"),
        "mod a;\nmod b;\nmod c;\npub use other::rounding;\nuse a::A;\n",
    )
    .expect("write");
    fs::write(
        src.join("a.rs"),
        "use crate::rounding::round;\npub struct A;\n",
    )
    .expect("write");
    assert!(circles_in(src).is_empty(), "{:?}", circles_in(src));
    // `super::super::x` names the grandparent's `x`, not the parent; a `use` group's
    // head (`crate::{a, b}`) names the items, not the root.
    fs::create_dir(src.join("a")).expect("mkdir");
    fs::write(src.join("a.rs"), "mod inner;\npub use inner::I;\n").expect("write");
    fs::write(
        src.join("a/inner.rs"),
        "use super::super::b::B;\nuse crate::{b, c};\npub struct I;\n",
    )
    .expect("write");
    assert!(circles_in(src).is_empty(), "{:?}", circles_in(src));
}
