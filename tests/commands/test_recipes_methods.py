"""``compactnn recipes``: what it says of each method is true. A method listed plainly is a
short name's suffix (``w<W>[a<A>]-<method>`` builds a recipe of it at some bits); one listed
with its own short names or "no short name" is not, and its forms build that method."""

import re

from compactnn.errors import CompactnnError
from compactnn.recipe import resolve_recipe
from tests.commands._compress_cli import run_cli

BITS = [f"w{w}{a}" for w in (1, 2, 3, 4, 8) for a in ("", "a8", "a1")]


def _suffix_builds(method: str) -> bool:
    for head in BITS:
        try:
            recipe = resolve_recipe(f"{head}-{method}")
        except CompactnnError:
            continue
        if [s.method for s in recipe.steps] == [method]:
            return True
    return False


def test_every_method_line_says_truly_how_it_is_named(capsys):
    code, out, _err = run_cli(capsys, "recipes")
    assert code == 0
    methods = out.split("\nMethods (")[1].split("\n\n")[0].splitlines()
    header, lines = methods[0], methods[1:]
    assert "suffix" in header and "unless" in header, header
    seen = {"plain": 0, "forms": 0, "none": 0}
    for line in lines:
        name, rest = re.fullmatch(r"  (\S+)\s+(.*)", line).groups()
        forms = re.search(r"\(short names: (.*)\)$", rest)
        if forms:
            seen["forms"] += 1
            assert not _suffix_builds(name), name
            for form in forms[1].split("; "):
                example = re.fullmatch(r".* \(e\.g\. (\S+)\)", form)[1]
                assert [s.method for s in resolve_recipe(example).steps] == [name], line
        elif "(no short name" in rest:
            seen["none"] += 1
            assert not _suffix_builds(name), name
        else:
            seen["plain"] += 1
            assert _suffix_builds(name), name
    assert seen["forms"] == 8 and seen["none"] == 1 and seen["plain"] > 20, seen
