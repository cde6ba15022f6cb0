"""What the pruning methods' short names share: the percent in ``sp<P>`` and ``ch<P>``.

Each pruning method file registers its own grammar with ``registry.register_short_name``:
``sp<P>[-magnitude|-global]`` (magnitude), ``sp<P>-gradual``, ``sp<P>-dns``,
``sp<P>-wanda``, ``sp<P>-sparsegpt``, ``ch<P>[-l1|-l2|-taylor]`` (channel) and
``nm<N>:<M>[-wanda|-sparsegpt]`` (nm, wanda, sparsegpt).
"""

from __future__ import annotations

from compactnn.errors import CompactnnError


def percent_fraction(percent: str, name: str) -> float:
    """``percent`` (the digits of a short name) as a fraction in ``(0, 1)``; 0 is refused.

    Args:
        percent: the ``P`` of ``sp<P>`` or ``ch<P>``.
        name: the whole short name (named in the error).

    Example:
        >>> percent_fraction("90", "sp90-dns")
        0.9
    """
    p = int(percent)
    if p == 0:  # a recipe that prunes nothing would write a larger "pruned" artifact
        raise CompactnnError(
            f"recipe {name!r} removes nothing (0%): give the percent to remove, 1 to 99, "
            "e.g. sp50 or ch30."
        )
    if not 0 < p < 100:
        raise CompactnnError(f"recipe {name!r}: {p}% is outside [1, 100); e.g. sp90 or ch30.")
    return p / 100
