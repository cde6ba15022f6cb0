"""Resolving MODEL and --data arguments without pickle, and lifting exported graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compactnn.core.weight_import import lift_weight_layers
from compactnn.errors import CompactnnError
from compactnn.model_io import resolve_data, resolve_model, skeleton_for


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False)
        self.c3 = nn.Conv1d(8, 4, 2)
        self.fc = nn.Linear(4 * 15, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(torch.relu(self.c1(x)))  # (N, 8, 4, 4)
        x = self.c3(x.flatten(2))  # (N, 4, 15)
        return self.fc(x.flatten(1))


def test_lifted_export_graph_matches_the_model_exactly():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 4, 8, 8)
    gm = lift_weight_layers(torch.export.export(model, (x,)).module())
    kinds = sorted(
        type(m).__name__ for m in gm.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
    )
    assert kinds == ["Conv1d", "Conv2d", "Conv2d", "Linear"]
    assert torch.equal(gm(x), model(x))
    gm.eval()  # a plain GraphModule: eval() works (the exported one refuses it)


def test_resolve_data_formats(tmp_path):
    x = torch.randn(4, 3)
    save_file({"x": x}, tmp_path / "one.safetensors")
    save_file(
        {
            "input_ids": torch.ones(2, 5, dtype=torch.long),
            "attention_mask": torch.ones(2, 5, dtype=torch.long),
        },
        tmp_path / "two.safetensors",
    )
    np.save(tmp_path / "x.npy", x.numpy())
    assert torch.equal(resolve_data(str(tmp_path / "one.safetensors")), x)
    assert set(resolve_data(str(tmp_path / "two.safetensors"))) == {"input_ids", "attention_mask"}
    assert torch.equal(resolve_data(str(tmp_path / "x.npy")), x)


def test_npy_of_objects_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CompactnnError, match="without pickle"):
        resolve_data(str(tmp_path / "obj.npy"))


@pytest.mark.parametrize("spec", ["inputs.pt", "unknown-data"])
def test_bad_data_names(spec):
    with pytest.raises(CompactnnError, match=r"pickle|unknown data"):
        resolve_data(spec)


def test_pickle_refused_and_state_dict_pickle_rejected(tmp_path):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "sd.pth")
    with pytest.raises(CompactnnError, match="arbitrary code"):
        resolve_model(str(tmp_path / "sd.pth"))
    with pytest.raises(CompactnnError, match=r"not a whole nn\.Module"):
        resolve_model(str(tmp_path / "sd.pth"), trust_pickle=True)


def test_factory_weights_must_match(tmp_path, monkeypatch):
    (tmp_path / "mio_factory.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Linear(4, 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    save_file(nn.Linear(4, 2).state_dict(), tmp_path / "ok.safetensors")
    save_file(nn.Linear(5, 2).state_dict(), tmp_path / "bad.safetensors")
    loaded = resolve_model("mio_factory:make", weights=str(tmp_path / "ok.safetensors"))
    assert isinstance(loaded.model, nn.Linear) and loaded.weights
    with pytest.raises(CompactnnError, match="do not fit"):
        resolve_model("mio_factory:make", weights=str(tmp_path / "bad.safetensors"))


def test_factory_named_by_a_file_path_says_how_to_name_its_module(tmp_path, monkeypatch):
    (tmp_path / "mio_path_factory.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Linear(4, 2)\n"
    )
    save_file(nn.Linear(4, 2).state_dict(), tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    for spec in ("./mio_path_factory.py:make", "sub/mio_path_factory.py:make"):
        with pytest.raises(CompactnnError, match="mio_path_factory:make"):  # was a TypeError
            resolve_model(spec, weights="w.safetensors")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(
        resolve_model("mio_path_factory:make", weights="w.safetensors").model, nn.Linear
    )


def test_skeleton_needs_a_recorded_source():
    with pytest.raises(CompactnnError, match="--model"):
        skeleton_for({"extra": {}})


def _tiny_llama_dir(tmp_path, dtype=torch.float32):
    """A random-weight one-layer Llama (untied LM head) saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.to(dtype).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def _edit_config(folder, **fields):
    import json

    config = json.loads((folder / "config.json").read_text())
    for key, value in fields.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_hf_directory_with_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file

    folder, _ = _tiny_llama_dir(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CompactnnError, match=r"1 missing \(e\.g\. 'lm_head\.weight'\)"):
        resolve_model(str(folder))


