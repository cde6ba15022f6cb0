"""The import graph of ``compactnn`` flows one way: no cycles, no method importing another.

The graph is built from the source with :mod:`ast`, function-local imports included, so a
cycle cannot hide inside a function body. Importing ``a.b.c`` from outside ``a.b`` also runs
``a.b/__init__``, so that edge counts too (the root package ``compactnn`` excepted: it is the
public facade above everything).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "compactnn").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module a dotted import name refers to (``a.b.func`` -> ``a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            owner = _owner(name) if name.startswith("compactnn") else None
            while owner and owner != "compactnn" and not module.startswith(owner + "."):
                if owner != module:
                    found.add(owner)
                # importing a.b.c first runs a.b's __init__, unless we are inside a.b already
                owner = owner.rpartition(".")[0]
    return found


GRAPH = {m: _targets(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def _registers(path: Path) -> bool:
    """Whether the file calls ``register(...)`` (the method registry's decorator)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            owner = getattr(getattr(func, "value", None), "id", "")
            if name == "register" and owner != "atexit":  # atexit.register is no method
                return True
    return False


@functools.cache
def _method_files() -> frozenset[str]:
    """Modules that register a method: one file per method."""
    return frozenset(m for m, p in MODULES.items() if m != "compactnn.registry" and _registers(p))


def test_no_method_file_imports_another():
    methods = _method_files()
    assert len(methods) >= 20  # the test looks at the real method files
    bad = sorted((m, t) for m in methods for t in GRAPH[m] if t in methods)
    assert not bad, "method files importing other method files:\n" + "\n".join(
        f"{m} -> {t}" for m, t in bad
    )


# Layers, bottom to top: a module may import its own layer and the layers below it only.
# Method files (registered methods) form their own layer above the engines they plug into.
LAYERS: list[tuple[str, ...]] = [
    (
        "compactnn.errors",
        "compactnn._optional",
        "compactnn.omp_policy",
        "compactnn._submodules",
        "compactnn.launch_env",
    ),
    ("compactnn.core",),
    ("compactnn.registry",),
    ("compactnn.recipe", "compactnn.lowering", "compactnn.distill", "compactnn.kernels"),
    ("compactnn.engines", "compactnn.quant", "compactnn.prune"),  # shared modules
    ("<methods>",),
    ("compactnn.methods", "compactnn.export", "compactnn.streaming", "compactnn.float_layers"),
    ("compactnn.api",),
    ("compactnn.training", "compactnn.measure", "compactnn.safe_pt2", "compactnn.datafree"),
    ("compactnn.deployment",),
    ("compactnn.mixed_precision",),  # mixed precision: measures deployed latency, runs compress
    # the application: command line, reference models and data, demo, report, benchmarks
    (
        "compactnn.model_io",
        "compactnn.hf_folder_errors",
        "compactnn.user_modules",
        "compactnn.data_files",
        "compactnn.models",
        "compactnn.data",
        "compactnn.report",
        "compactnn.demo",
        "compactnn.demo_suite",
        "compactnn.bench",
        "compactnn.commands",
        "compactnn.cli_streams",
        "compactnn.cli_os_errors",
        "compactnn.cli",
    ),
]


def _layer(module: str) -> int:
    if module in _method_files():
        return next(i for i, names in enumerate(LAYERS) if names == ("<methods>",))
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def test_imports_flow_down_the_layers():
    upward = sorted(
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if m != "compactnn"  # the package root is the public facade above everything
        for t in targets
        if _layer(t) > _layer(m)
    )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_layers_are_ordered_as_documented():
    # docs/architecture.md: core -> registry -> engines -> methods -> export -> api -> ...
    order = ["compactnn.core.qtype", "compactnn.registry", "compactnn.engines.qat"]
    order += ["compactnn.quant.rtn", "compactnn.export.artifact", "compactnn.api"]
    order += ["compactnn.deployment.api", "compactnn.cli"]
    assert [_layer(m) for m in order] == sorted(_layer(m) for m in order)
    assert len({_layer(m) for m in order}) == len(order)
