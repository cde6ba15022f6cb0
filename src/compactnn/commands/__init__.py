"""CLI subcommands: each module has ``add_parser(subparsers)`` and ``run(args) -> int``."""

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
