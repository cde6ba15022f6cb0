"""Recipe YAML, read safely: plain mappings, lists, numbers and strings, nothing else.

:func:`load_recipe_yaml` reads recipe text with a ``SafeLoader`` that also refuses what a
recipe never needs and a mistake or an attack would use (anchors and aliases, keys given
twice, deep nesting, tags such as ``!!python/object``), and turns every problem into one
line naming the source, the line and the column, with the fix where one is known (tabs).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from compactnn.core.fields import short_repr
from compactnn.errors import CompactnnError


def load_recipe_yaml(text: str, source: str = "recipe") -> Any:
    """The data of recipe YAML ``text``; any problem is a one-line CompactnnError naming
    ``source``, the line and the column."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or "")
        if problem.startswith("could not determine a constructor"):  # !!python/object, !foo
            raise CompactnnError(f"{source} at {_tag_problem(exc)}") from None
        tabs = "'\\t'" in problem or "tab character" in problem
        fix = ": indent with spaces, not tabs." if tabs else ""
        raise CompactnnError(f"{source} is not valid YAML: {_yaml_problem(exc)}{fix}") from exc
    except _Refused as exc:
        raise CompactnnError(f"{source} at {exc}") from None
    except RecursionError as exc:  # a safety net: compose_node caps the nesting first
        raise CompactnnError(
            f"{source} nests too deeply (over {MAX_DEPTH} levels): recipes need a few levels."
        ) from exc


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: line, column, problem (and context).

    Example:
        >>> try:  # doctest: +ELLIPSIS
        ...     yaml.safe_load("a: [1")
        ... except yaml.YAMLError as exc:
        ...     print(_yaml_problem(exc))
        line 1, column 6: expected ',' or ']', but got '<stream end>' (while parsing a flow ...
    """
    if not isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(str(exc).split())
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = exc.problem or exc.context or "malformed YAML"
    context = f" ({exc.context})" if exc.context and exc.problem else ""
    return " ".join(f"{where}{problem}{context}".split())


def _tag_problem(exc: yaml.constructor.ConstructorError) -> str:
    """Where a YAML tag the recipe loader has no constructor for is, and why it is refused."""
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    tag = re.search(r"tag '([^']*)'", exc.problem or "")
    name = tag[1].replace("tag:yaml.org,2002:", "!!") if tag else "a tag"
    return (
        f"{where}YAML tags ({short_repr(name, 60)}) are not allowed in a recipe: write plain "
        "YAML (mappings, lists, numbers, strings)."
    )


MAX_DEPTH = 32  # nesting levels a recipe may use (its deepest real use is about six)


class _Refused(CompactnnError):
    """A construct the recipe loader refuses; :func:`load_recipe_yaml` names the source."""


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-4`` as a number (YAML 1.2), not the string '1e-4',
    refuses a key given twice in one mapping (plain YAML keeps the last silently), and
    refuses anchors and aliases (``&a``/``*a``: recipes never need them, and nested aliases
    expand a small file into billions of values) and nesting deeper than ``MAX_DEPTH``."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise _Refused(
                f"line {mark.line + 1}, column {mark.column + 1}: YAML anchors and "
                "aliases (&name, *name) are not allowed in a recipe; write the values out."
            )
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_DEPTH:
            mark = event.start_mark
            raise _Refused(
                f"line {mark.line + 1}, column {mark.column + 1}: nested over "
                f"{MAX_DEPTH} levels deep; recipes need a few levels."
            )
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            _refuse_duplicate_keys(self, node)
        return super().construct_mapping(node, deep=deep)


def _refuse_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    """A CompactnnError naming a scalar key written twice in ``node`` and its lines (a merge
    key ``<<`` may be overridden: that is what it is for)."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key, line = loader.construct_object(key_node), key_node.start_mark.line + 1
        if key in seen:
            where = f"line {line}" if seen[key] == line else f"lines {seen[key]} and {line}"
            raise CompactnnError(
                f"recipe key {short_repr(key)} is given twice in one mapping ({where}); YAML "
                "would keep the last silently: keep one."
            )
        seen[key] = line


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
