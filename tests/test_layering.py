"""The package's structure, checked from its imports: no import circles, and arrows point down only.

Layers (``../shared/DESIGN.md``), top to bottom: ``cli`` -> ``experiments`` -> the domain packages ``llm``,
``offload``, ``snn`` -> ``kernels`` -> the ground (``artifacts``, ``config``, ``data``, ``formats``, ``report``,
``traces``). ``llm`` and ``snn`` never import each other, ``offload`` reads traces only (never ``llm``), and no
domain module parses flags or writes a report. Lazy imports inside functions count like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dormant

ROOT = Path(dormant.__file__).parent
GROUND = {"dormant", "dormant.artifacts", "dormant.config", "dormant.data", "dormant.distributed", "dormant.formats",
          "dormant.report", "dormant.traces"}
# What each part may import (besides itself and the ground).
ALLOWED = {
    "ground": set(),
    "kernels": set(),
    "llm": {"kernels"},
    "offload": set(),
    "snn": {"kernels"},
    "experiments": {"kernels", "llm", "offload", "snn"},
    "cli": {"kernels", "llm", "offload", "snn", "experiments"},
}
REPORT_WRITERS = {"markdown_table", "new_figure", "save_figure", "write_markdown", "write_csv", "csv_text"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _part(module: str) -> str:
    if module == "dormant.__main__":
        return "cli"
    if module in GROUND:
        return "ground"
    return module.split(".")[1]


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """``(imported dormant module, names)`` for every import statement of ``module`` (lazy ones included)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("dormant")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("dormant"):
                continue
            names = [a.name for a in node.names]
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            out += [(s, []) for s in subs]
            rest = [n for n in names if f"{base}.{n}" not in known]
            if rest:
                out.append((base, rest))
    return [(m, n) for m, n in out if m in known]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: {dep for dep, _ in _imports(m, p, known) if dep != m} for m, p in mods.items()}


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == [], f"import circles: {cycles}"


def test_imports_point_down_only():
    bad = []
    for m, deps in _graph().items():
        part = _part(m)
        for d in deps:
            dp = _part(d)
            if dp == part or dp == "ground":
                continue
            if dp not in ALLOWED[part]:
                bad.append(f"{m} -> {d}")
    assert bad == [], "imports against the layering:\n" + "\n".join(sorted(bad))


def test_domain_modules_neither_parse_flags_nor_write_reports():
    mods = _modules()
    known = set(mods)
    bad = []
    for m, p in mods.items():
        if _part(m) not in ("llm", "offload", "snn", "kernels"):
            continue
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                bad.append(f"{m} imports argparse")
        for dep, names in _imports(m, p, known):
            if dep == "dormant.report" and set(names) & REPORT_WRITERS:
                bad.append(f"{m} imports report writers {sorted(set(names) & REPORT_WRITERS)}")
    assert bad == [], "\n".join(bad)
