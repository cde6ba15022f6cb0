"""The command line's record of a Hugging Face source equals the streamed run's; --data
files split into inputs and labels."""

import pytest
import torch
from torch import nn

from compactnn.commands._common import source_record, split_labels
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


def test_split_labels_reads_labels_beside_keyword_inputs(capsys):
    ids, mask, y = torch.arange(8).view(4, 2), torch.ones(4, 2).long(), torch.tensor([0, 1, 1, 0])
    inputs, labels = split_labels({"input_ids": ids, "attention_mask": mask, "y": y})
    assert set(inputs) == {"input_ids", "attention_mask"} and labels is y
    train = {"input_ids_train": ids, "attention_mask_train": mask, "y_train": y}
    calib, labels = split_labels(train, role="train")
    assert calib["input_ids"] is ids and calib["attention_mask"] is mask and labels is y
    assert set(calib) == {"input_ids", "attention_mask"}
    scored, labels = split_labels(train)  # the only split serves scoring too
    assert scored["input_ids"] is ids and labels is y
    alone = {"input_ids": ids, "attention_mask": mask}
    assert split_labels(alone) == (alone, None)  # inputs only: output cosine
