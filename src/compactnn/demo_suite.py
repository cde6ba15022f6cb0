"""The demo's suite as data: (reference model, recipe) pairs; "float" is the baseline."""

SUITE: list[tuple[str, str]] = [
    ("mnist-cnn", "float"),
    ("mnist-cnn", "w8a8"),
    ("mnist-cnn", "w4a8"),
    ("mnist-cnn", "w4a4"),
    ("mnist-cnn", "w2a4"),
    ("mnist-cnn", "w4a4-qdrop"),
    ("mnist-cnn", "w2a4-brecq"),
    ("minilm", "float"),
    ("minilm", "w8"),
    ("minilm", "w4-g32"),
    ("minilm", "w3-g32"),
]
