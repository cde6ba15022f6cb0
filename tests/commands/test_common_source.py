"""The command line's record of a Hugging Face source equals the streamed run's."""

import pytest
from torch import nn

from compactnn.commands._common import source_record
from compactnn.model_io import LoadedModel


def test_a_hugging_face_folder_is_recorded_as_a_streamed_run_records_it(tmp_path):
    pytest.importorskip("transformers")
    from compactnn.models.tiny_hf import tiny_model
    from compactnn.streaming.shards import ShardSet

    model, _ = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    record = source_record(LoadedModel(model=nn.Identity(), source=str(tmp_path / "hf")))
    assert record == ShardSet(tmp_path / "hf").source()
    assert list(record) == ["kind", "model", "weights_sha256"]  # same key order: same bytes
