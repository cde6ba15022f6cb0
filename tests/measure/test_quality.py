"""compactnn.measure.evaluate: top-1 and user metrics on labelled data, every data form."""

import warnings

import pytest
import torch
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.measure import evaluate


def _identity_model() -> nn.Module:
    """Logits = inputs: the prediction of a row is the index of its largest value."""
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    return model


X = torch.tensor(
    [
        [3.0, 1.0, 0.0],  # predicts 0
        [0.0, 2.0, 1.0],  # predicts 1
        [0.0, 1.0, 5.0],  # predicts 2
        [4.0, 0.0, 1.0],  # predicts 0
        [1.0, 0.0, 2.0],  # predicts 2
    ]
)
Y = torch.tensor([0, 1, 1, 2, 2])  # rows 0, 1 and 4 are right: 3 of 5


def test_top1_of_a_model_whose_predictions_are_known():
    assert evaluate(_identity_model(), (X, Y)) == pytest.approx(60.0)


@pytest.mark.parametrize(
    "data",
    [
        (X, Y),
        [X, Y],
        {"x": X, "y": Y},
        {"x_train": X, "y_train": Y},
        [(X[:2], Y[:2]), (X[2:], Y[2:])],  # an iterable of batches (as a DataLoader gives)
        iter([(X[:4], Y[:4]), (X[4:], Y[4:])]),  # a one-shot iterator
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=2),
        type("Split", (), {"x_train": X, "y_train": Y})(),
    ],
)
def test_every_data_form_gives_the_same_top1(data):
    assert evaluate(_identity_model(), data, batch_size=2) == pytest.approx(60.0)


def test_float64_inputs_are_cast_and_batch_size_does_not_matter():
    model = _identity_model()
    for batch_size in (1, 2, 5, 100):
        assert evaluate(model, (X.double(), Y), batch_size=batch_size) == pytest.approx(60.0)


def test_callable_metric_is_the_mean_over_samples():
    # per-sample value: the top logit; batches of 2, 2 and 1 must weigh by their size
    def top_logit(out, labels):
        return float(out.max(1).values.mean())

    expected = float(X.max(1).values.mean())  # (3 + 2 + 5 + 4 + 2) / 5 = 3.2
    assert evaluate(_identity_model(), (X, Y), metric=top_logit, batch_size=2) == pytest.approx(
        expected
    )
    assert expected == pytest.approx(3.2)


def test_model_mode_is_restored():
    model = _identity_model().train()
    evaluate(model, (X, Y))
    assert model.training


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (X, "no labels"),
        (None, "no labels"),
        ("mnist", "not supported"),
        ((X, Y[:3]), "5 inputs but 3 labels"),
        ({"x": X}, "x/y"),
        ((X, Y.float()), "integer"),
        ((X, torch.tensor([0, 1, 2, 3, 0])), "[0, 2]"),
        ((torch.randn(5, 7), Y), "(..., 3)"),
        ((X[:0], Y[:0]), "empty"),
    ],
)
def test_bad_data_raises_a_compactnn_error(data, words):
    with pytest.raises(CompactnnError) as info:
        evaluate(_identity_model(), data)
    assert words in str(info.value)


def test_bad_metric_and_batch_size_raise():
    with pytest.raises(CompactnnError, match="metric="):
        evaluate(_identity_model(), (X, Y), metric="top5")
    with pytest.raises(CompactnnError, match="batch_size"):
        evaluate(_identity_model(), (X, Y), batch_size=0)
    with pytest.raises(CompactnnError, match="NaN"):
        evaluate(_identity_model(), (X, Y), metric=lambda o, y: float("nan"))


def test_top1_needs_logits_per_sample():
    with pytest.raises(CompactnnError, match="metric=your_function"):
        evaluate(nn.Flatten(0), (X, Y))


def test_guess_rate_and_the_float_sanity_warning():
    from compactnn.measure.quality import guess_rate, no_better_than_guessing

    labels = torch.tensor([9, 9, 9, 1])
    assert guess_rate(labels) == 75.0  # always "9": 3 of 4
    assert guess_rate(torch.tensor([], dtype=torch.long)) == 0.0
    assert no_better_than_guessing(78.0, labels) is None  # a tenth of the gap to 100% closed
    assert no_better_than_guessing(77.0, labels) is not None  # barely above guessing
    ten = torch.arange(10).repeat(10)  # 10 balanced classes: the guess rate is 10%
    assert no_better_than_guessing(13.74, ten) is not None  # mnist-cnn on sklearn's digits
    assert no_better_than_guessing(19.5, ten) is None
    doubt = no_better_than_guessing(75.0, labels, "--data d.safetensors")
    assert "75.00% top-1 on --data d.safetensors" in doubt and "(75.00%)" in doubt
    assert "preprocessed" in doubt


def _tiny_bert_classifier():
    """A seeded random BertForSequenceClassification (3 classes, padding id 0) and right-padded
    token ids with their attention mask and labels."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    model = tf.BertForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (24, 12), generator=gen)
    lengths = torch.randint(3, 13, (24,), generator=gen)
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # padding id 0 after each sequence's length
    y = torch.randint(0, 3, (24,), generator=gen)
    return model, ids, mask, lengths, y


def _top1_unpadded(model, ids, lengths, y) -> float:
    """Independent reference: each sequence run alone, cut to its length (no padding, no mask)."""
    with torch.no_grad():
        pred = [
            int(model(input_ids=ids[i : i + 1, :n]).logits.argmax(-1))
            for i, n in enumerate(lengths)
        ]
    return 100.0 * float((torch.tensor(pred) == y).float().mean())


def test_keyword_inputs_with_labels_are_scored_with_their_attention_mask():
    model, ids, mask, lengths, y = _tiny_bert_classifier()
    expected = _top1_unpadded(model, ids, lengths, y)
    inputs = {"input_ids": ids, "attention_mask": mask}
    assert evaluate(model, (inputs, y), batch_size=5) == pytest.approx(expected)
    assert evaluate(model, {**inputs, "y": y}, batch_size=7) == pytest.approx(expected)
    assert evaluate(model, {**inputs, "labels": y}) == pytest.approx(expected)
    split = {"input_ids_test": ids, "attention_mask_test": mask, "y_test": y}
    assert evaluate(model, split) == pytest.approx(expected)
    batches = [({"input_ids": ids[:10], "attention_mask": mask[:10]}, y[:10])]
    batches.append({"input_ids": ids[10:], "attention_mask": mask[10:], "labels": y[10:]})
    assert evaluate(model, batches) == pytest.approx(expected)


def test_padded_token_ids_without_a_mask_warn_that_padding_is_attended_to():
    model, ids, mask, _, y = _tiny_bert_classifier()
    padded = int((mask == 0).any(1).sum())
    with pytest.warns(
        UserWarning, match=f"{padded} of 24 sequences .* padding id 0 .*attention_mask"
    ):
        evaluate(model, (ids, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the mask given: no warning
        evaluate(model, ({"input_ids": ids, "attention_mask": mask}, y))


def test_a_keyword_dict_without_labels_says_evaluation():
    model, ids, mask, _, _ = _tiny_bert_classifier()
    with pytest.raises(CompactnnError) as err:
        evaluate(model, [{"input_ids": ids, "attention_mask": mask}])
    assert "training" not in str(err.value)
    assert "evaluation batch 0 is a dict with keys ['attention_mask', 'input_ids']" in str(
        err.value
    )
