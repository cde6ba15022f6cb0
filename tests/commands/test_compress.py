"""``compactnn compress``: the output folder, early argument checks, the data it reads
(files, token ids, data-free images) and the printed next step (the summary of the result:
test_compress_summary.py)."""

from __future__ import annotations

import numpy as np
import pytest

from compactnn.commands._common import cli_words
from compactnn.errors import CompactnnError
from tests.commands._compress_cli import assert_one_error_line, fake_generate, run_cli


@pytest.fixture
def hf_folder(tmp_path):
    """A Hugging Face model folder as the user has it (its files are what matters here)."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "model.safetensors").write_bytes(b"the user's weights")
    return folder


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_out_is_never_the_model_folder(hf_folder, capsys, force):
    argv = ["compress", str(hf_folder), "-r", "w8", "--out", str(hf_folder), *force]
    assert_one_error_line(capsys, argv, "input model's own folder", "empty or new folder")
    assert (hf_folder / "model.safetensors").read_bytes() == b"the user's weights"


def test_out_holding_other_files_is_refused_before_loading(hf_folder, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    argv = ["compress", str(hf_folder), "-r", "w8", "--out", str(tmp_path / "mine")]
    assert_one_error_line(capsys, argv, "not empty", "notes.txt", "empty or new folder")


@pytest.mark.parametrize(
    ("recipe", "needle"), [("w4a8", "rtn with quantized activations"), ("w4-g32-gptq", "gptq")]
)
def test_a_recipe_that_calibrates_needs_data_before_the_model_loads(
    hf_folder, tmp_path, capsys, recipe, needle
):
    # hf_folder's weights are not loadable: the refusal comes before any loading
    argv = ["compress", str(hf_folder), "-r", recipe, "--out", str(tmp_path / "a")]
    err = assert_one_error_line(capsys, argv, needle, "pass --data FILE")
    assert "calib_data=" not in err


def test_library_messages_get_the_command_lines_words():
    exc = CompactnnError("wanda needs calibration data: pass calib_data= (a tensor).")
    assert str(cli_words(exc, None)) == "wanda needs calibration data: pass --data FILE (a tensor)."
    assert cli_words(exc, "x.npy") is exc


def test_the_printed_eval_command_works_for_a_hugging_face_folder(tmp_path, capsys):
    from compactnn.models.tiny_hf import tiny_model

    model, _ = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "art"
    code, printed, err = run_cli(
        capsys, "compress", str(tmp_path / "hf"), "-r", "w8", "--out", str(out), "--no-progress"
    )
    assert code == 0, err
    assert f"evaluate it: compactnn eval {out} --model {tmp_path / 'hf'}\n" in printed


def test_labelled_data_calibrates_on_x_and_the_eval_line_names_the_model(
    tmp_path, capsys, monkeypatch
):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "labelnet.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), "
        "nn.Linear(16, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import labelnet

    save_file(labelnet.make().state_dict(), "w.safetensors")
    save_file({"x": torch.randn(32, 1, 4, 4), "y": torch.randint(0, 3, (32,))}, "xy.safetensors")
    model = ["labelnet:make", "--weights", "w.safetensors"]
    argv = ["compress", *model, "-r", "w8a8", "-d", "xy.safetensors", "-o", "art", "--no-progress"]
    code, printed, err = run_cli(capsys, *argv)
    assert code == 0, err
    # never evaluate on the calibration data: a placeholder unless the file holds a test split
    assert "--model labelnet:make --weights w.safetensors --data HELD_OUT_FILE" in printed
    split = {"x_train": torch.randn(32, 1, 4, 4), "y_train": torch.randint(0, 3, (32,))}
    split |= {"x_test": torch.randn(8, 1, 4, 4), "y_test": torch.randint(0, 3, (8,))}
    save_file(split, "split.safetensors")
    argv = ["compress", *model, "-r", "w8a8", "-d", "split.safetensors", "-o", "art2",
            "--no-progress"]  # fmt: skip
    code, printed, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "--model labelnet:make --weights w.safetensors --data split.safetensors" in printed
    assert_one_error_line(
        capsys, ["compress", "labelnet:make", "--weights", ".", "-r", "w8"], "is a folder"
    )


def test_data_free_without_batch_norm_gives_the_command_line_way(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    (tmp_path / "nobnnet.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), "
        "nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import nobnnet

    save_file(nobnnet.make().state_dict(), "w.safetensors")
    model = ["nobnnet:make", "--weights", "w.safetensors"]
    argv = ["compress", *model, "-r", "w4a8", "-d", "data-free", "-o", "art"]
    err = assert_one_error_line(
        capsys, argv, "no BatchNorm layer", "--data FILE", "the command line has no DAFL option"
    )
    assert "input_shape=(C, H, W), method='dafl'" in err and "--data dafl.safetensors" in err
    argv += ["--input-shape", "3,8,8"]
    assert "input_shape=(3,8,8)" in assert_one_error_line(capsys, argv, "no BatchNorm layer")
    assert not (tmp_path / "art").exists()


def test_token_ids_the_model_cannot_take_are_named_before_compressing(token_files, capsys):
    def compress(name):
        data = str(token_files / name)
        argv = ["compress", str(token_files / "bert"), "-r", "w8a8", "-d", data,
                "-o", str(token_files / f"art-{name}"), "--no-progress"]  # fmt: skip
        return data, argv

    def error(argv):  # the last line: transformers draws its loading bar on stderr first
        code, _out, err = run_cli(capsys, *argv)
        assert code == 2, err
        return err.splitlines()[-1]

    data, argv = compress("long.npy")
    assert error(argv) == (
        f"error: --data {data} holds sequences of 40 tokens and the model takes at most 32 "
        "(max_position_embeddings in its config.json): cut each sequence to 32 tokens or "
        "fewer (e.g. ids[:, :32], or windows of 32) and save the file again."
    )
    data, argv = compress("oov.npy")
    assert error(argv) == (
        f"error: --data {data} holds token ids out of the model's vocabulary: the largest id "
        "found is 150, and the vocabulary has 100 entries (ids 0 to 99). Tokenize the text "
        "with the model's own tokenizer (the one saved with it)."
    )
    assert not (token_files / "art-oov.npy").exists()
    _data, argv = compress("ok.npy")
    code, _out, err = run_cli(capsys, *argv)
    assert code == 0, err


def test_the_data_file_is_read_once(tmp_path, capsys, monkeypatch):
    """Calibration (x_train) and the printed eval line (x_test present?) share one read."""
    import torch
    from safetensors.torch import save_file

    from compactnn import model_io

    (tmp_path / "readnet.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), "
        "nn.Linear(16, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import readnet

    save_file(readnet.make().state_dict(), "w.safetensors")
    split = {"x_train": torch.randn(32, 1, 4, 4), "y_train": torch.randint(0, 3, (32,))}
    split |= {"x_test": torch.randn(8, 1, 4, 4), "y_test": torch.randint(0, 3, (8,))}
    save_file(split, "split.safetensors")
    reads, read = [], model_io.read_tensors
    monkeypatch.setattr(
        model_io, "read_tensors", lambda p, *a, **k: reads.append(str(p)) or read(p, *a, **k)
    )
    argv = ["compress", "readnet:make", "--weights", "w.safetensors", "-r", "w8a8",
            "-d", "split.safetensors", "-o", "art", "--no-progress"]  # fmt: skip
    code, printed, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert reads.count("split.safetensors") == 1
    assert "--data split.safetensors\n" in printed  # the eval line still names its test split


@pytest.mark.parametrize("data", [None, "data-free"])
def test_the_eval_line_asks_for_held_out_data_when_none_was_read(data):
    import argparse

    from torch import nn

    from compactnn.commands.compress import eval_data_file
    from compactnn.model_io import LoadedModel

    args = argparse.Namespace(data=data)
    assert eval_data_file(args, LoadedModel(nn.Identity(), "mynet:make"), None) == "HELD_OUT_FILE"


def test_the_eval_line_passes_a_keyword_split_file_that_holds_a_held_out_split():
    """A Hugging Face classifier's ``--data`` with ``input_ids_train``/``y_train`` and
    ``input_ids_test``/``y_test`` (the documented keyword split): eval reads its test split,
    so the printed line names the file, not HELD_OUT_FILE."""
    import argparse

    import torch
    from torch import nn

    from compactnn.commands.compress import eval_data_file
    from compactnn.model_io import LoadedModel

    ids, y = torch.ones(2, 3).long(), torch.tensor([0, 1])
    split = {"input_ids_train": ids, "y_train": y, "input_ids_test": ids, "y_test": y}
    args = argparse.Namespace(data="split.safetensors")
    loaded = LoadedModel(nn.Identity(), "mynet:make")
    assert eval_data_file(args, loaded, split) == "split.safetensors"
    no_test = {"input_ids": ids, "y": y}  # calibration data only: still asks for held-out data
    assert eval_data_file(args, loaded, no_test) == "HELD_OUT_FILE"


def _bn_project(tmp_path, monkeypatch):
    """``bnnet:make`` (a CNN with batch norm, 1x8x8 inputs) and its ``w.safetensors``."""
    import torch
    from safetensors.torch import save_file

    (tmp_path / "bnnet.py").write_text(
        "import torch\nfrom torch import nn\n\ndef make():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), "
        "nn.Flatten(), nn.Linear(4 * 6 * 6, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import bnnet

    model = bnnet.make().eval()
    model[1].running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
    save_file(model.state_dict(), "w.safetensors")
    return model


def test_data_free_generates_nothing_for_a_recipe_that_reads_no_data(tmp_path, capsys, monkeypatch):
    """w4 (weight-only RTN) calibrates on nothing: no images are generated, a note says so,
    and the artifact is the one compress makes without data; w4a8 still generates them."""
    import torch

    import compactnn
    from compactnn import datafree

    model = _bn_project(tmp_path, monkeypatch)
    made = []
    monkeypatch.setattr(datafree, "generate", fake_generate(made))
    argv = ["compress", "bnnet:make", "--weights", "w.safetensors", "-d", "data-free"]
    code, out, err = run_cli(capsys, *argv, "-r", "w4", "-o", "w4", "--no-progress")
    assert code == 0, err
    assert made == [] and "generated" not in out
    assert "note: no step of w4 calibrates on data: no images generated" in err
    expected = compactnn.compress(model, "w4", progress=False)
    loaded = compactnn.load("w4", model=model)
    for (name, a), (_, b) in zip(
        expected.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    argv += ["--input-shape", "1,8,8"]
    code, out, err = run_cli(capsys, *argv, "-r", "w4a8", "-o", "w4a8", "--no-progress")
    assert code == 0, err
    assert made == [(1, 8, 8)] and "generated 256 calibration images" in out
    assert "no images generated" not in err


def test_input_shape_without_data_free_is_refused(tmp_path, capsys, monkeypatch):
    """--input-shape shapes generated images only: with a data file (or no --data) it would
    be ignored, so it is refused before the model loads, naming both ways out."""
    _bn_project(tmp_path, monkeypatch)
    np.save("x.npy", np.zeros((4, 1, 8, 8), dtype=np.float32))
    model = ["bnnet:make", "--weights", "w.safetensors", "-r", "w4", "-o", "art"]
    for data, said in ((["-d", "x.npy"], "--data x.npy"), ([], "no --data")):
        assert_one_error_line(
            capsys,
            ["compress", *model, *data, "--input-shape", "3,9,9"],
            f"--input-shape 3,9,9 sets the shape of the images --data data-free generates, "
            f"and this run has {said}",
            "drop --input-shape, or pass --data data-free",
        )
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize(
    ("recipe", "reads"),
    [
        ("w4", False),  # weight-only round-to-nearest: the weights alone
        ("w8", False),
        ("nm2:4", False),  # magnitude N:M, no fine-tuning
        ("w4a8", True),  # activation grids
        ("w4-g128-gptq", True),  # Hessians of the layer inputs
        ("w2-ffn", True),  # refits its scales on the layer outputs when given data
        ("sp90-dns", True),  # distils while pruning (needs_data says False)
    ],
)
def test_data_free_images_are_generated_only_for_a_recipe_that_reads_data(recipe, reads):
    import compactnn
    from compactnn.commands.compress import reads_data

    assert reads_data(compactnn.resolve_recipe(recipe)) is reads


def test_data_free_images_sets_the_count_and_the_artifact_records_it(tmp_path, capsys, monkeypatch):
    """--data-free-images N generates N images (the same a Python generate() call makes:
    the artifact equals compress on them), the artifact's extra["calibration_data"] says its
    calibration images were generated, and the summary prints it."""
    import json

    import torch

    import compactnn
    from compactnn.datafree import generate

    model = _bn_project(tmp_path, monkeypatch)
    argv = ["compress", "bnnet:make", "--weights", "w.safetensors", "-d", "data-free"]
    argv += ["--input-shape", "1,8,8", "--data-free-images", "8", "-r", "w4a8", "-o", "art"]
    code, out, err = run_cli(capsys, *argv, "--no-progress")
    assert code == 0, err
    assert "generated 8 calibration images" in out
    data = generate(model, 8, input_shape=(1, 8, 8), seed=0, progress=False)
    record = json.loads(json.dumps(compactnn.load("art", model=model)._compactnn["extra"]))
    assert record["calibration_data"] == {
        "data": "data-free",
        "method": "bn-inversion",
        "images": 8,
        "steps": 200,
        "input_shape": [1, 8, 8],
        "seed": 0,
        "real_data": False,
    }  # nothing machine-dependent (no wall time): identical runs write identical artifacts
    assert "  calibration: 8 generated images (data-free, bn-inversion, 200 steps" in out
    expected = compactnn.compress(model, "w4a8", calib_data=data, progress=False)
    loaded = compactnn.load("art", model=model)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded(x), expected(x))


def test_data_free_images_is_refused_without_data_free_or_below_one(tmp_path, capsys, monkeypatch):
    _bn_project(tmp_path, monkeypatch)
    np.save("x.npy", np.zeros((4, 1, 8, 8), dtype=np.float32))
    model = ["bnnet:make", "--weights", "w.safetensors", "-r", "w4a8", "-o", "art"]
    assert_one_error_line(
        capsys,
        ["compress", *model, "-d", "x.npy", "--data-free-images", "64"],
        "--data-free-images 64 sets how many images --data data-free generates, and this "
        "run has --data x.npy",
    )
    free = ["-d", "data-free", "--input-shape", "1,8,8"]
    assert_one_error_line(
        capsys,
        ["compress", *model, *free, "--data-free-images", "0"],
        "--data-free-images 0: give a positive number of images",
    )
    assert not (tmp_path / "art").exists()
