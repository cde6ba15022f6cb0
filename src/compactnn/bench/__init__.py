"""compactnn.bench: see docs/architecture.md."""

from compactnn._submodules import submodule


def __getattr__(name: str) -> object:
    """``compactnn.bench.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
