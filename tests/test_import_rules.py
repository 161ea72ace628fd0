"""The layering of src/mpokit (../shared/STYLE.md), checked on the source with ast.

Every import counts, including those inside functions: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "mpokit"

# package -> mpokit packages it must not import. One readable table; edit it here, nowhere else.
FORBIDDEN: dict[str, set[str]] = {
    "ops": {"layers", "methods", "cli", "io", "train", "surgery", "calibration", "eval", "data"},
    "layers": {"methods", "train", "cli", "io"},
    "surgery": {"methods", "train", "cli"},
    "calibration": {"methods", "train", "cli", "eval"},
    "methods": {"cli", "train"},
    "io": {"methods", "train", "cli"},
    "eval": {"cli", "io", "train"},
    "data": {"methods", "train", "cli", "layers", "eval", "io"},
    "train": {"cli"},
    "integrations": {"cli"},
    "export": {"cli", "train"},
    "report": {"cli", "train", "methods"},  # reads checkpoints (io), metrics (eval), layouts (ops, layers)
    "embed": {"cli", "train"},  # loads encoders (io), reads data (data)
}
# ops is pure tensor math: no nn.Module classes and no transformers (torch.nn.functional is plain functions).
OPS_FORBIDDEN_MODULES = {"torch.nn", "torch.nn.modules", "torch.nn.parameter", "transformers"}
OPS_FORBIDDEN_NAMES = {("torch", "nn")}  # `from torch import nn`
ONLY_MAIN_IMPORTS_CLI = {"__main__"}


def _imports(path: Path, package_parts: tuple[str, ...]) -> list[tuple[int, str, str | None]]:
    """(line, module, imported name or None) for every import in `path`, relative ones resolved."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - node.level + 1])
                module = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                module = node.module or ""
            out += [(node.lineno, module, a.name) for a in node.names]
    return out


def _module_graph(src: Path) -> dict[str, list[tuple[str, int, str, str | None]]]:
    """top-level part of mpokit (a package or a module such as __main__) -> its imports."""
    graph: dict[str, list] = {}
    for f in sorted(src.rglob("*.py")):
        rel = f.relative_to(src)
        parts = ("mpokit",) + rel.with_suffix("").parts
        package_parts = parts[:-1]  # what a relative import is resolved against
        top = rel.parts[0].removesuffix(".py")
        for line, module, name in _imports(f, package_parts):
            graph.setdefault(top, []).append((str(rel), line, module, name))
    return graph


def violations(src: Path = SRC) -> list[str]:
    broken = []
    graph = _module_graph(src)
    edges: dict[str, set[str]] = {}
    for top, imports in graph.items():
        for rel, line, module, name in imports:
            where = f"{rel}:{line}"
            p = module.split(".")
            if top == "ops" and (module in OPS_FORBIDDEN_MODULES or module.startswith(("transformers.",
                                 "torch.nn.modules.")) or (module, name) in OPS_FORBIDDEN_NAMES):
                broken.append(f"{where} ops -> {module}{'.' + name if name else ''}")
            if p[0] != "mpokit" or len(p) < 2:
                continue
            target = p[1]
            if target == "cli" and top not in ONLY_MAIN_IMPORTS_CLI | {"cli"}:
                broken.append(f"{where} {top} -> cli (only __main__ may import cli)")
            elif target in FORBIDDEN.get(top, ()):
                broken.append(f"{where} {top} -> {target}")
            if target != top and (src / target).is_dir() and (src / top).is_dir():
                edges.setdefault(top, set()).add(target)
    broken += [f"package cycle: {' -> '.join(c)}" for c in _cycles(edges)]
    return broken


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of packages (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])
    return found


def test_layering_holds():
    broken = violations()
    assert not broken, "imports against the layering:\n" + "\n".join(broken)


@pytest.mark.parametrize("package, source, expected", [
    ("ops", "from mpokit.layers.mpo import MPOLinear\n", "ops -> layers"),
    ("ops", "from torch import nn\n", "ops -> torch.nn"),
    ("layers", "def f():\n    from mpokit.methods import compress_\n", "layers -> methods"),
    ("io", "from ..methods.base import applied_methods\n", "io -> methods"),
    ("methods", "from mpokit.cli.common import print_table\n", "methods -> cli"),
])
def test_rule_fails_on_an_added_upward_import(tmp_path, package, source, expected):
    """Negative control: a copy of the tree with one forbidden import added is reported."""
    import shutil

    copy = tmp_path / "mpokit"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / package / "_added_for_test.py").write_text(source)
    assert any(expected in b and "_added_for_test" in b for b in violations(copy)), violations(copy)


def test_cycle_detection():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []
