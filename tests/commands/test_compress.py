"""``compactnn compress``: the output folder, early argument checks and the printed next step."""

from __future__ import annotations

import pytest

from compactnn.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(capsys, argv, *needles: str) -> str:
    code, _out, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


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
