"""``compactnn.load`` returns every module in eval mode, as ``compress`` does: the quantized
layers, activation quantizers and token tables it builds too, whatever the skeleton's mode."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.emb(x))))


@pytest.mark.parametrize("kernels", [False, True])
def test_every_loaded_module_is_in_eval_mode(tmp_path, kernels):
    torch.manual_seed(0)
    model = _Tokens().eval()
    calib = torch.randint(0, 64, (16, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = compactnn.compress(model, "w8a8", calib_data=calib, progress=False)
    compactnn.save(qmodel, tmp_path / "art")
    loaded = compactnn.load(tmp_path / "art", model=_Tokens().train(), kernels=kernels)
    assert [n for n, m in loaded.named_modules() if m.training] == []
    if not kernels:  # the simulation: bit-identical to the model that was saved
        with torch.no_grad():
            assert torch.equal(loaded(calib), qmodel(calib))
