"""Short recipe names of the pruning methods.

* ``sp<P>[-<method>]``: ``P`` percent of weights removed; method ``magnitude`` (default,
  layer-wise), ``global`` (magnitude, global ranking), ``gradual``, ``dns``, ``wanda``,
  ``sparsegpt``. Examples: ``sp50``, ``sp90-dns``, ``sp50-wanda``.
* ``ch<P>[-l1|-l2|-taylor]``: ``P`` percent of channels removed (``ch30``).
* ``nm<N>:<M>[-wanda|-sparsegpt]``: N:M sparsity (``nm2:4``, ``nm2:4-sparsegpt``).
"""

from __future__ import annotations

import re

from compactnn.errors import CompactnnError
from compactnn.prune.channel import ChannelConfig
from compactnn.prune.dns import DNSConfig
from compactnn.prune.gradual import GradualConfig
from compactnn.prune.magnitude import MagnitudeConfig
from compactnn.prune.nm import NMConfig
from compactnn.prune.sparsegpt import SparseGPTConfig
from compactnn.prune.wanda import WandaConfig
from compactnn.recipe import Recipe, Step
from compactnn.registry import register_short_name


def _fraction(percent: str, name: str) -> float:
    p = int(percent)
    if not 0 <= p < 100:
        raise CompactnnError(f"recipe {name!r}: {p}% is outside [0, 100); e.g. sp90 or ch30.")
    return p / 100


@register_short_name(
    r"sp(?P<p>\d+)(?:-(?P<m>magnitude|global|gradual|dns|wanda|sparsegpt))?",
    "sp<P>[-magnitude|-global|-gradual|-dns|-wanda|-sparsegpt]",
    ("sp50", "sp90-dns", "sp50-wanda", "sp50-sparsegpt"),
)
def _sparse_name(m: re.Match[str]) -> Recipe:
    s = _fraction(m["p"], m.string)
    method = m["m"] or "magnitude"
    step = {
        "magnitude": lambda: Step("magnitude", MagnitudeConfig(sparsity=s)),
        "global": lambda: Step("magnitude", MagnitudeConfig(sparsity=s, scope="global")),
        "gradual": lambda: Step("gradual", GradualConfig(final_sparsity=s)),
        "dns": lambda: Step("dns", DNSConfig(sparsity=s)),
        "wanda": lambda: Step("wanda", WandaConfig(sparsity=s)),
        "sparsegpt": lambda: Step("sparsegpt", SparseGPTConfig(sparsity=s)),
    }[method]()
    return Recipe(m.string, (step,))


@register_short_name(
    r"ch(?P<p>\d+)(?:-(?P<imp>l1|l2|taylor))?", "ch<P>[-l1|-l2|-taylor]", ("ch30", "ch50-taylor")
)
def _channel_name(m: re.Match[str]) -> Recipe:
    config = ChannelConfig(ratio=_fraction(m["p"], m.string), importance=m["imp"] or "l1")
    return Recipe(m.string, (Step("channel", config),))


@register_short_name(
    r"nm(?P<n>\d+):(?P<m>\d+)(?:-(?P<meth>wanda|sparsegpt))?",
    "nm<N>:<M>[-wanda|-sparsegpt]",
    ("nm2:4", "nm2:4-sparsegpt"),
)
def _nm_name(m: re.Match[str]) -> Recipe:
    n, mm = int(m["n"]), int(m["m"])
    if m["meth"] == "wanda":
        step = Step("wanda", WandaConfig(n=n, m=mm))
    elif m["meth"] == "sparsegpt":
        step = Step("sparsegpt", SparseGPTConfig(n=n, m=mm))
    else:
        step = Step("nm", NMConfig(n=n, m=mm))
    return Recipe(m.string, (step,))
