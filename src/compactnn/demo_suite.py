"""The demo's suite as data: (reference model, recipe) pairs; "float" is the baseline.

Training recipes (``w2a8-ttq``, ``w1a1-reactnet``) are trained with ``compactnn.train`` on
the reference's training split the first time (a few minutes on 2 cores), then read from
the cache (:mod:`compactnn.models.trained`); the others are post-training ``compress`` calls.
"""

SUITE: list[tuple[str, str]] = [
    ("mnist-cnn", "float"),
    ("mnist-cnn", "w8a8"),
    ("mnist-cnn", "w4a8"),
    ("mnist-cnn", "w4a4"),
    ("mnist-cnn", "w2a4"),
    ("mnist-cnn", "w4a4-qdrop"),
    ("mnist-cnn", "w2a4-brecq"),
    ("mnist-cnn", "w2a8-ttq"),
    ("mnist-cnn", "w1a1-reactnet"),
    ("minilm", "float"),
    ("minilm", "w8"),
    ("minilm", "w4-g32"),
    ("minilm", "w3-g32"),
]
