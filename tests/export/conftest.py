"""Shared helpers of the artifact tests."""

import hashlib
import json

import pytest
from safetensors.torch import save_file

from compactnn.export import validate


def _rewrite_tensors(root, tensors) -> None:
    """Replace an artifact's ``model.safetensors`` with ``tensors`` and recompute every file
    hash and the digest, so the edit reaches the tensor checks (not the hash check)."""
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    header = json.loads((root / "compactnn.json").read_text())
    for f in header["files"].values():
        data = (root / f["name"]).read_bytes()
        f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    header["digest"] = validate.header_digest(header)
    (root / "compactnn.json").write_text(json.dumps(header))


@pytest.fixture
def rewrite_tensors():
    return _rewrite_tensors
