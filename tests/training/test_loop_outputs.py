"""``compactnn.train`` on models that return a dict or a tuple (trained on their logits),
and ``ignore=`` (layers left in float, recorded as compress records them)."""

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError


class Wrapped(nn.Module):
    """``inner``'s logits in a dict (``"logits"`` not first), a tuple, or a 3-D tensor."""

    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x):
        logits = self.inner(x)
        if self.kind == "dict":
            return {"logits": logits, "aux": logits.detach() * 0}
        if self.kind == "tuple":
            return logits, x.mean()
        if self.kind == "3d":
            return {"logits": logits[:, None, :]}
        return {"names": ["no tensor"]}


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_a_dict_or_tuple_output_trains_like_its_logits_alone(tiny, kind):
    """Cross entropy, distillation (the default teacher: the model itself) and the held-out
    top-1 all read the logits: the same run, to the bit, as the bare classifier's."""
    model, data, eval_data = tiny
    kw = dict(epochs=1, eval_data=eval_data, keep_best=True, progress=False)
    ref = compactnn.train(model, "w2a2-lsq", data, **kw)  # distills: weight 0.5
    got = compactnn.train(Wrapped(model, kind), "w2a2-lsq", data, **kw)
    ref_hist = compactnn.info_of(ref)["extra"]["training"]
    assert compactnn.info_of(got)["extra"]["training"] == ref_hist
    assert ref_hist["eval_top1"][0] > 50  # 4 classes: it learnt
    out = got(eval_data[0][:8])
    logits = out["logits"] if kind == "dict" else out[0]
    assert torch.equal(logits, ref(eval_data[0][:8]))


@pytest.mark.parametrize(
    ("kind", "got"), [("3d", "dict whose main output has shape (2, 1, 4)"), ("none", "dict")]
)
def test_an_output_without_batch_by_classes_logits_is_refused(tiny, kind, got):
    model, data, _ = tiny
    with pytest.raises(CompactnnError) as err:
        compactnn.train(Wrapped(model, kind), "w2a2-lsq", data, epochs=1, progress=False)
    assert str(err.value).startswith("train() trains classifiers: the model must return logits")
    assert str(err.value).endswith(f"got {got}.")


def test_ignore_leaves_layers_in_float_and_records_them(tiny):
    model, data, _ = tiny
    q = compactnn.train(model, "w2a8-ttq", data, epochs=1, progress=False, ignore=["c2"])
    info = compactnn.info_of(q)
    assert info["float_layers"] == {"c2": "not targeted by the recipe"}
    assert type(q.c2) is nn.Conv2d and type(q.c3) is not nn.Conv2d
    assert info["recipe"].steps[0].targets.ignore == ("c2", "c2.*")
    with pytest.raises(CompactnnError, match="conv9"):
        compactnn.train(model, "w2a8-ttq", data, epochs=1, progress=False, ignore=["conv9"])
