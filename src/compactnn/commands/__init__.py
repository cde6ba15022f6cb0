"""CLI subcommands: each module has ``add_parser(subparsers)`` and ``run(args) -> int``."""

from compactnn._submodules import submodule

COMMANDS: list[str] = [
    "compress",
    "evaluate",
    "demo",
    "recipes",
    "train",
    "deploy",
    "report",
    "export",
    "search",
]


def __getattr__(name: str) -> object:
    """``compactnn.commands.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
