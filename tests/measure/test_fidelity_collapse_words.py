"""The collapse warning names what the recipe did: pruning, quantization, or both."""

import torch

from compactnn.measure.fidelity import collapse_note


def _note(**done):
    ref = torch.tensor([[1.0, 3.0], [2.0, 1.0]])
    return collapse_note(ref, torch.zeros(2, 2), **done)


def test_a_pruned_only_model_is_told_to_prune_less_not_to_use_a_trained_model():
    note = _note(quantized=False, pruned=True)
    assert note.startswith("the pruned model's output is the same for all 2 samples")
    assert "likely because pruning removed weights or channels its outputs depend on;" in note
    assert note.endswith(": prune less (a smaller ratio or sparsity) or fine-tune after pruning")
    assert "quantiz" not in note and "trained model" not in note


def test_quantized_words_stay_and_both_name_both_causes():
    assert _note().startswith("the quantized model's output")
    assert "pruning" not in _note() and _note().endswith("compress a trained model")
    both = _note(quantized=True, pruned=True)
    assert both.startswith("the compressed model's output")
    assert "pruning removed weights or channels" in both and "quantization grid" in both
    assert both.endswith("fine-tune after pruning, or compress a trained model")
