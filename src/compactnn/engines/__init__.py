"""The ways a method runs, each with a small hook interface; methods plug into one engine.

* :mod:`~compactnn.engines.layerwise`: one layer at a time, a ``WeightSolver`` per layer
  (rtn, smoothquant); ``quantize_all_rtn`` starts the methods that then improve layers
  against a float copy (biascorr, bitsplit).
* :mod:`~compactnn.engines.sequential`: transformer blocks one at a time, Hessians per layer,
  ``BlockHooks`` (``solve_layer``, ``before_block``, ``after_block``, ``after_stack``)
  (gptq, awq, gptq_tune); :mod:`~compactnn.engines.block_scaling` (AWQ scaling) and
  :mod:`~compactnn.engines.block_tuning` (tuning against the float blocks) are hooks
  several methods share, :mod:`~compactnn.engines.gptq_common` GPTQ's shared settings.
* :mod:`~compactnn.engines.reconstruct`: unit-by-unit reconstruction of the rounding,
  ``ReconHooks`` (``rounder``, ``act_quantizer``, ``mix_inputs``) (adaround, brecq, qdrop).

Engines import :mod:`compactnn.core` and the shared :mod:`compactnn.quant.base`, never a
method file.
"""

from compactnn._submodules import submodule


def __getattr__(name: str) -> object:
    """``compactnn.engines.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
