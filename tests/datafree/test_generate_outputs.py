"""Generation takes a model's logits as training does: a dict's ``logits``, a tuple's first
item; BN statistics match per layer, however often or in whatever order layers run."""

import pytest
import torch
from torch import nn

from compactnn.datafree import generate
from compactnn.datafree.common import check_classifier
from compactnn.errors import CompactnnError


class Wrapped(nn.Module):
    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, torch.zeros(x.shape[0], 5)
        if self.kind == "dict":
            return {"feat": torch.zeros(x.shape[0], 5), "logits": logits}
        if self.kind == "twice":  # the feature extractor runs again for the second output
            return logits, self.net.features(x)
        return "no tensor"


@pytest.mark.parametrize("method", ["bn-inversion", "dafl"])
@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_tuple_and_dict_outputs_generate_what_the_plain_logits_do(tiny_teacher, kind, method):
    kw = dict(input_shape=(1, 8, 8), method=method, steps=3, seed=1, progress=False)
    plain = generate(tiny_teacher, 5, **kw)
    got = generate(Wrapped(tiny_teacher, kind), 5, **kw)
    assert torch.equal(got.x, plain.x) and torch.equal(got.y, plain.y)


def test_a_model_running_its_batch_norms_twice_still_generates(tiny_teacher):
    d = generate(Wrapped(tiny_teacher, "twice"), 4, input_shape=(1, 8, 8), steps=2, progress=False)
    assert d.x.shape == (4, 1, 8, 8) and torch.isfinite(d.x).all()


def test_an_output_without_logits_names_the_forms_taken(tiny_teacher):
    with pytest.raises(CompactnnError, match=r"returned str\. Return the logits, a dict"):
        check_classifier(Wrapped(tiny_teacher, "str"), torch.randn(2, 1, 8, 8))
