"""A small keyword-input 'encoder' (embedding, two linears, a GELU) shared by the ONNX Runtime
`MatMulNBits` tests."""

import torch


class Keywords(torch.nn.Module):
    """Takes ``input_ids`` and ``attention_mask`` as keywords; returns a 1-tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 64)
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return (self.fc2(torch.nn.functional.gelu(self.fc1(h))),)


def compressed(recipe):
    """``(q, batch)``: :class:`Keywords` (seed 0) compressed with ``recipe`` on one seeded
    batch of 3 x 7 token ids, and that batch."""
    import compactnn

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return compactnn.compress(Keywords().eval(), recipe, calib_data=[batch], progress=False), batch


def grouped_recipe():
    """``w4a8g-g32`` (per-group activations) with the first/last-layer rule off, so both of
    :class:`Keywords`' linears are 4-bit, and the table left float: its lookup feeds ``fc1``
    directly (real models normalize first), and on rows of a 4-bit grid ONNX Runtime's level 4
    rounds apart from the simulation (0.005 relative at ``fc1``; 2e-7 with 1e-6 of noise)."""
    from dataclasses import replace

    from compactnn.core.modules import Targets
    from compactnn.recipe import Recipe, Step, resolve_recipe

    config = replace(resolve_recipe("w4a8g-g32").steps[0].config, first_last_bits=None)
    return Recipe("w4a8g-g32", (Step("rtn", config, Targets(ignore=("emb",))),))
