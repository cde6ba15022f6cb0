"""Zip-bomb and parser-depth limits of :mod:`compactnn.safe_pt2` (a security review's
findings: a 1 MB ``.pt2`` whose weight entry deflated from 1 GiB of zeros was loaded, and a
100k-deep ``models/model.json`` ended in a RecursionError traceback)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compactnn.cli import main
from compactnn.errors import CompactnnError
from compactnn.safe_pt2 import check_archive, load_exported_program, tensor_span_bytes


@pytest.fixture
def clean(tmp_path, monkeypatch) -> Path:
    """A plain ``torch.export.save`` archive of a small MLP, and calibration data."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU()).eval()
    save_file({"x": torch.randn(16, 8)}, tmp_path / "x.safetensors")
    program = torch.export.export(model, (torch.randn(4, 8),))
    torch.export.save(program, str(tmp_path / "clean.pt2"))
    return tmp_path / "clean.pt2"


def _rewrite(src: Path, edit=lambda rel, data: data, deflate=(), extra=()) -> bytes:
    """``src`` re-zipped, each entry through ``edit(rel, bytes)``; entries whose name ends
    with one of ``deflate`` are compressed; ``extra`` entries (rel, bytes) are appended."""
    out = io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            kind = zipfile.ZIP_DEFLATED if rel.endswith(tuple(deflate)) else zipfile.ZIP_STORED
            zout.writestr(info.filename, edit(rel, zin.read(info.filename)), kind)
        for rel, data in extra:
            zout.writestr(f"{root}/{rel}", data)
    return out.getvalue()


def _weight_config(data: bytes, sizes: list[int]) -> bytes:
    """The weights config with ``weight_0``'s tensor declared as ``sizes`` (contiguous)."""
    config = json.loads(data)
    for meta in config["config"].values():
        if meta["path_name"] == "weight_0":
            strides = [1] * len(sizes)
            for i in range(len(sizes) - 2, -1, -1):
                strides[i] = strides[i + 1] * sizes[i + 1]
            meta["tensor_meta"]["sizes"] = [{"as_int": s} for s in sizes]
            meta["tensor_meta"]["strides"] = [{"as_int": s} for s in strides]
    return json.dumps(config).encode()


def _refusal(data: bytes) -> str:
    with pytest.raises(CompactnnError) as info:
        check_archive(data, "x.pt2")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_recompressed_clean_archive_still_loads(clean, tmp_path):
    deflated = _rewrite(clean, deflate=("",))  # every entry compressed: real weights pass
    (tmp_path / "deflated.pt2").write_bytes(deflated)
    program = load_exported_program(tmp_path / "deflated.pt2")
    x = torch.randn(4, 8)
    assert torch.equal(program.module()(x), torch.export.load(str(clean)).module()(x))


def test_a_weight_entry_bigger_than_its_tensor_is_refused_before_it_is_read(clean, monkeypatch):
    bomb = _rewrite(
        clean, lambda rel, d: bytes(4 << 20) if rel.endswith("weight_0") else d, ("weight_0",)
    )
    assert len(bomb) < 200_000
    read = []
    real_read = zipfile.ZipFile.read
    monkeypatch.setattr(
        zipfile.ZipFile, "read", lambda self, n, pwd=None: read.append(n) or real_read(self, n)
    )
    message = _refusal(bomb)
    # the weight is 16 x 8 float32: 512 bytes
    assert "'data/weights/weight_0' unpacks to 4194304 bytes, more than the 512" in message
    assert "zip bomb" in message
    assert not any(name.endswith("weight_0") for name in read)


def test_a_huge_declared_tensor_of_packed_zeros_is_refused(clean):
    size = 80 << 20  # 80 MiB of zeros deflate to about 80 KB: over 100x the archive

    def edit(rel: str, data: bytes) -> bytes:
        if rel.endswith("_weights_config.json"):
            return _weight_config(data, [size // 4])
        return bytes(size) if rel.endswith("weight_0") else data

    message = _refusal(_rewrite(clean, edit, ("weight_0",)))
    total = int(message.split("its entries unpack to ")[1].split()[0])
    assert size < total < size + 100_000 and "-byte file (a zip bomb?)" in message


@pytest.mark.parametrize(
    ("rel", "size", "cap"), [("archive_format", 2 << 20, "1048576"), ("extra/x", 300 << 20, "")]
)
def test_metadata_entries_have_caps(clean, rel, size, cap):
    if rel == "archive_format":
        data = _rewrite(clean, lambda r, d: bytes(size) if r == rel else d)
        assert f"'{rel}' unpacks to {size} bytes, over {cap}" in _refusal(data)
    else:  # 300 MiB of packed zeros: refused on the sizes the zip declares, never read
        data = _rewrite(clean, deflate=(rel,), extra=[(rel, bytes(size))])
        assert f"'{rel}' unpacks to {size} bytes, over {256 << 20}" in _refusal(data)


def test_an_inflated_json_entry_is_refused(clean):
    def padded(rel, d):
        return d + b" " * (4 << 20) if rel.endswith("constants_config.json") else d

    message = _refusal(_rewrite(clean, padded, ("constants_config.json",)))
    assert "model_constants_config.json' unpacks to 4194318 bytes from" in message


def test_duplicate_entry_names_are_refused(clean):
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = _rewrite(clean, extra=[("models/model.json", b"{}")])
    assert "two entries of the same name" in _refusal(data)


@pytest.mark.parametrize("entry", ["models/model.json", "data/weights/model_weights_config.json"])
def test_deeply_nested_json_is_one_error_line(clean, capsys, entry):
    def deep(rel, d):
        return b"[" * 100_000 + b"]" * 100_000 if rel == entry else d

    Path("deep.pt2").write_bytes(_rewrite(clean, deep))
    code = main(["compress", "deep.pt2", "-r", "w8", "-o", "o", "-d", "x.safetensors"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: 'deep.pt2' has a corrupt"), err
    assert "recursion" in err and not Path("o").exists()


def test_tensor_span_bytes():
    def ints(*v):
        return [{"as_int": i} for i in v]

    meta = {"dtype": 7, "sizes": ints(2, 3), "strides": ints(3, 1)}
    assert tensor_span_bytes(meta) == 24
    assert tensor_span_bytes({**meta, "storage_offset": {"as_int": 10}}) == 64  # a view
    assert tensor_span_bytes({**meta, "dtype": 1}) == 6  # uint8
    assert tensor_span_bytes({**meta, "dtype": 999}) == 96  # unknown: 16 bytes an element
    assert tensor_span_bytes({**meta, "sizes": ints(0, 3)}) == 0
    assert tensor_span_bytes({**meta, "sizes": [{"as_expr": "s0"}, {"as_int": 3}]}) is None
    assert tensor_span_bytes({**meta, "strides": ints(1)}) is None
