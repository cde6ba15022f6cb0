"""``compactnn export --format onnx``: a BERT keeps its segment ids (``token_type_ids``), and
an existing ``--out`` is refused with the command line's own option (``--force``)."""

import pytest
import torch

import compactnn
from compactnn.cli import main
from compactnn.commands.export import _example, takes_segments

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


def _tiny_bert_classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=3,
        initializer_range=0.2,  # logits of order 1, segments moving them visibly
    )  # fmt: skip
    assert config.type_vocab_size == 2  # BERT's default: sentence A and sentence B
    model = transformers.BertForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(4, 128, (4, 16), generator=gen)} for _ in range(2)]
    for batch in calib:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return model, calib


def test_cli_onnx_export_takes_token_type_ids_and_matches_the_model(tmp_path):
    model, calib = _tiny_bert_classifier()
    compactnn.save(
        compactnn.compress(model, "w8", calib_data=calib, progress=False), tmp_path / "a"
    )
    out = tmp_path / "bert.onnx"
    assert main(["export", str(tmp_path / "a"), "--format", "onnx", "--out", str(out)]) == 0
    names = [i.name for i in onnx.load(str(out)).graph.input]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]

    qmodel = compactnn.load(tmp_path / "a")
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 128, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    segments = (torch.arange(12) >= 5).long().expand(2, 12).contiguous()  # a sentence pair
    with torch.no_grad():
        want = qmodel(input_ids=ids, attention_mask=mask, token_type_ids=segments).logits
        zeros = qmodel(input_ids=ids, attention_mask=mask).logits
    assert (want - zeros).abs().max() > 0.05  # the segment ids change the numbers
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": segments}
    got = sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4, rtol=0)


def test_the_example_holds_the_inputs_the_model_takes():
    bert, _ = _tiny_bert_classifier()
    assert takes_segments(bert)
    made = _example(bert, None)
    assert list(made) == ["input_ids", "attention_mask", "token_type_ids"]
    assert made["token_type_ids"].tolist() == [[0] * 8 + [1] * 8]
    given = {"input_ids": torch.ones(2, 5, dtype=torch.long)}
    assert torch.equal(_example(bert, given)["token_type_ids"], torch.zeros(2, 5).long())
    assert "token_type_ids" not in given  # the caller's batch is not changed
    bert.config.type_vocab_size = 1  # a single segment: nothing to feed
    assert not takes_segments(bert)
    assert list(_example(bert, None)) == ["input_ids", "attention_mask"]
    small = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    config = transformers.LlamaConfig(num_attention_heads=2, num_key_value_heads=1, **small)
    llama = transformers.LlamaForCausalLM(config)  # no segment ids in its forward
    assert not takes_segments(llama)
    assert list(_example(llama, None)) == ["input_ids", "attention_mask"]


def test_an_existing_out_names_the_command_line_option(tmp_path, capsys):
    (tmp_path / "bc.onnx").write_text("mine")
    argv = ["export", str(tmp_path / "art"), "--format", "onnx", "--out", str(tmp_path / "bc.onnx")]
    assert main(argv) == 2  # refused before the artifact is even read
    err = capsys.readouterr().err
    assert err.strip() == (
        f"error: --out {str(tmp_path / 'bc.onnx')!r} exists; pass --force to replace it."
    )
    assert (tmp_path / "bc.onnx").read_text() == "mine"
