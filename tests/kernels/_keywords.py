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
