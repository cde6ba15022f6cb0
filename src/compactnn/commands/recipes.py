"""``compactnn recipes``: the short-name forms and the registered methods."""

from __future__ import annotations

import argparse

from compactnn import registry
from compactnn.recipe import method_short_forms, short_name_forms


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        "recipes",
        help="list recipe short-name forms and registered methods",
        description="List the short-name forms a --recipe accepts and the registered methods.",
    )


def naming(name: str) -> str:
    """How a method that is no short name's suffix is named instead (its own short-name
    forms, or none), after its summary; '' for a quantization method (``from_short``).

    Example:
        >>> naming("nm"), naming("rtn")
        ('  (short names: nm<N>:<M>[-ft] (e.g. nm2:4))', '')
    """
    if hasattr(registry.get_method(name).config_cls, "from_short"):
        return ""
    forms = "; ".join(f"{form} (e.g. {ex})" for form, ex in method_short_forms(name))
    return f"  (short names: {forms})" if forms else "  (no short name: a YAML recipe step)"


def run(args: argparse.Namespace) -> int:
    print("Short names (--recipe NAME):")
    for form in short_name_forms():
        print(f"  {form}")
    print(
        "\nMethods (the 'method' of a YAML recipe step; each is also a short name's suffix, "
        "w<W>[a<A>]-<method> as in w4a4-qdrop, unless its own short names or 'no short "
        "name' follow it):"
    )
    width = max((len(n) for n in registry.METHODS), default=0)
    for name in sorted(registry.METHODS):
        print(f"  {name:<{width}}  {registry.METHODS[name].summary}{naming(name)}")
    print("\nA YAML recipe file (--recipe my.yaml) lists steps; see docs/usage.md.")
    return 0
