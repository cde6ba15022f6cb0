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


@pytest.mark.parametrize("no_progress", [True, False])
def test_no_progress_hides_the_hugging_face_loading_bar(no_progress, tmp_path):
    import argparse

    pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    from compactnn.commands._common import load_model
    from compactnn.models.tiny_hf import tiny_model

    model, _ = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    args = argparse.Namespace(no_progress=no_progress, weights=None, trust_pickle=False)
    hf_logging.enable_progress_bar()
    try:
        load_model(str(tmp_path / "hf"), args)
        assert hf_logging.is_progress_bar_enabled() is not no_progress
    finally:
        hf_logging.enable_progress_bar()
