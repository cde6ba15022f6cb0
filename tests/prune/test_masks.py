import pytest
import torch

from compactnn.errors import CompactnnError
from compactnn.prune.magnitude import MagnitudeConfig
from compactnn.prune.masks import masks_from_scores, nm_mask


def test_layer_scope_prunes_exact_count_of_smallest():
    scores = {"a": torch.arange(10.0), "b": torch.arange(20.0).flip(0)}
    masks = masks_from_scores(scores, 0.3, "layer")
    assert masks["a"].tolist() == [0, 0, 0] + [1] * 7
    assert int(masks["b"].sum()) == 14 and masks["b"][-6:].sum() == 0


def test_global_scope_ranks_all_layers_together():
    scores = {"small": torch.full((10,), 0.1), "large": torch.full((10,), 5.0)}
    masks = masks_from_scores(scores, 0.5, "global")
    assert masks["small"].sum() == 0 and masks["large"].sum() == 10


def test_nm_mask_keeps_n_largest_of_each_group():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    assert nm_mask(s, 2, 4).tolist() == [[1, 0, 1, 0, 0, 1, 1, 0]]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_is_refused(bad):
    with pytest.raises(CompactnnError, match=r"outside \[0, 1\)"):
        MagnitudeConfig(sparsity=bad)
