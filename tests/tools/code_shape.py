#!/usr/bin/env python3
"""Checks two rules of the code's shape that review otherwise has to catch by eye:

- no import circle between the modules of a crate (module A uses B and B uses A, directly or
  through others): a circle means neither module can be read first;
- no function longer than a limit in the control plane's code (operator, API): a long
  function is a decision that has not been split into named steps.

Tests (`#[cfg(test)]` modules) are left out. Prints one line per finding and exits 1 when
there is any.

    code_shape.py [--max-fn-lines N]
"""

import argparse
import os
import re
import sys

# Crates whose module graph must have no circles.
CYCLE_FREE = [
    "operator/src", "api/src", "tests/kube-sim/src", "crds/src", "tests/testkit/src",
    "trainer-image/src",
]
# Code whose functions must stay short.
SHORT_FUNCTIONS = ["operator/src", "api/src"]


def strip_code(text):
    """The text with comments, string and char literals blanked (newlines kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and not re.match(r"\w", text[i - 1:i] or " "):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = '"' + hashes
            j = text.find(end, i + 2 + len(hashes))
            j = n if j < 0 else j + len(end)
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]):
            j = text.find("'", i + 1 + (2 if text[i + 1] == "\\" else 1))
            out.append("' '")
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def without_tests(code):
    """Drops every `#[cfg(test)]` item (a module or function) from stripped code."""
    while True:
        m = re.search(r"#\[cfg\(test\)\]", code)
        if not m:
            return code
        start = code.find("{", m.end())
        end = code.find(";", m.end())
        if start < 0 or (0 <= end < start):
            code = code[:m.start()] + code[m.end():]
            continue
        depth, j = 0, start
        while j < len(code):
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
            if depth == 0:
                break
        code = code[:m.start()] + "\n" * code.count("\n", m.start(), j) + code[j:]


def modules(src):
    """Module path (`a::b`) → stripped code of its file, for every file of a crate."""
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            parts = os.path.relpath(path, src)[:-3].split(os.sep)
            if parts[0] == "bin":
                continue
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            with open(path, encoding="utf-8") as fh:
                mods["::".join(parts)] = (path, without_tests(strip_code(fh.read())))
    return mods


def resolve(current, path, mods):
    segs = path.split("::")
    if segs[0] == "crate":
        base, segs = [], segs[1:]
    elif segs[0] in ("super", "self"):
        base = current.split("::") if current else []
        while segs and segs[0] == "super":
            base, segs = base[:-1], segs[1:]
        if segs and segs[0] == "self":
            segs = segs[1:]
    else:
        return None
    for k in range(len(segs), -1, -1):
        cand = "::".join(base + segs[:k])
        if cand in mods:
            return cand
    return None


def graph(mods):
    g = {m: set() for m in mods}
    for m, (_, code) in mods.items():
        for use in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)(?:::\{([^}]*)\})?", code):
            paths = [use.group(1)]
            for item in (use.group(2) or "").split(","):
                item = item.strip().split(" as ")[0].split("::{")[0].strip()
                if item and item != "self":
                    paths.append(use.group(1) + "::" + item)
            for p in paths:
                r = resolve(m, p, mods)
                # A module and its own ancestors or descendants are one unit of reading.
                if r is None or r == m or m.startswith(r + "::") or r == "" or (m and r.startswith(m + "::")) or not m:
                    continue
                g[m].add(r)
    return g


def circles(g):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                found.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return found


def long_functions(mods, limit):
    for path, code in mods.values():
        lines = code.split("\n")
        for n, line in enumerate(lines):
            m = re.match(r"\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)", line)
            if not m:
                continue
            depth, started = 0, False
            for k in range(n, len(lines)):
                for ch in lines[k]:
                    if ch == "{":
                        depth, started = depth + 1, True
                    elif ch == "}":
                        depth -= 1
                if started and depth == 0:
                    if k - n + 1 > limit:
                        yield path, n + 1, m.group(6), k - n + 1
                    break
                if not started and lines[k].rstrip().endswith(";"):
                    break


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-fn-lines", type=int, default=150)
    args = ap.parse_args()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    os.chdir(root)
    bad = 0
    for src in CYCLE_FREE:
        for comp in circles(graph(modules(src))):
            print(f"code-shape: import circle in {src}: {' <-> '.join(comp)}")
            bad += 1
    for src in SHORT_FUNCTIONS:
        for path, line, name, length in long_functions(modules(src), args.max_fn_lines):
            print(f"code-shape: {path}:{line}: fn {name} is {length} lines (at most {args.max_fn_lines})")
            bad += 1
    if bad:
        return 1
    print(f"code-shape: no import circles in {', '.join(CYCLE_FREE)}; no function over "
          f"{args.max_fn_lines} lines in {', '.join(SHORT_FUNCTIONS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
