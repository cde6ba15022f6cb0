import pytest

from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.recipe import Recipe, resolve_recipe


@pytest.mark.parametrize(
    "name,wbits,abits,group,range_method",
    [
        ("w8a8", 8, 8, None, "minmax"),
        ("w4a8", 4, 8, None, "minmax"),
        ("w4a4-mse", 4, 4, None, "mse"),
        ("w4-g128", 4, None, 128, "minmax"),
        ("w2a4", 2, 4, None, "minmax"),
    ],
)
def test_short_names(name, wbits, abits, group, range_method):
    r = resolve_recipe(name)
    (step,) = r.steps
    assert step.method == "rtn"
    assert step.config.weight.bits == wbits
    assert step.config.weight.group_size == group
    assert step.config.weight.range_method == range_method
    assert (step.config.act.bits if step.config.act else None) == abits
    assert step.config.weight.symmetric == (wbits == 8)


@pytest.mark.parametrize("bad", ["w9a8", "w4a0", "x4", "w4-g0", "w4-nosuchmethod", "w4-g"])
def test_bad_short_names_fail_clearly(bad):
    with pytest.raises(CompactnnError) as e:
        resolve_recipe(bad)
    needles = ("w<W>", "out of range", "unknown method", "group", "`compactnn recipes`")
    assert any(s in str(e.value) for s in needles)


def test_unknown_name_points_to_the_forms_on_one_line():
    with pytest.raises(CompactnnError, match=r"such as w8a8.*`compactnn recipes` lists every"):
        resolve_recipe("int4please")


def test_yaml_round_trip_is_exact(tmp_path):
    r = resolve_recipe("w4a8-mse")
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r
    text = """
name: mixed
steps:
  - method: rtn
    targets: {classes: [Linear], names: ["*"], ignore: [lm_head]}
    config:
      weight: {bits: 4, symmetric: false, granularity: group, group_size: 32}
      first_last_bits: null
  - method: rtn
    targets: {classes: [Linear], names: [lm_head]}
    config: {weight: {bits: 8}}
"""
    p = tmp_path / "r.yaml"
    p.write_text(text)
    r2 = resolve_recipe(str(p))
    assert r2.steps[0].targets.ignore == ("lm_head",)
    assert r2.steps[0].config.weight == QuantSpec(4, False, "group", 32)
    assert r2.steps[0].config.first_last_bits is None
    assert Recipe.from_yaml(r2.to_yaml()) == r2


def test_yaml_errors_name_the_field(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("steps:\n  - method: rtn\n    config: {weight: {bitz: 4}}\n")
    with pytest.raises(CompactnnError, match="bitz"):
        resolve_recipe(p)
    p.write_text("steps:\n  - method: rtn\n    config: {weight: {bits: 4, granularity: group}}\n")
    with pytest.raises(CompactnnError, match="group_size"):
        resolve_recipe(p)
    with pytest.raises(CompactnnError, match="does not exist"):
        resolve_recipe(str(tmp_path / "missing.yaml"))


def test_yaml_targets_typos_are_refused_before_compressing(tmp_path):
    from torch import nn

    import compactnn

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))
    cases = {
        "classes: [Conv3d, Linaer]": r"'Linaer' is not a layer class.*mean Linear",
        "classes: [Conv3d, Conv1d]": r"'Conv3d', 'Conv1d' match no module.*Conv2d, Flatten",
        'ignore: ["nosuch*"]': r"targets.ignore: 'nosuch\*' matches no module",
    }
    for targets, match in cases.items():
        p = tmp_path / "r.yaml"
        step = f"  - method: rtn\n    targets: {{{targets}}}\n    config: {{weight: {{bits: 4}}}}\n"
        p.write_text(f"steps:\n{step}")
        with pytest.raises(CompactnnError, match=match):
            compactnn.compress(model, resolve_recipe(p), progress=False)


@pytest.mark.parametrize("content", [b"\xff\xfe", b"name: r\nsteps: []\n# caf\xe9\n"])
def test_a_recipe_file_that_is_not_utf8_is_named(tmp_path, content):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    bad = next(i for i, byte in enumerate(content) if byte >= 0x80)  # the first non-ASCII
    with pytest.raises(CompactnnError) as info:
        resolve_recipe(str(path))
    message = str(info.value)
    assert f"recipe file {str(path)!r} is not UTF-8 text" in message
    assert f"byte {bad} is {content[bad]:#04x}" in message and "\n" not in message
    with pytest.raises(CompactnnError, match="is not UTF-8 text"):
        resolve_recipe(path)  # a Path, as compactnn.compress(model, path) passes it


def test_a_utf8_recipe_file_with_non_ascii_text_reads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("name: café\nsteps:\n  - method: rtn\n".encode())
    assert resolve_recipe(path).name == "café"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("  config: {first_last_bits: 8, first_last_bits: 4}\n", r"'first_last_bits' .*\(line 4\)"),
        ("  config:\n    first_last_bits: 8\n    first_last_bits: 4\n", "lines 5 and 6"),
    ],
)
def test_a_key_given_twice_is_refused_with_its_lines(body, needle):
    text = "name: dup\nsteps:\n- method: rtn\n" + body
    with pytest.raises(CompactnnError, match=needle):
        Recipe.from_yaml(text)
    assert Recipe.from_yaml(text.replace("first_last_bits: 4", "fold_bn: false")).steps


def test_a_recipe_of_dicts_is_refused_naming_the_step():
    rtn = resolve_recipe("w4").steps[0]
    with pytest.raises(CompactnnError, match=r"steps\[1\] is a dict, not a Step: use Step\('rtn'"):
        Recipe("e", [rtn, {"method": "rtn"}])
    assert Recipe("e", [rtn]).steps == (rtn,)


def test_a_method_rule_error_beats_the_generic_unknown_method():
    with pytest.raises(CompactnnError, match=r"share of PE tiles pruned"):
        resolve_recipe("w2a8-pe100")
    with pytest.raises(CompactnnError, match=r"unknown method"):
        resolve_recipe("w4a8-foo")
