"""The float model's artifact size is computed without writing the artifact (no temporary
copy: a 7B model would need ~28 GB of temporary disk), and equals, byte for byte, what
``compactnn.save`` writes for it."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.measure import size as size_mod
from compactnn.measure.size import artifact_bytes, float_artifact_bytes


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()  # fmt: skip


class _Odd(nn.Module):
    """Odd tensor names (non-ASCII, quotes, a backslash, spaces, digits), every stored width
    (bfloat16, float16, float64, int8, bool), 0-dim and empty tensors, a non-contiguous one,
    a weight with a few exact zeros (still dense) and one mostly zeros (stored sparse)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.add_module('ß"q\\x 7', nn.Linear(5, 3).to(torch.bfloat16))
        self.add_module("été", nn.Linear(4, 6).to(torch.float16))
        self.register_buffer("d64", torch.randn(3, 2, generator=g, dtype=torch.float64))
        self.register_buffer("i8", torch.arange(7, dtype=torch.int8))
        self.register_buffer("flag", torch.tensor(True))
        self.register_buffer("scalar", torch.tensor(2.5))
        self.register_buffer("empty", torch.zeros(0, 4))
        self.register_buffer("transposed", torch.randn(6, 9, generator=g).t())
        few = torch.randn(40, 40, generator=g)
        few[0, :3] = 0.0
        self.register_buffer("few_zeros", few)
        mostly = torch.randn(64, 64, generator=g)
        mostly[torch.rand(64, 64, generator=g) < 0.9] = 0.0
        self.register_buffer("mostly_zeros", mostly)


def _tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=16, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=True
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    return model


