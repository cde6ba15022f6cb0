"""A checkpoint of an older compactnn (no fingerprints of the run's float model and data) is
refused for that reason first, in words that hold for a reference model too."""

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.training.checkpoint import checkpoint_path

KW = dict(seed=0, progress=False)


def test_an_older_checkpoint_is_refused_for_its_version_before_any_other_mismatch(tiny, tmp_path):
    model, data, _ = tiny
    compactnn.train(model, "w4a4-pact", data, checkpoint_dir=tmp_path, epochs=1, max_steps=2, **KW)
    path = checkpoint_path(tmp_path)
    state = torch.load(path, weights_only=True)
    del state["run"]["model_sha256"], state["run"]["data_sha256"]
    torch.save(state, path)  # as compactnn before the fingerprints wrote it
    with pytest.raises(CompactnnError) as err:  # another epochs, as well as another version
        compactnn.train(model, "w4a4-pact", data, checkpoint_dir=tmp_path, epochs=2, **KW)
    message = str(err.value)
    assert message.startswith(f"checkpoint {str(path)!r} was written by an older compactnn, ")
    assert "finish it with the compactnn that wrote it, or start afresh" in message
    assert "new checkpoint_dir (--checkpoint-dir)" in message
    assert "--weights" not in message and "epochs=" not in message
