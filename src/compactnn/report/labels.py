"""Where each point's label goes on a scatter: a greedy placement that keeps labels off each
other (recipes of near-equal size and quality used to print on top of one another).

Pure geometry in display pixels (no matplotlib): :func:`place` picks, for each label in
turn, the first candidate offset whose box stays inside the axes and overlaps no label
placed before it; when every candidate collides, the one with the least overlap.
"""

from __future__ import annotations

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (pixels, y up)

# offsets from the point to the label's lower-left corner, in units of (pad, pad) plus the
# label's own width / height where the label sits left of or below the point
CANDIDATES = ("ne", "se", "nw", "sw", "n", "s", "e", "w")


LEVELS = 4  # a label crowded out of the first ring moves out by its height, up to 3 times


def _box(
    anchor: tuple[float, float], size: tuple[float, float], where: str, pad: float, level: int
) -> Box:
    (x, y), (w, h) = anchor, size
    x0 = {"e": x + pad, "w": x - pad - w}.get(where[-1], x - w / 2)
    y0 = {"n": y + pad, "s": y - pad - h}.get(where[0], y - h / 2)
    y0 += {"n": 1, "s": -1}.get(where[0], 0) * level * (h + pad / 2)
    return x0, y0, x0 + w, y0 + h


def _options(anchor, size, pad) -> list[tuple[Box, int]]:
    """Every candidate box with its ring (0: beside the point)."""
    return [
        (_box(anchor, size, where, pad, level), level)
        for level in range(LEVELS)
        for where in CANDIDATES
        if level == 0 or where[0] in "ns"
    ]


def overlap(a: Box, b: Box) -> float:
    """Area shared by boxes ``a`` and ``b``.

    Example:
        >>> overlap((0, 0, 2, 2), (1, 1, 3, 3)), overlap((0, 0, 1, 1), (2, 2, 3, 3))
        (1, 0)
    """
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0


def _outside(box: Box, bounds: Box | None) -> float:
    if bounds is None:
        return 0.0
    inside = overlap(box, bounds)
    return (box[2] - box[0]) * (box[3] - box[1]) - inside


def place(
    anchors: list[tuple[float, float]],
    sizes: list[tuple[float, float]],
    pad: float = 4.0,
    bounds: Box | None = None,
    marker: float = 4.0,
) -> list[Box]:
    """One box per label: label ``i`` of ``sizes[i]`` (width, height) beside ``anchors[i]``,
    kept off earlier labels, off every point (a square of half-side ``marker``) and inside
    ``bounds``.

    Example:
        >>> place([(0, 0), (0, 0)], [(40, 10), (40, 10)])  # the second one goes below
        [(4.0, 4.0, 44.0, 14.0), (4.0, -14.0, 44.0, -4.0)]
    """
    points = [(x - marker, y - marker, x + marker, y + marker) for x, y in anchors]
    placed: list[Box] = []
    for anchor, size in zip(anchors, sizes, strict=True):
        options = _options(anchor, size, pad)
        costs = [
            (sum(overlap(b, p) for p in placed + points) + _outside(b, bounds), level, k)
            for k, (b, level) in enumerate(options)
        ]
        placed.append(options[min(costs)[2]][0])  # the first free candidate of the nearest ring
    return placed
