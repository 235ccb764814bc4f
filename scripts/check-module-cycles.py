#!/usr/bin/env python3
"""Reports import circles between the files of each crate.

A circle is module A naming module B (`use crate::b`, `crate::b::f`, `super::b`) while
B, directly or through other modules, names A. Comments and `mod tests` blocks at the
end of a file are ignored (a file's tests may name anything). Usage:

    scripts/check-module-cycles.py crates/*/src src

Exits 1 and prints each circle when there is one.
"""
import os
import re
import sys

PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+|::\{[^}]*\})")


def modules(src):
    """Module path (tuple) -> file, for every .rs file under src."""
    out = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)[:-3].split(os.sep)
            if rel[-1] in ("mod", "lib", "main"):
                rel = rel[:-1]
            out[tuple(rel)] = os.path.join(root, f)
    return out


def code(path):
    text = open(path, encoding="utf-8").read()
    text = re.split(r"\n#\[cfg\(test\)\]\s*\nmod tests\b", text)[0]
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def expand(head, rest):
    """`::a::b` -> [[a, b]]; `::{a, b::c}` -> [[a], [b, c]] (one level of braces)."""
    if rest.startswith("::{"):
        items = rest[3:-1].split(",")
        return [[p for p in i.strip().split("::") if p] for i in items if i.strip()]
    return [[p for p in rest.split("::") if p]]


def deps(mods):
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        is_dir = os.path.basename(path) in ("mod.rs", "lib.rs", "main.rs")
        parent = m if is_dir else m[:-1]
        for head, rest in PATH.findall(code(path)):
            for parts in expand(head, rest):
                base = () if head == "crate" else parent[:-1] if is_dir else parent
                full = base + tuple(p for p in parts if p not in ("self", "*"))
                # The longest prefix that is a module of the crate.
                for n in range(len(full), 0, -1):
                    if full[:n] in mods:
                        if full[:n] != m and full[:n] != parent:
                            graph[m].add(full[:n])
                        break
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main(srcs):
    bad = False
    for src in srcs:
        for comp in cycles(deps(modules(src))):
            bad = True
            print(f"{src}: " + ", ".join("::".join(m) or "<root>" for m in comp))
    if not bad:
        print("no module circles in " + " ".join(srcs))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["src"]))
