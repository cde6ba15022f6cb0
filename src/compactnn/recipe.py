"""Recipes: an ordered list of steps (method, config, targets), from YAML or a short name.

A YAML recipe::

    name: w4a8-keep-head
    steps:
      - method: rtn
        targets: {classes: [Linear, Conv2d], names: ["*"], ignore: [lm_head]}
        config:
          weight: {bits: 4, symmetric: false, granularity: channel}
          act: {bits: 8, symmetric: false, granularity: tensor}
          first_last_bits: 8
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from compactnn import registry
from compactnn.core.config import MethodConfig
from compactnn.core.config_checks import check_config_ranges, check_ranges, located
from compactnn.core.fields import check_keys, short_repr
from compactnn.core.modules import Targets
from compactnn.core.recipe_yaml import load_recipe_yaml
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.registry import ShortNameRule

# Quantization short names: w<W>[a<A>[g|d]][-g<G>][-<method>]; ``a8g``: 8-bit activations
# per token and group of G inputs, scaled at run time (MatMulNBits' accuracy_level=4 grid);
# ``a8d``: one range per tensor taken at run time (DynamicQuantizeLinear's grid)
QUANT_FORM = "w<W>[a<A>[g|d]][-g<G>][-<method>]"
QUANT_PATTERN = (
    r"w(?P<w>\d+)(?:a(?P<a>\d+)(?P<ag>[gd])?)?(?:-g(?P<g>\d+))?(?:-(?P<method>[a-z0-9_]+))?"
)
# Suffixes that are a method with changed defaults rather than a method of their own.
SUFFIX_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "mse": ("rtn", {"range_method": "mse"}),
    "percentile": ("rtn", {"range_method": "percentile"}),
}


@dataclass(frozen=True)
class Step:
    """One recipe step: ``method`` applied with ``config`` to the modules ``targets`` selects."""

    method: str
    config: MethodConfig
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise CompactnnError(
                f"a step's method must be a name (string), got {short_repr(self.method)}."
            )
        entry = method_entry(self.method)
        if type(self.config) is not entry.config_cls:
            raise CompactnnError(
                f"Step({self.method!r}, ...) got a {type(self.config).__name__}; method "
                f"{self.method!r} takes a {entry.config_cls.__name__} (or use the method "
                f"that {type(self.config).__name__} belongs to)."
            )
        if not isinstance(self.targets, Targets):
            raise CompactnnError(
                f"Step({self.method!r}, ...): targets must be a Targets, "
                f"got {type(self.targets).__name__}."
            )
        check_config_ranges(self.config)  # Python-built configs: recipe files check first

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "version": type(self.config).config_version,
            "targets": self.targets.to_dict(),
            "config": self.config.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "step") -> Step:
        """A step from a mapping with ``method`` and optional ``config`` and ``targets``."""
        data = check_keys(data, ("method", "version", "config", "targets"), where)
        if not isinstance(data.get("method"), str):
            raise CompactnnError(
                f"{where} needs a 'method' key naming a method (e.g. method: rtn), "
                f"got {short_repr(data.get('method'))}."
            )
        entry = method_entry(data["method"], f"{where}.method")
        version = data.get("version", 1)  # absent: version 1
        registry.check_config_version(entry, version)
        raw, path = data.get("config"), f"{where}.config"
        registry.check_field_names(entry, version, raw, path)
        if isinstance(raw, dict):  # values no method can use, named by their key path
            check_ranges(entry.config_cls, raw, path)
        try:
            config = entry.config_cls.from_dict(raw, where=path)
        except CompactnnError as exc:  # the config's own checks know the field, not the path
            raise CompactnnError(located(str(exc), raw, path)) from None
        return cls(data["method"], config, Targets.from_dict(data.get("targets")))


def method_entry(name: str, where: str = "") -> registry.MethodEntry:
    """The method registered as ``name``; an unknown name's error suggests the nearest ones.

    Example:
        >>> method_entry("qdorp")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        compactnn.registry.UnknownMethodError: unknown method 'qdorp'; did you mean 'qdrop'? ...
    """
    try:
        return registry.get_method(name)
    except registry.UnknownMethodError as exc:
        near = difflib.get_close_matches(name, list(registry.METHODS), n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else ";"
        message = str(exc).replace(f"{short_repr(name)};", f"{short_repr(name)}{hint}", 1)
        prefix = f"{where}: " if where else ""
        raise registry.UnknownMethodError(name, prefix + message) from None


@dataclass(frozen=True)
class Recipe:
    """An ordered list of steps with a name."""

    name: str
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.steps:
            raise CompactnnError(f"recipe {short_repr(self.name)} has no steps.")
        for i, step in enumerate(self.steps):
            if not isinstance(step, Step):
                raise CompactnnError(_not_a_step(self.name, i, step))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [s.to_dict() for s in self.steps]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """A recipe from a mapping with a ``steps`` list and an optional ``name``."""
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise CompactnnError(
                "a recipe is a mapping with a 'steps' list (and an optional 'name'), "
                f"got {short_repr(data, 80)}."
            )
        data = check_keys(data, ("name", "steps"), "recipe")
        name = data.get("name", "custom")
        if not isinstance(name, str):
            raise CompactnnError(f"recipe name={short_repr(name)} must be a string.")
        steps = tuple(Step.from_dict(s, f"steps[{i}]") for i, s in enumerate(data["steps"]))
        return cls(name, steps)

    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe") -> Recipe:
        """A recipe from YAML text; ``source`` names it in messages (e.g. its file)."""
        data = load_recipe_yaml(text, source)
        if data is None:  # no text, or only comments
            raise CompactnnError(
                f"{source} is empty: write a mapping with a 'steps' list, e.g. "
                "'steps: [{method: rtn}]' (docs/usage.md shows a full recipe)."
            )
        return cls.from_dict(data)


def _not_a_step(recipe: str, index: int, item: Any) -> str:
    """The message for a recipe's ``steps[index]`` that is not a :class:`Step`.

    Example:
        >>> _not_a_step("e", 0, {"method": "rtn"})  # doctest: +ELLIPSIS
        "recipe 'e': steps[0] is a dict, not a Step: use Step('rtn', RTNConfig(...)), or ..."
    """
    method = item.get("method") if isinstance(item, dict) else None
    entry = registry.METHODS.get(method) if isinstance(method, str) else None
    config = entry.config_cls.__name__ if entry else "<its config class>"
    return (
        f"recipe {short_repr(recipe)}: steps[{index}] is a {type(item).__name__}, not a Step: use "
        f"Step({method if isinstance(method, str) else 'method'!r}, {config}(...)), or "
        "Recipe.from_dict({'name': ..., 'steps': [...]}) for mappings."
    )


def _quant_short_name(m: Any) -> Recipe:
    wbits = int(m["w"])
    abits = int(m["a"]) if m["a"] else None
    group = int(m["g"]) if m["g"] else None
    method = m["method"] or "rtn"
    method, overrides = SUFFIX_ALIASES.get(method, (method, {}))
    entry = registry.get_method(method)
    if not hasattr(entry.config_cls, "from_short"):
        raise _not_a_suffix(m, method)
    config = entry.config_cls.from_short(wbits, abits, group, **overrides)
    if m["ag"] == "d":  # one range per tensor, taken at run time
        act = QuantSpec(bits=abits, symmetric=False, granularity="tensor", dynamic=True)
        config = replace(config, act=act)
    elif m["ag"]:  # activations grouped like the weights, scaled per token at run time
        if group is None:
            raise CompactnnError(
                f"{short_repr(m.string)}: a{abits}g quantizes activations per group of the "
                f"weights' group size; add one, e.g. w{wbits}a{abits}g-g32-{m['method'] or 'rtn'}."
            )
        act = QuantSpec(bits=abits, granularity="group", group_size=group)
        config = replace(config, act=act)
    return Recipe(m.string, (Step(method, config),))


def _quant_step_yaml(m: Any) -> str:
    """The ``rtn`` step (YAML flow style) of what short name ``m`` asks to quantize, the
    grids of the plain short name (``w4a8``: asymmetric weights below 8 bits, asymmetric
    activations, ``quant.base.short_weight_spec`` and ``short_act_spec``)."""
    bits = int(m["w"])
    weight = f"bits: {bits}, symmetric: {'true' if bits == 8 else 'false'}"
    if m["g"]:
        weight += f", granularity: group, group_size: {int(m['g'])}"
    act = f", act: {{bits: {int(m['a'])}, symmetric: false}}" if m["a"] else ""
    return f"{{method: rtn, config: {{weight: {{{weight}}}{act}}}}}"


def _not_a_suffix(m: Any, method: str) -> CompactnnError:
    """One line for ``w4a8-channel``: ``method`` quantizes nothing, so it is no suffix; its
    own short names (:func:`method_short_forms`), and the YAML recipe that runs it, then
    the quantization the name asked for (pruning and float steps go first)."""
    steps = f"steps: [{{method: {method}}}, {_quant_step_yaml(m)}]"
    forms = " or ".join(f"{form} (e.g. {ex})" for form, ex in method_short_forms(method))
    head = f"recipe {short_repr(m.string)}: {method} is not a quantization method"
    if not forms:
        return CompactnnError(
            f"{head} and has no short name: put it before the quantization step of a YAML "
            f"recipe file (--recipe my.yaml): {steps} (docs/ptq.md)."
        )
    return CompactnnError(
        f"{head}, so it is no suffix of {QUANT_FORM}: its short names are {forms}; to "
        f"quantize after it, chain both steps in a YAML recipe file (--recipe my.yaml): "
        f"{steps} (docs/pruning.md, Chains)."
    )


def method_short_forms(method: str) -> list[tuple[str, str]]:
    """``(form, example)`` of every short-name form whose recipes run ``method`` (read from
    the forms' examples), the quantization grammar's suffix aside; ``[]`` for none.

    Example:
        >>> method_short_forms("nm")
        [('nm<N>:<M>[-ft]', 'nm2:4')]
    """
    registry.load_builtins()  # their files register the forms
    out = []
    for rule in registry.SHORT_NAMES:
        if rule.form == QUANT_FORM:
            continue
        for example in rule.examples:
            try:
                steps = rule.build(rule.pattern.fullmatch(example)).steps
            except Exception:  # an example that does not build names nothing here
                continue
            if any(step.method == method for step in steps):
                out.append((rule.form, example))
                break
    return out


registry.register_short_name(
    QUANT_PATTERN, QUANT_FORM, ("w8a8", "w4a8", "w4a4-mse", "w4-g128", "w4a8g-g32-gptq")
)(_quant_short_name)
# Words of that grammar a method name must not be: w4-mse is rtn, w4-g32 a group size.
registry.reserve_method_names("|".join(SUFFIX_ALIASES), "a suffix of rtn's range method")
registry.reserve_method_names(r"g\d+", "-g<G> is the group size in w<W>-g<G>")


def short_name_forms() -> list[str]:
    return [f"{r.form}  (e.g. {', '.join(r.examples)})" for r in registry.SHORT_NAMES]


def parse_short_name(name: str) -> Recipe:
    recipe = _match_short_name(name)
    if recipe is None:
        raise _unknown_recipe(name)
    return recipe


def _match_short_name(name: str) -> Recipe | None:
    """The recipe short name ``name`` spells, None when no rule matches it (a rule that
    matches but refuses the values raises its own one-line error)."""
    first_error: CompactnnError | None = None
    for rule in registry.SHORT_NAMES:
        m = rule.pattern.fullmatch(name)
        if m:
            try:
                return rule.build(m)
            except CompactnnError as exc:  # e.g. the generic grammar on ``w2a8-pe50``: a
                # later, method-specific rule may take it, and its error beats "unknown method"
                if first_error is None or isinstance(first_error, registry.UnknownMethodError):
                    first_error = exc
    if isinstance(first_error, registry.UnknownMethodError):
        raise _unknown_method_in(name, first_error)
    if first_error is not None:
        raise first_error
    return None


def _unknown_method_in(name: str, exc: registry.UnknownMethodError) -> CompactnnError:
    """``exc`` for short name ``name`` (``w4a4-qdorp``), suggesting the valid short names
    whose method suffix is nearest: ``did you mean 'w4a4-qdrop'?``."""
    methods = [*registry.METHODS, *SUFFIX_ALIASES]
    near = difflib.get_close_matches(exc.name, methods, n=3, cutoff=0.6)
    head = name[: -len(exc.name)] if name.endswith(exc.name) else None
    names = [head + m for m in near if head is not None and _builds(head + m)][:2]
    names = names or _near_names(name, limit=2)
    hint = f"did you mean {' or '.join(map(repr, names))}? " if names else ""
    return registry.UnknownMethodError(
        exc.name,
        f"unknown method {short_repr(exc.name)} in recipe {short_repr(name)}; {hint}known "
        f"methods: {', '.join(sorted(registry.METHODS))}.",
    )


def _unknown_recipe(name: str) -> CompactnnError:
    """One line for an unknown short name: why, where known (a signed number, a suffix its
    family does not take, the forms it starts like), the nearest valid names, and where
    every form is listed.

    Example:
        >>> print(_unknown_recipe("sp50-dnss"))  # doctest: +ELLIPSIS
        unknown recipe 'sp50-dnss': '-dnss' is not a suffix sp50 takes (...); did you mean ...
    """
    parts = [f"unknown recipe {short_repr(name)}"]
    reason = _unknown_reason(name)
    if reason:
        parts.append(f": {reason}")
    near = _near_names(name)
    if near:
        parts.append(f"; did you mean {' or '.join(repr(n) for n in near)}?")
    else:
        parts.append(".")
    parts.append(
        " A recipe is a YAML file or a short name such as w8a8, w4a8, sp50, ch30 or nm2:4 "
        "(`compactnn recipes` lists every form)."
    )
    return CompactnnError("".join(parts))


def _family(name: str) -> list[ShortNameRule]:
    """The short-name rules whose form starts with the letters (and digits) ``name`` starts
    with: ``sp50-x`` -> every ``sp<P>...`` form, ``w5z`` -> ``w<W>...``."""
    return [r for r in registry.SHORT_NAMES if (lead := _lead(r)) and name.startswith(lead)]


def _lead(rule: ShortNameRule) -> str:
    """The literal start of a rule's form: ``sp`` of ``sp<P>-dns``, ``w2`` of ``w2[a<A>]...``."""
    return re.match(r"[a-z0-9]*", rule.form).group()


def _unknown_reason(name: str) -> str:
    """Why ``name`` is no short name, where a specific reason is known; else ''."""
    family = _family(name)
    if not family:
        return ""
    signed = re.fullmatch(r"([a-z]+)-(\d+)(.*)", name)  # sp-10: a negative percent
    signed_forms = [r for r in family if signed and _lead(r) == signed[1]]
    if signed_forms:
        head, number = signed[1], signed[2]
        placeholder = re.search(r"<(\w+)>", signed_forms[0].form)
        symbol = placeholder[1] if placeholder else "N"
        what = "a percent" if symbol == "P" else "a whole number"
        form = f"{head}<{symbol}>"
        return f"-{number} is negative: <{symbol}> in {form} is {what}, written without a sign"
    for cut in reversed([m.start() for m in re.finditer("-", name)]):
        head, tail = name[:cut], name[cut:]
        if any(r.pattern.fullmatch(head) for r in registry.SHORT_NAMES):
            forms = ", ".join(r.form for r in family)
            return f"'{tail}' is not a suffix {head} takes ({forms})"
    forms = ", ".join(f"{r.form} (e.g. {', '.join(r.examples[:2])})" for r in family)
    return f"it matches none of the forms it starts like: {forms}"


SHORT_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-:"


def _near_names(name: str, limit: int = 3) -> list[str]:
    """Valid short names one edit (a character deleted, inserted, changed, or two swapped)
    from ``name``, closest first by :func:`difflib.SequenceMatcher`; else close examples."""
    if len(name) > 40:
        return []
    edits = {name[:i] + name[i + 1 :] for i in range(len(name))}
    edits |= {name[:i] + name[i + 1] + name[i] + name[i + 2 :] for i in range(len(name) - 1)}
    for i in range(len(name) + 1):
        for c in SHORT_NAME_CHARS:
            edits |= {name[:i] + c + name[i:], name[:i] + c + name[i + 1 :]}
    edits.discard(name)
    valid = [e for e in edits if not re.search(r"(?<!\d)0\d", e) and _builds(e)]  # no w04
    if not valid:
        examples = [e for r in registry.SHORT_NAMES for e in r.examples]
        return difflib.get_close_matches(name, examples, n=limit, cutoff=0.8)
    ratio = {e: difflib.SequenceMatcher(None, name, e).ratio() for e in valid}
    return sorted(valid, key=lambda e: (-ratio[e], e))[:limit]


def _builds(name: str) -> bool:
    """Whether ``name`` is a short name some rule accepts (and builds without an error)."""
    for rule in registry.SHORT_NAMES:
        m = rule.pattern.fullmatch(name)
        if m:
            try:
                rule.build(m)
            except Exception:  # a suggestion never breaks the error it decorates
                continue
            return True
    return False


def _not_a_recipe_file(path: Path) -> CompactnnError:
    """One line for a recipe argument that names a folder or a file that is not YAML."""
    if path.is_dir():
        inside = path / "recipe.yaml"
        fix = (
            f"pass the recipe file in it, {str(inside)!r}"
            if inside.is_file()
            else "pass a recipe YAML file (e.g. DIR/recipe.yaml from compactnn search) or a "
            "short name such as w8a8"
        )
        return CompactnnError(f"recipe {str(path)!r} is a folder, not a recipe: {fix}.")
    return CompactnnError(
        f"recipe file {str(path)!r} is not named .yaml or .yml: a recipe file is YAML; "
        "rename it to end in .yaml."
    )


def _read_recipe_text(path: Path) -> str:
    """The text of a recipe file, which must be UTF-8 (YAML's own encoding)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CompactnnError(
            f"recipe file {str(path)!r} is not UTF-8 text (byte {exc.start} is "
            f"{exc.object[exc.start]:#04x}): save it as UTF-8 YAML."
        ) from exc


def resolve_recipe(recipe: str | os.PathLike | Recipe) -> Recipe:
    """A :class:`Recipe` from a short name, a YAML path, or a recipe object."""
    if isinstance(recipe, Recipe):
        return recipe
    registry.load_builtins()  # the built-in names, after a plain `import compactnn`
    if isinstance(recipe, os.PathLike) or (
        isinstance(recipe, str) and recipe.endswith((".yaml", ".yml"))
    ):
        path = Path(recipe)
        if path.is_dir():
            raise _not_a_recipe_file(path)
        if not path.is_file():
            raise CompactnnError(f"recipe file {str(path)!r} does not exist.")
        return Recipe.from_yaml(_read_recipe_text(path), f"recipe file {str(path)!r}")
    if not isinstance(recipe, str):
        raise CompactnnError(
            f"recipe must be a name, a YAML path or a Recipe, got {short_repr(recipe)}."
        )
    if not recipe.strip():
        raise CompactnnError(
            f"recipe {short_repr(recipe)} is empty: pass a short name such as w8a8 or a recipe "
            "YAML file."
        )
    found = _match_short_name(recipe.strip().lower())
    if found is not None:
        return found
    if recipe and Path(recipe).exists():  # a folder or a file that is not .yaml
        raise _not_a_recipe_file(Path(recipe))
    raise _unknown_recipe(recipe.strip().lower())
