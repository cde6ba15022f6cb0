"""Every dotted ``compactnn.…`` path the README and docs/ name resolves after a plain
``import compactnn`` (whose names load on first use: ``_submodules.submodule`` in each
package's ``__getattr__``); three documented paths raised AttributeError when the package
stopped importing everything eagerly (T5, session 31)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# names in the docs that are not Python: the artifact's header file, ONNX metadata keys
NOT_CODE = {"compactnn.json", "compactnn.int32_bias_layers", "compactnn.verification"}
NOT_CODE |= {"compactnn.lock"}  # the folder lock file of a save (.compactnn.lock)
DOTTED = re.compile(r"\bcompactnn(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
RESOLVE = """
import sys, compactnn
for path in sys.argv[1:]:
    obj = compactnn
    try:
        for part in path.split(".")[1:]:
            obj = getattr(obj, part)
    except AttributeError as exc:
        print(path, "->", exc)
"""


def _documented_paths() -> list[str]:
    found = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        found.update(m.group(0) for m in DOTTED.finditer(doc.read_text()))
    return sorted(found - NOT_CODE)


def test_every_documented_dotted_path_resolves_after_a_plain_import():
    paths = _documented_paths()
    assert "compactnn.export.artifact.artifact_digest" in paths  # the scan finds them
    proc = subprocess.run(
        [sys.executable, "-P", "-c", RESOLVE, *paths], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "", proc.stdout


def test_a_missing_submodule_is_an_attribute_error():
    import compactnn.export

    with pytest.raises(AttributeError, match="has no attribute 'no_such_module'"):
        compactnn.export.no_such_module  # noqa: B018
    with pytest.raises(AttributeError):
        compactnn.export._private  # noqa: B018