@pytest.mark.parametrize(
    ("architectures", "outcome"),
    [
        (["MyLlamaForCausalLM"], "names the architecture 'MyLlamaForCausalLM', which trans"),
        (None, r"1 unexpected \(e\.g\. 'lm_head\.weight'\)"),  # AutoModel would drop lm_head
        (["Mystery"], "names the architecture 'Mystery'"),
    ],
)
def test_hf_architecture_names_never_drop_weights(tmp_path, architectures, outcome):
    folder, model = _tiny_llama_dir(tmp_path)
    _edit_config(folder, architectures=architectures)
    if outcome.isidentifier():
        loaded = resolve_model(str(folder)).model
        assert type(loaded).__name__ == outcome
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    else:
        with pytest.raises(CompactnnError, match=outcome):
            resolve_model(str(folder))


def test_hf_directory_saved_in_bfloat16_loads_in_float32(tmp_path):
    folder, model = _tiny_llama_dir(tmp_path, torch.bfloat16)
    loaded = resolve_model(str(folder)).model
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.float())


def test_single_tensor_data_becomes_a_hugging_face_models_keyword_input(tmp_path):
    from compactnn.model_io import LoadedModel

    folder, model = _tiny_llama_dir(tmp_path)
    ids = torch.randint(0, 32, (4, 8))
    save_file({"tokens": ids}, tmp_path / "ids.safetensors")
    save_file({"input_ids": ids}, tmp_path / "named.safetensors")
    np.save(tmp_path / "ids.npy", ids.numpy())
    hf = LoadedModel(model, str(folder))
    for name in ("ids.safetensors", "named.safetensors", "ids.npy"):
        data = resolve_data(str(tmp_path / name), hf)
        assert data.keys() == {"input_ids"} and torch.equal(data["input_ids"], ids)
    plain = LoadedModel(nn.Linear(8, 2), "factory")
    assert torch.equal(resolve_data(str(tmp_path / "ids.safetensors"), plain), ids)


def test_tensors_with_different_row_counts_are_refused(tmp_path):
    ids = torch.randint(0, 32, (16, 12))
    save_file({"input_ids": ids, "attention_mask": torch.ones(8, 12)}, tmp_path / "bad.safetensors")
    with pytest.raises(CompactnnError, match=r"different first dimensions.*input_ids \(16, 12\)"):
        resolve_data(str(tmp_path / "bad.safetensors"))
    split = {"x_train": ids.float(), "y_train": ids[:, 0].clone(), "x_test": ids[:4].float(),
             "y_test": ids[:4, 0].clone()}  # fmt: skip
    save_file(split, tmp_path / "split.safetensors")
    assert resolve_data(str(tmp_path / "split.safetensors")).keys() == split.keys()


def test_weights_naming_a_folder_say_a_file_is_expected(tmp_path):
    from compactnn.model_io import read_tensors

    with pytest.raises(CompactnnError, match=r"is a folder; a \.safetensors file is expected"):
        read_tensors(tmp_path)


VERSIONED_FACTORY = """
import torch
from torch import nn


class Versioned(nn.Module):
    _version = 2

    def __init__(self, fail=False):
        super().__init__()
        self.fc, self.fail = nn.Linear(4, 2), fail

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if self.fail:
            raise KeyError("checkpoint layout 7 is not supported")
        version = local_metadata.get("version")
        if version not in (1, 2):  # as torchvision's MNASNet
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def make():
    return Versioned()


def make_failing():
    return Versioned(fail=True)
"""


