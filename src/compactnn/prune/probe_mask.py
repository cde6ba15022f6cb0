"""Probe Pruning on padded batches: the probe and the historical states read real tokens only.

The model's ``attention_mask`` (caught by a pre-hook on the top model, see
:mod:`compactnn.prune.probe`) marks each sample's real tokens. On a batch with padding:

* positions are each token's rank among its sample's real tokens (``cumsum(mask) - 1``), the
  place the same sentence has alone (left padding included);
* ``mode="sample"``: each sample's probe is chosen among its ``L_b`` real tokens as if it ran
  alone (``n_positions(L_b)`` positions, evenly spaced over them or by residual norm), and a
  sample too short for its probe to pay (:func:`~compactnn.prune.probe.probe_pays` on
  ``(1, L_b)``) takes the static rule over its real positions: a sentence gets the same
  channels padded or alone;
* the static rule (``mode="static"``, or an input too short to probe) sums the historical
  states over each sample's real positions (one channel set per sample);
* ``mode="batch"`` keeps one channel set per batch (by design); padded tokens are left out of
  the residual norms that rank positions and samples, and out of the probe's mean states.

Probe slots are padded to the longest probe of the batch; an empty slot has zero probe and
historical states, so it adds nothing to the fused state ``m``.
"""

from __future__ import annotations

import torch


def real_tokens(mask: object, b: int, t: int) -> torch.Tensor | None:
    """``(B, T)`` bool of the real tokens among the input's ``t`` positions (the last ``t``
    columns of a ``(B, S >= t)`` mask: a decode step after its cache), or ``None`` when there
    is no usable mask or every token is real.

    Example:
        >>> real_tokens(torch.tensor([[1, 1, 0]]), 1, 3).tolist()
        [[True, True, False]]
        >>> real_tokens(torch.ones(2, 5), 2, 1) is None
        True
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    if mask.shape[0] != b or mask.shape[1] < t:
        return None
    valid = mask[:, mask.shape[1] - t :].bool()
    return None if bool(valid.all()) else valid


def mask_positions(mask: torch.Tensor, t: int) -> torch.Tensor:
    """``(B, t)`` rank of each of the last ``t`` tokens among its sample's real tokens.

    Example:
        >>> mask_positions(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]]), 4).tolist()
        [[0, 0, 0, 1], [0, 1, 2, 2]]
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, mask.shape[1] - t :]


def sample_probes(norms: torch.Tensor, valid: torch.Tensor, config, pays, n_positions, pick):
    """Per sample, its probe among its real tokens: ``(pos, slots, probed)``.

    ``pos`` ``(B, P)`` positions (empty slots repeat a real one), ``slots`` ``(B, P)`` bool
    (a real probe position), ``probed`` ``(B,)`` bool (the sample's probe pays alone).
    ``pick(norms_row (1, L), n_pos)`` returns the chosen indices ``(n,)`` among the ``L``
    real tokens (stride or residual rule).
    """
    b = norms.shape[0]
    chosen, probed = [], torch.zeros(b, dtype=torch.bool)
    for i in range(b):
        real = valid[i].nonzero().flatten()
        n_real = int(real.numel())
        if n_real == 0 or not pays(config, 1, n_real):
            chosen.append(real[:0])
            continue
        probed[i] = True
        chosen.append(real[pick(norms[i, real].unsqueeze(0), n_positions(n_real, config.tokens))])
    width = max(1, max(int(c.numel()) for c in chosen))
    pos = torch.zeros(b, width, dtype=torch.long, device=norms.device)
    slots = torch.zeros(b, width, dtype=torch.bool, device=norms.device)
    for i, c in enumerate(chosen):
        pos[i, : c.numel()] = c
        slots[i, : c.numel()] = True
    return pos, slots, probed.to(norms.device)


def masked_sample_mean(sq: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``sq`` ``(S, P, H)`` over the samples real at each position (``valid`` ``(S, P)``)
    and the slots with at least one (``(P, H)``, ``(P,)`` bool).

    Example:
        >>> sq = torch.tensor([[[2.0], [4.0]], [[6.0], [8.0]]])
        >>> mean, slots = masked_sample_mean(sq, torch.tensor([[True, False], [True, False]]))
        >>> mean.flatten().tolist(), slots.tolist()
        ([4.0, 0.0], [True, False])
    """
    w = valid.to(sq.dtype).unsqueeze(-1)
    count = w.sum(0)
    return (sq * w).sum(0) / count.clamp(min=1), count[:, 0] > 0
