"""``compactnn recipes``: the short-name forms and the registered methods."""

from __future__ import annotations

import argparse

from compactnn import registry
from compactnn.recipe import short_name_forms


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        "recipes",
        help="list recipe short-name forms and registered methods",
        description="List the short-name forms a --recipe accepts and the registered methods.",
    )


def run(args: argparse.Namespace) -> int:
    print("Short names (--recipe NAME):")
    for form in short_name_forms():
        print(f"  {form}")
    print("\nMethods (the 'method' of a YAML recipe step, or a short name's suffix):")
    width = max((len(n) for n in registry.METHODS), default=0)
    for name in sorted(registry.METHODS):
        print(f"  {name:<{width}}  {registry.METHODS[name].summary}")
    print("\nA YAML recipe file (--recipe my.yaml) lists steps; see docs/usage.md.")
    return 0
