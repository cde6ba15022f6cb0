"""``compactnn compress`` on hostile Hugging Face folders, whole-model and streamed
(``--max-memory``): a ``config.json`` or shard index nested past the JSON parser's depth, an
index that is no object of shard files, and weights that are a FIFO (whose open would wait
forever) or a link to a device are each one ``error:`` line, exit 2, never a traceback or a
hang."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compactnn.commands.hf_checkpoint import stored_half
from tests.commands._compress_cli import run_cli
from tests.streaming.test_shards_hostile import _finishes

transformers = pytest.importorskip("transformers")

INDEX = "model.safetensors.index.json"
SHARD = "model-00001-of-00001.safetensors"
DEEP = 100_000


@pytest.fixture
def bert(tmp_path, monkeypatch):
    """``tmp_path/bert``: a tiny random BERT (config.json, model.safetensors), and
    ``tmp_path/ids.safetensors`` token ids for it; the working folder is ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    ids = torch.randint(1, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    return tmp_path / "bert"


def _sharded(folder):
    """Turn ``folder``'s model.safetensors into an index naming SHARD (left missing)."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    (folder / "model.safetensors").unlink()
    (folder / INDEX).write_text(json.dumps({"weight_map": dict.fromkeys(keys, SHARD)}))


def _compress(capsys, folder, streamed):
    """``(exit code, stdout, stderr)`` of compress on ``folder``, run in a child process
    killed after 20 s (a FIFO's open blocks with the GIL held)."""
    argv = ["compress", str(folder), "--data", "ids.safetensors", "--out", "art"]
    argv += ["-r", "w4-g16-gptq", "--max-memory", "200MB"] if streamed else ["-r", "w8a8"]
    outcome = _finishes(lambda: run_cli(capsys, *argv, "--no-progress"))
    assert "value" in outcome, outcome
    return outcome["value"]


def _one_error_line(result, *needles):
    code, _out, err = result
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not os.path.exists("art")


@pytest.mark.parametrize("streamed", [False, True])
def test_a_config_nested_past_the_parser_is_one_error_line(bert, capsys, streamed):
    (bert / "config.json").write_text('{"a":' * DEEP + "1" + "}" * DEEP)
    with pytest.raises(RecursionError):  # the reference: what an unguarded parse meets
        json.loads((bert / "config.json").read_text())
    _one_error_line(
        _compress(capsys, bert, streamed), "config.json' nests its JSON deeper than Python's"
    )


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    ("index", "said"),
    [
        ('{"weight_map":' + "[" * DEEP + "]" * DEEP + "}", "nests its JSON deeper"),
        ("[]", "holds a JSON array, not an object"),
        ('{"weight_map": []}', "its weight_map is a JSON array, not an object"),
    ],
)
def test_a_hostile_shard_index_is_one_error_line(bert, capsys, streamed, index, said):
    _sharded(bert)
    (bert / INDEX).write_text(index)
    assert stored_half(str(bert)) is None  # the float16 note's reader says nothing
    _one_error_line(_compress(capsys, bert, streamed), f"{INDEX}'", said, "save_pretrained")


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(("kind", "said"), [("fifo", "a FIFO"), ("zero", "a link to a device")])
def test_a_shard_that_is_no_regular_file_is_refused_not_opened(bert, capsys, streamed, kind, said):
    _sharded(bert)
    if kind == "fifo":
        os.mkfifo(bert / SHARD)
    else:
        (bert / SHARD).symlink_to("/dev/zero")
    _one_error_line(
        _compress(capsys, bert, streamed),
        f"{SHARD}' is not a regular file ({said})",
        "names it as a shard",
    )


@pytest.mark.parametrize(("kind", "said"), [("fifo", "a FIFO"), ("zero", "a link to a device")])
def test_model_safetensors_that_is_no_regular_file_is_named_so(bert, capsys, kind, said):
    (bert / "model.safetensors").unlink()
    if kind == "fifo":
        os.mkfifo(bert / "model.safetensors")
    else:
        (bert / "model.safetensors").symlink_to("/dev/zero")
    result = _compress(capsys, bert, streamed=False)
    _one_error_line(result, f"model.safetensors' is not a regular file ({said})")
    assert "is not model.safetensors" not in result[2]


def test_a_stray_safetensors_file_is_still_named_beside_no_weights(bert, capsys):
    (bert / "model.safetensors").rename(bert / "weights.safetensors")
    _one_error_line(
        _compress(capsys, bert, streamed=False),
        "has no weights",
        "(weights.safetensors is not model.safetensors, so transformers does not read it)",
    )


def test_model_safetensors_wins_over_a_hostile_index_as_in_transformers(bert):
    (bert / INDEX).write_text("[]")  # transformers reads model.safetensors, never the index
    bf16 = {k: v.to(torch.bfloat16) for k, v in _state(bert).items()}
    save_file(bf16, str(bert / "model.safetensors"))
    size = (bert / "model.safetensors").stat().st_size
    assert stored_half(str(bert)) == ("bfloat16", size)


def _state(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("architectures", 5, "architectures is 5, not a list of class names"),
        ("architectures", [7], "architectures is [7], not a list of class names"),
        ("model_type", 3, "model_type is 3, not a name"),
    ],
)
def test_a_config_field_of_the_wrong_type_is_named(bert, capsys, field, value, said):
    """transformers failed on them with "'int' object is not subscriptable"."""
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, field: value}))
    _one_error_line(_compress(capsys, bert, False), said, "config.json saved with the model")


def test_streamed_compress_reads_model_safetensors_before_an_index_as_transformers_does(
    bert, capsys
):
    """With a good model.safetensors beside a hostile index, the whole-model path compressed
    and the streamed one refused the index transformers never reads."""
    (bert / INDEX).write_text("[]")
    code, _out, err = _compress(capsys, bert, True)
    assert code == 0, err
