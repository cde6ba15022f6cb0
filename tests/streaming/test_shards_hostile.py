"""Streamed compression's shard reader on hostile Hugging Face folders: a shard that is a
FIFO (whose open would wait forever), a device or a link to one is refused before anything
opens it, and a shard index that is not a JSON object of shard files (nested past the
parser's depth, an array, a ``weight_map`` that is no object) is one user error, never a
traceback."""

from __future__ import annotations

import json
import os
import select
import signal

import pytest
import torch
from safetensors.torch import save_file

from compactnn.errors import CompactnnError
from compactnn.streaming.shards import INDEX, SINGLE, ShardSet

SHARD = "model-00001-of-00001.safetensors"
DEEP = 100_000  # far past CPython's recursion limit


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g)}


def _folder(tmp_path, shard_kind="file"):
    """``tmp_path/m``: config.json, an index mapping every tensor to SHARD, and SHARD as a
    regular file, a FIFO, a link to /dev/zero, a folder, a broken link, or missing."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    tensors = _tensors()
    (folder / INDEX).write_text(json.dumps({"weight_map": dict.fromkeys(tensors, SHARD)}))
    shard = folder / SHARD
    if shard_kind == "file":
        save_file(tensors, str(shard))
    elif shard_kind == "fifo":
        os.mkfifo(shard)
    elif shard_kind == "device link":
        shard.symlink_to("/dev/zero")
    elif shard_kind == "folder":
        shard.mkdir()
    elif shard_kind == "broken link":
        shard.symlink_to(folder / "gone.safetensors")
    return folder


def _finishes(call, seconds=20.0):
    """``{"error": message}`` of the CompactnnError ``call()`` raises (``{"value": ...}`` if
    it returns), run in a forked child: a call blocked on a FIFO holds the GIL (safetensors'
    open does not release it), so only another process can stop it (it is killed after
    ``seconds`` and the test fails)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's cleanup
        os.close(read_end)
        try:
            outcome = {"value": call()}
        except CompactnnError as exc:
            outcome = {"error": str(exc)}
        except BaseException as exc:  # reported to the parent
            outcome = {"other": f"{type(exc).__name__}: {exc}"}
        os.write(write_end, json.dumps(outcome, default=repr).encode())
        os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], seconds)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"blocked for {seconds} s (a FIFO opened?)")
        with os.fdopen(read_end, "rb") as f:
            return json.loads(f.read() or b'{"other": "no report"}')
    finally:
        os.waitpid(pid, 0)


def test_a_good_sharded_folder_reads_back_what_was_saved(tmp_path):
    folder = _folder(tmp_path)
    shards = ShardSet(folder)
    assert shards.weight_map == json.loads((folder / INDEX).read_text())["weight_map"]
    got = shards.read(["a.weight", "b.bias"])
    for name, tensor in _tensors().items():
        assert torch.equal(got[name], tensor)
    assert len(shards.fingerprint()) == 64


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("fifo", "(a FIFO)"),
        ("device link", "(a link to a device)"),
        ("folder", "(a directory)"),
        ("broken link", "(a broken link)"),
        ("missing", "does not exist"),
    ],
)
def test_a_shard_that_is_no_regular_file_is_refused_before_it_is_opened(tmp_path, kind, said):
    folder = _folder(tmp_path, kind)
    with pytest.raises(CompactnnError) as info:
        ShardSet(folder)
    message = str(info.value)
    assert said in message and SHARD in message and "\n" not in message
    assert "names it as a shard" in message


def test_a_shard_swapped_for_a_fifo_later_is_refused_by_read_and_fingerprint(tmp_path):
    folder = _folder(tmp_path)
    shards = ShardSet(folder)
    (folder / SHARD).unlink()
    os.mkfifo(folder / SHARD)
    for call in (lambda: shards.read(["a.weight"]), shards.fingerprint):
        outcome = _finishes(call)
        assert "is not a regular file (a FIFO)" in outcome.get("error", ""), outcome


@pytest.mark.parametrize("kind", ["fifo", "device link"])
def test_a_single_model_safetensors_that_is_no_regular_file_is_refused(tmp_path, kind):
    folder = _folder(tmp_path, "missing")
    (folder / INDEX).unlink()
    if kind == "fifo":
        os.mkfifo(folder / SINGLE)
    else:
        (folder / SINGLE).symlink_to("/dev/zero")
    outcome = _finishes(lambda: ShardSet(folder))
    assert f"{SINGLE}' is not a regular file" in outcome.get("error", ""), outcome


def test_the_deep_index_really_is_past_the_json_parser(tmp_path):
    with pytest.raises(RecursionError):  # the reference: what an unguarded read meets
        json.loads('{"weight_map":' + "[" * DEEP + "]" * DEEP + "}")


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('{"weight_map":' + "[" * DEEP + "]" * DEEP + "}", "deeper than Python's parser"),
        ("[]", "holds a JSON array, not an object"),
        ('"x"', "holds a JSON string, not an object"),
        ('{"weight_map": []}', "its weight_map is a JSON array, not an object"),
        ("{}", "its weight_map is missing"),
        ('{"weight_map": {"a.weight": "../x.safetensors"}}', "names a bad shard"),
        ('{"weight_map": {"a.weight": 3}}', "names a bad shard"),
        ('{"weight_map": {"a.weight": ".."}}', "names a bad shard"),
        ("{not json", "is not valid JSON"),
        (b"\xff\xfe\x00", "is not valid JSON"),
    ],
)
def test_a_hostile_index_is_one_user_error(tmp_path, text, said):
    folder = _folder(tmp_path)
    index = folder / INDEX
    if isinstance(text, bytes):
        index.write_bytes(text)
    else:
        index.write_text(text)
    with pytest.raises(CompactnnError) as info:
        ShardSet(folder)
    message = str(info.value)
    assert said in message and INDEX in message and "\n" not in message
    assert "save_pretrained" in message


def test_an_index_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    folder = _folder(tmp_path)
    (folder / INDEX).unlink()
    os.mkfifo(folder / INDEX)
    outcome = _finishes(lambda: ShardSet(folder))
    assert f"{INDEX}' is not a regular file (a FIFO)" in outcome.get("error", ""), outcome
