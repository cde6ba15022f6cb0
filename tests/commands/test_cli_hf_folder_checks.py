"""The command line on Hugging Face folders it must not take as they are (their model is
code in the folder: refused in one line, nothing written, the code never run) and on
bfloat16 checkpoints (said once to be computed in float32; sizes compared with the
checkpoint as stored too)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from compactnn.errors import CompactnnError
from compactnn.model_io import resolve_model
from tests.commands._compress_cli import assert_one_error_line, run_cli

transformers = pytest.importorskip("transformers")


def _llama(tmp_path, dtype=torch.float32, **config_fields):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    if config_fields:
        saved = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**saved, **config_fields}))
    return folder


def test_a_folder_with_its_own_model_code_is_refused_by_every_command(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    auto_map = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    folder = _llama(tmp_path, architectures=["EvilForCausalLM"], auto_map=auto_map)
    (folder / "modeling_evil.py").write_text("open('PWNED', 'w').write('ran')\n")
    with pytest.raises(CompactnnError, match="its code is in the folder"):
        resolve_model(str(folder))  # eval, report, deploy, search and train load it so too
    out = tmp_path / "out"
    capsys.readouterr()  # save_pretrained's progress bar
    assert_one_error_line(
        capsys,
        ["compress", str(folder), "--recipe", "w4-g32", "--out", str(out), "--no-progress"],
        "names the architecture 'EvilForCausalLM' with an auto_map",
        "compactnn never runs code from a model folder",
        "compactnn.compress(model, ...)",
    )
    assert not out.exists() and not (tmp_path / "PWNED").exists()


def test_a_bfloat16_checkpoint_is_said_to_run_in_float32_and_sized_as_stored(tmp_path, capsys):
    folder = _llama(tmp_path, torch.bfloat16)
    stored = (folder / "model.safetensors").stat().st_size
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    out = tmp_path / "out"
    capsys.readouterr()
    argv = [
        "compress",
        str(folder),
        "--recipe",
        "w4-g32",
        "--data",
        str(tmp_path / "ids.safetensors"),
    ]
    code, stdout, err = run_cli(capsys, *argv, "--out", str(out), "--no-progress")
    assert code == 0, err
    assert err.count(f"note: {folder} stores its weights in bfloat16") == 1, err
    assert "computes in float32" in err
    size = sum(p.stat().st_size for p in out.iterdir())
    line = next(x for x in stdout.splitlines() if x.startswith("  artifact:"))
    ratio = f"{stored / size:.2f}x smaller"
    tail = f"; bfloat16 checkpoint {stored / 1024:.1f} KiB ({stored:,} B), {ratio})"
    assert line.endswith(tail), line
    code, stdout, err = run_cli(
        capsys, "eval", str(out), "--model", str(folder), "--data",
        str(tmp_path / "ids.safetensors"), "--quick", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert f"the bfloat16 checkpoint it was loaded from, {folder}, is" in stdout, stdout
    assert f"({stored:,} B): the compressed model is {stored / size:.2f}x smaller than it" in stdout
