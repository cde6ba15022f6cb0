"""Loading an artifact straight into kernel layers: no float32 copy of the quantized weights.

``compactnn.load(path, kernels=True)`` (or ``kernels=KernelConfig(...)``) gives the same
model as ``to_kernels(compactnn.load(path))``, bit for bit, without ever holding the
simulated float model:

1. the float skeleton is built with every parameter on the ``meta`` device
   (:func:`params_on_meta`; a given ``model=`` is copied by :func:`meta_copy`): no float
   weight is allocated. Buffers stay real (e.g. position ids that are not stored);
2. the artifact's checks and rebuild run as usual; quantized layers receive their integer
   codes, scales and zero points, while their float ``weight`` stays ``meta``;
3. :func:`install_kernels` assigns the stored float tensors (LayerNorm, biases, position
   embeddings, layers kept in float) to the ``meta`` parameters and swaps every quantized
   layer for its kernel layer. A kernel's run-time dense bfloat16 copy is dequantized from the
   codes a slice at a time (:func:`~compactnn.kernels.linear.dense_weight`). Layers no kernel
   takes get their float32 weight from the codes (they run simulated, as in
   :func:`~compactnn.kernels.swap.to_kernels`).

The saving is resident memory: the simulated model's float32 weights (and the allocator heap
they leave behind) never exist, so the running model holds the packed codes, the kernels'
working copies and the float-kept tensors only (measured in ``docs/transformers.md``).

This module is below ``compactnn.export`` (it cannot import it): ``export.artifact.load``
calls :func:`params_on_meta`, :func:`meta_copy` and :func:`install_kernels`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from compactnn.core.modules import state_with_metadata
from compactnn.core.qembedding import QuantEmbedding
from compactnn.core.qlayers import QuantLinear
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.kernels.swap import KernelConfig, materialize, swap_kernels

_META = torch.device("meta")


def kernel_config(kernels: Any) -> KernelConfig | None:
    """``load``'s ``kernels=`` argument as a :class:`KernelConfig` (None: a simulated model).

    Args:
        kernels: ``False``/``None`` (the simulated model), ``True`` (``KernelConfig()``, the
            ``to_kernels`` defaults) or a :class:`KernelConfig`.

    Raises:
        CompactnnError: anything else.
    """
    if kernels is None or kernels is False:
        return None
    if kernels is True:
        return KernelConfig()
    if isinstance(kernels, KernelConfig):
        return kernels
    raise CompactnnError(
        f"load(kernels={kernels!r:.60}) must be True, False or a "
        "compactnn.kernels.swap.KernelConfig(dtype=..., dense_min_rows=..., ...)."
    )


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside the block is put on the ``meta`` device.

    Module constructors (a Hugging Face model from its config, ``nn.Linear``) then allocate
    no weight memory and their random initialisation is a no-op; buffers are left real.
    Not thread-safe: ``nn.Module.register_parameter`` is replaced for the block's duration.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to(_META), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are on ``meta`` (buffers copied as they are);
    ``model`` is not changed."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device=_META), p.requires_grad)
    return copy.deepcopy(model, memo)


def _assign_float_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put the stored tensors in place of the ``meta`` parameters and buffers they fill."""
    found = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if t is not None and t.is_meta and key in state:
            found[key] = state[key]
    if found:  # with the modules' versions: some loaders read them (torchvision's MNASNet)
        model.load_state_dict(state_with_metadata(model, found), strict=False, assign=True)


def _materialize_simulated(model: nn.Module) -> None:
    """Float32 weights for quantized layers no kernel takes (convolutions, codebook tables);
    quantized Linear layers are decided in ``swap_kernels``."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            continue
        if isinstance(m, QuantEmbedding) and getattr(m, "weight_levels", None) is None:
            continue  # an EmbeddingKernel reads the codes
        materialize(m)


def install_kernels(
    model: nn.Module, state: dict[str, torch.Tensor], config: KernelConfig
) -> nn.Module:
    """Finish a model rebuilt on a ``meta`` skeleton: float state in, kernel layers swapped.

    Args:
        model: the rebuilt model (quantized layers with codes, ``meta`` float weights).
        state: the artifact's stored tensors by state-dict key (tied keys included).
        config: how the kernels run (:class:`KernelConfig`).

    Returns:
        ``model``, changed in place: what ``to_kernels(model, ...)`` returns for the
        simulated model.

    Raises:
        ArtifactError: a tensor the model needs is neither stored nor computable.
        CompactnnError: a torch kernel fails on a layer (not an artifact problem: the layer
            is named and the model loads without ``kernels=``). Shapes a low-bit kernel
            cannot take fall back as in ``to_kernels`` (dense copy, or simulated).
    """
    _assign_float_state(model, state)
    _materialize_simulated(model)
    swap_kernels(model, config)
    left = [k for k, t in model.state_dict(keep_vars=True).items() if t is not None and t.is_meta]
    if left:
        raise ArtifactError(
            f"the artifact holds no values for {left[:5]} of the skeleton: re-save it, or "
            "load it without kernels= and call to_kernels."
        )
    return model