def _pruned() -> nn.Module:
    """A float model with a recipe (``recipe.yaml``) and pruned, sparse-stored weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    return compactnn.compress(model, "sp50", progress=False)


@pytest.mark.parametrize("make", [_cnn, _Odd, _tiny_gpt2, _pruned])
def test_the_float_size_is_exact_and_written_nowhere(make, tmp_path, monkeypatch):
    model = make()  # (torch may make its own cache folder in the temporary folder)
    missing = tmp_path / "no-such-folder"
    monkeypatch.setattr(tempfile, "tempdir", str(missing))  # any temporary file fails
    size = float_artifact_bytes(model)  # before the real save: nothing on disk to read
    assert not missing.exists()
    monkeypatch.undo()
    compactnn.save(model, tmp_path / "real")
    assert size == artifact_bytes(tmp_path / "real")


def test_the_models_cover_sparse_weights_a_recipe_and_ties(tmp_path):
    import json

    for name, model in (("odd", _Odd()), ("pruned", _pruned())):
        compactnn.save(model, tmp_path / name)
    odd = json.loads((tmp_path / "odd" / "compactnn.json").read_text())
    pruned = json.loads((tmp_path / "pruned" / "compactnn.json").read_text())
    assert list(odd["sparse"]) == ["mostly_zeros"]  # few_zeros: zeros, still dense
    assert list(pruned["sparse"]) == ["0.weight", "2.weight"]
    assert (tmp_path / "pruned" / "recipe.yaml").is_file()
    _, aliases, _ = size_mod._stored_tensors(_tiny_gpt2())
    assert aliases == {"lm_head.weight": "transformer.wte.weight"}


def test_a_quantized_model_is_still_measured_exactly_through_a_written_copy(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    q = compactnn.compress(model, "w8a8", calib_data=torch.randn(32, 16), progress=False)
    compactnn.save(q, tmp_path / "real")
    assert float_artifact_bytes(q) == artifact_bytes(tmp_path / "real")


def test_a_serializer_that_differs_from_the_library_falls_back_to_writing(tmp_path, monkeypatch):
    """The header is checked against the safetensors library on stand-ins of the same names
    and dtypes; a library that lays it out otherwise gets the written copy, still exact."""
    model = _cnn()
    compactnn.save(model, tmp_path / "real")
    real = size_mod.save_bytes
    monkeypatch.setattr(size_mod, "save_bytes", lambda t, metadata: real(t, metadata) + b"x")
    written = []
    monkeypatch.setattr(size_mod, "written_artifact_bytes", lambda m: written.append(m) or 123)
    assert float_artifact_bytes(model) == 123 and written == [model]
    monkeypatch.undo()
    assert float_artifact_bytes(model) == artifact_bytes(tmp_path / "real")


def test_a_missing_tmpdir_is_refused_where_a_copy_is_still_written(tmp_path, monkeypatch):
    """Python's tempfile silently falls back to /tmp when TMPDIR is missing or read-only:
    the copy (quantized models only) is refused there, naming TMPDIR."""
    missing = tmp_path / "gone"
    monkeypatch.setenv("TMPDIR", str(missing))
    monkeypatch.setattr(tempfile, "tempdir", None)  # as a fresh process reads TMPDIR
    q = compactnn.compress(nn.Sequential(nn.Linear(8, 8)), "w8", progress=False)
    with pytest.raises(CompactnnError) as err:
        float_artifact_bytes(q)
    assert str(err.value) == (
        "cannot measure the float model's size on disk: it needs a temporary copy, and "
        f"TMPDIR is {str(missing)!r}, which does not exist (Python would put the copy in "
        f"{tempfile.gettempdir()!r} instead): create it, or set TMPDIR to a folder you can "
        "write with room for the model."
    )
    assert float_artifact_bytes(_cnn()) > 0  # no copy needed: TMPDIR is not read
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "file"))
    with pytest.raises(CompactnnError, match="which is not a folder"):
        float_artifact_bytes(q)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert os.listdir(tmp_path) == ["file"]
    assert float_artifact_bytes(q) > 0


def _masks() -> list[torch.Tensor]:
    """Zero patterns around each encoding's break-even: scattered zeros at many densities,
    zeroed rows (a padding row), aligned and unaligned runs, leading and trailing zeros, one
    zero, all zeros; sizes prime, odd and highly composite."""
    g = torch.Generator().manual_seed(3)
    out = []
    for shape in [(7, 13), (64, 64), (96, 40), (3, 4099), (5000, 2)]:
        for p in (0.0005, 0.01, 0.3, 0.6, 0.9, 0.99):
            out.append(torch.rand(shape, generator=g) < p)
        rows = torch.zeros(shape, dtype=torch.bool)
        rows[0] = rows[-1] = True  # leading and trailing zeros: the first and last rows
        out.append(rows)
        one = torch.zeros(shape, dtype=torch.bool)
        one.view(-1)[shape[0] * shape[1] // 2] = True
        out += [one, torch.ones(shape, dtype=torch.bool)]
        runs = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
        for start in range(5, runs.numel() - 600, 997):  # unaligned runs of 300
            runs[start : start + 300] = True
        out.append(runs.view(shape))
    table = torch.zeros(512, 64, dtype=torch.bool)
    table[0] = True  # a token table's padding row
    out.append(table)
    return out


@pytest.mark.parametrize("chunk", [1 << 22, 7])  # read whole, or in chunks across runs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_encoding_is_the_one_sparsify_picks(dtype, chunk, monkeypatch):
    """Reference: the plan ``sparsify`` makes (``export.sparse._plan``) on the same mask:
    encoding, gap width or run length, and how many entries it stores; a transposed
    (non-contiguous) tensor as stored, contiguous."""
    from compactnn.export.sparse import _plan

    monkeypatch.setattr(size_mod, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(4)
    met = set()
    for zero in _masks():
        t = (torch.rand(zero.shape, generator=g) + 0.5).to(dtype)
        t[zero] = 0.0
        for view in (t, t.t()):
            if not zero.any():
                continue
            flat = (view.contiguous() != 0).reshape(-1).numpy()
            encoding, param, positions, _ = _plan(flat, 8 * t.element_size())
            met.add(encoding)
            count = positions.size if encoding != "dense" else t.numel()
            assert size_mod._has_zeros(view)
            assert size_mod._cheapest_encoding(view) == (encoding, param, count), zero.shape
    assert met == {"dense", "bitmap", "gaps", "blocks"}  # every encoding met


class _Masked(nn.Module):
    """A buffer of each zero pattern of :func:`_masks`: stored dense, or sparse in each
    encoding."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        for i, zero in enumerate(_masks()):
            t = (torch.rand(zero.shape, generator=g) + 0.5).to(dtype)
            t[zero] = 0.0
            self.register_buffer(f"m{i}", t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_sparse_encoding_is_sized_exactly(dtype, tmp_path):
    import json

    model = _Masked(dtype)
    size = float_artifact_bytes(model)
    compactnn.save(model, tmp_path / "real")
    header = json.loads((tmp_path / "real" / "compactnn.json").read_text())
    encodings = {entry["encoding"] for entry in header["sparse"].values()}
    assert encodings == {"bitmap", "gaps", "blocks"}
    assert size == artifact_bytes(tmp_path / "real")