def test_factory_weights_reach_a_module_that_reads_its_version(tmp_path, monkeypatch):
    (tmp_path / "mio_versioned_factory.py").write_text(VERSIONED_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    saved = nn.Linear(4, 2)
    save_file({f"fc.{k}": v for k, v in saved.state_dict().items()}, tmp_path / "w.safetensors")
    weights = str(tmp_path / "w.safetensors")
    loaded = resolve_model("mio_versioned_factory:make", weights=weights)  # was a ValueError
    assert torch.equal(loaded.model.fc.weight, saved.weight)
    assert torch.equal(loaded.model.fc.bias, saved.bias)
    with pytest.raises(CompactnnError) as err:  # the model's own loading code refuses
        resolve_model("mio_versioned_factory:make_failing", weights=weights)
    message = str(err.value)
    assert "\n" not in message and weights in message and "make_failing" in message
    assert "KeyError" in message and "checkpoint layout 7" in message


def _npy_with_header(path, shape, data: bytes, dtype: str = "<f4") -> None:
    """A .npy file whose header declares ``shape`` whatever bytes follow it."""
    from numpy.lib import format as npf

    with open(path, "wb") as f:
        npf.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
        f.write(data)


@pytest.mark.parametrize(
    ("shape", "data"),
    [((10**12, 1, 8, 8), 64), ((4, 3), 47), ((4, 3), 49), ((2**62, 2**62), 16)],
)
def test_an_npy_whose_header_disagrees_with_its_bytes_is_refused_before_loading(
    tmp_path, monkeypatch, shape, data
):
    import math

    path = tmp_path / "bad.npy"
    _npy_with_header(path, shape, b"\0" * data)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load was reached"))
    with pytest.raises(CompactnnError) as info:
        resolve_data(str(path))
    declared = math.prod(shape) * 4
    message = str(info.value)
    assert f"data file {str(path)!r} declares a float32 array of shape {shape}" in message
    assert f"({declared:,} bytes) but holds {data:,} bytes" in message and "\n" not in message


def test_an_npy_whose_header_fits_its_bytes_loads(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    _npy_with_header(tmp_path / "ok.npy", (4, 3), x.tobytes())
    assert torch.equal(resolve_data(str(tmp_path / "ok.npy")), torch.from_numpy(x))
    (tmp_path / "zip.npy").write_bytes(b"PK\x03\x04" + b"\0" * 60)  # an .npz under .npy
    with pytest.raises(CompactnnError, match=r"'.*zip\.npy' is not a \.npy file numpy reads"):
        resolve_data(str(tmp_path / "zip.npy"))


@pytest.mark.parametrize("name", ["d.safetensors", "d.npy"])
@pytest.mark.parametrize("kind", ["fifo", "device link"])
def test_data_and_weights_that_are_not_regular_files_say_so(tmp_path, monkeypatch, name, kind):
    import os

    path = tmp_path / name
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(CompactnnError, match="is not a regular file \\(a FIFO, device or socket"):
        resolve_data(str(path))
    with pytest.raises(CompactnnError, match="does not exist"):
        resolve_data(str(tmp_path / f"missing-{name}"))
    if name.endswith(".safetensors"):  # --weights too
        (tmp_path / "io_regular_net.py").write_text(
            "from torch import nn\n\ndef make():\n    return nn.Linear(2, 2)\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(CompactnnError, match=f"file {str(path)!r} is not a regular file"):
            resolve_model("io_regular_net:make", weights=str(path))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("model.pkl", "unknown model 'model.pkl' (no such file, folder or reference model)."),
        ("model.pt", "model file 'model.pt' does not exist."),
        ("gone/model.pt2", "model file 'gone/model.pt2' does not exist."),
    ],
)
def test_a_missing_model_is_named_before_anything_else(tmp_path, monkeypatch, spec, message):
    from compactnn.model_io import check_model_exists

    monkeypatch.chdir(tmp_path)
    for check in (check_model_exists, resolve_model):  # resolve_model: before "a pickle"
        with pytest.raises(CompactnnError) as err:
            check(spec)
        assert str(err.value).split("\n")[0].startswith(message)
    check_model_exists("mnist-cnn")  # a reference name, a factory: nothing to check yet
    check_model_exists("no_such_pkg.mod:make")


def test_compress_and_search_name_a_missing_model_before_the_missing_data(
    tmp_path, monkeypatch, capsys
):
    """`compactnn compress model.pkl -r w8a8` with no such file complained about --data."""
    from compactnn.cli import main

    monkeypatch.chdir(tmp_path)
    for argv in (
        ["compress", "model.pkl", "-r", "w8a8", "-o", "o"],
        ["search", "model.pkl", "--formats", "w4a8,w8a8", "--avg-bits", "6", "-o", "o"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: unknown model 'model.pkl' (no such file"), err


def test_a_forged_source_record_is_quoted_cut():
    """A re-hashed artifact with a 1 MB extra.source.model gave a 2 MB error line."""
    from compactnn.model_io import describe_source

    line = describe_source({"model": "m" * 10**6, "kind": "factory", "weights": "w" * 10**6})
    assert len(line) < 1000 and "more characters" in line
