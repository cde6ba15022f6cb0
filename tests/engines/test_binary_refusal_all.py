"""A binary recipe names every layer it cannot wrap (Conv1d here) in one refusal."""

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError


class Seq1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1)
        self.c3 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("recipe", ["w1a1-xnor", "w1a1-sibnn"])
def test_binary_recipe_names_all_unsupported_layers_at_once(recipe):
    x, y = torch.randn(16, 8, 8), torch.randint(0, 4, (16,))
    with pytest.raises(CompactnnError) as info:  # c1 and fc stay 8-bit (first/last)
        compactnn.train(Seq1d(), recipe, (x, y), epochs=1, progress=False)
    assert str(info.value).startswith(
        "2 layers cannot take 1-bit activations: 'c2' (Conv1d), 'c3' (Conv1d)"
    )
    assert "Leave them in float: ignore=['c2', 'c3'] (compress/train)" in str(info.value)
