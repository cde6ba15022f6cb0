"""The scale bench's whole-model and streamed artifacts record the same source."""

import json

import pytest
import torch

from compactnn.bench import scale


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_whole_model_artifact_records_the_source_the_streamed_one_does(
    tmp_path, capsys, one_thread
):
    pytest.importorskip("transformers")
    model = tmp_path / "llama"
    scale.make_model(model, hidden=128, inter=256, layers=2, vocab=256)
    base = {"model": str(model), "vocab": 256, "budget": "4GiB", "threads": 1}
    scale._child({**base, "kind": "whole", "out": str(tmp_path / "whole")})
    scale._child({**base, "kind": "stream", "out": str(tmp_path / "stream")})
    header = json.loads((tmp_path / "whole" / "compactnn.json").read_text())
    source = header["extra"]["source"]
    assert source["kind"] == "Hugging Face directory"
    assert source["model"] == str(model.resolve())
    assert len(source["weights_sha256"]) == 64
    assert scale.same_artifact(tmp_path / "whole", tmp_path / "stream")
