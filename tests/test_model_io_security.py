"""No code runs from a file unless the user says so (issue 11).

Each hostile file is first shown to be live against an independent reference (plain
``torch.export.load`` runs its payload, which writes a marker file); then compactnn must refuse
it with one ``error:`` line, exit status 2 and no marker.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compactnn.cli import main
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export import artifact as artifact_mod
from compactnn.export.hf import skeleton_from_header, transformers_model_class
from compactnn.model_io import resolve_model
from compactnn.safe_pt2 import check_archive, safe_expression

FACTORY = (
    "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Linear(8, 16), nn.ReLU())\n"
)


class Payload:
    """Unpickling this creates the marker file (``open(marker, "w")``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy the archive ``src`` to ``dst``, passing each entry through ``edit(rel, bytes)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, edit(rel, zin.read(info.filename)))


def _pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _evil_weight(marker: Path):
    def edit(rel: str, data: bytes) -> bytes:
        if rel.endswith("_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        return _pickled(Payload(marker)) if rel == "data/weights/weight_0" else data

    return edit


def _evil_inputs(marker: Path):
    def edit(rel: str, data: bytes) -> bytes:
        return _pickled((Payload(marker),)) if rel.startswith("data/sample_inputs/") else data

    return edit


def _evil_shape(marker: Path):
    payload = f"Symbol('s0') + 0*__import__('pathlib').Path({str(marker)!r}).touch()"

    def edit(rel: str, data: bytes) -> bytes:
        return _swap_expr(data, payload) if rel.startswith("models/") else data

    return edit


def _swap_expr(data: bytes, payload: str) -> bytes:
    program = json.loads(data)
    stack = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "expr_str" in item:
                item["expr_str"] = payload
                return json.dumps(program).encode()
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError("no shape expression to replace")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A clean .pt2 (dynamic batch), calibration data, and a factory module with weights."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sec_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU()).eval()
    x = torch.randn(16, 8)
    save_file({"x": x}, tmp_path / "x.safetensors")
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    program = torch.export.export(model, (x[:4],), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, str(tmp_path / "clean.pt2"))
    return tmp_path, model, x


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("make_edit", [_evil_weight, _evil_inputs, _evil_shape])
def test_hostile_pt2_runs_nothing(project, capsys, make_edit):
    tmp, _model, _x = project
    marker = tmp / "marker"
    _rewrite(tmp / "clean.pt2", tmp / "evil.pt2", make_edit(marker))
    # reference: torch's own loader really runs the payload
    try:
        torch.export.load(str(tmp / "evil.pt2"))
    except Exception:
        pass
    assert marker.exists()
    marker.unlink()
    capsys.readouterr()  # torch's own log lines
    code, _out, err = run_cli(
        capsys, "compress", "evil.pt2", "-r", "w8", "-o", "o", "-d", "x.safetensors"
    )
    assert_one_error_line(code, err, "evil.pt2", "--trust-pickle")
    assert not marker.exists() and not (tmp / "o").exists()


def test_rewritten_clean_archive_and_plain_pt2_still_compress(project, capsys):
    tmp, model, x = project
    _rewrite(tmp / "clean.pt2", tmp / "copy.pt2", lambda _rel, data: data)  # same as tests above
    assert torch.equal(resolve_model("copy.pt2").model(x), model(x))
    code, _out, err = run_cli(
        capsys,
        "compress",
        "clean.pt2",
        "-r",
        "w8",
        "-d",
        "x.safetensors",
        "-o",
        "a",
        "--no-progress",
    )
    assert code == 0, err
    assert len(json.loads((tmp / "a" / "compactnn.json").read_text())["layers"]) == 1


@pytest.mark.parametrize(
    ("entry", "target"),
    [("models/model.json", "torch.os.system"), ("data/aotinductor/model/x.so", None)],
)
def test_graph_calls_and_native_code_are_refused(project, entry, target):
    tmp = project[0]
    assert callable(torch.os.system)  # what torch's deserializer resolves "torch.os.system" to
    src = (tmp / "clean.pt2").read_bytes()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = zin.read(info.filename)
            if target and info.filename.endswith(entry):
                data = data.replace(b'"torch.ops.aten.linear.default"', json.dumps(target).encode())
            zout.writestr(info.filename, data)
        if not target:
            zout.writestr(f"{root}/{entry}", b"\x7fELF")
    check_archive(src, "clean.pt2")  # the untouched archive passes
    with pytest.raises(CompactnnError, match="--trust-pickle"):
        check_archive(out.getvalue(), "bad.pt2")


@pytest.mark.parametrize(
    ("expr", "ok"),
    [
        ("Add(Mul(Integer(2), Symbol('s0', positive=True, integer=True)), Integer(1))", True),
        ("FloorDiv(Symbol('s12', integer=True), Float('1.5', precision=53))", True),
        ("__import__('os').system('true')", False),
        ("Symbol('s0').__class__", False),
        ("open('f')", False),
        ("Symbol('x; import os')", False),
    ],
)
def test_shape_expressions_are_arithmetic_only(expr, ok):
    assert safe_expression(expr) is ok


def test_pickle_refusal_does_not_call_every_pt2_safe(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "m.pt")
    with pytest.raises(CompactnnError) as exc:
        resolve_model(str(tmp_path / "m.pt"))
    assert "raw" in str(exc.value) and "--trust-pickle" in str(exc.value)


def _artifact(tmp: Path, model: nn.Module, x: torch.Tensor) -> Path:
    code = main(
        [
            "compress",
            "sec_factory:make",
            "--weights",
            "w.safetensors",
            "-r",
            "w8a8",
            "-d",
            "x.safetensors",
            "-o",
            str(tmp / "art"),
            "--no-progress",
        ]
    )
    assert code == 0
    return tmp / "art"


def _forge(art: Path, monkeypatch, source: dict) -> None:
    """Rewrite the header's source record; keep it readable even once headers carry a digest
    (a forger recomputes it), so the defence under test is ours, not the digest's."""
    path = art / artifact_mod.HEADER
    header = json.loads(path.read_text())
    header["extra"]["source"] = source
    path.write_text(json.dumps(header))
    try:
        artifact_mod.read_header(art)
    except ArtifactError:
        forged = lambda _p: json.loads(path.read_text())  # noqa: E731
        for mod in ("compactnn.commands.evaluate", "compactnn.commands.deploy"):
            monkeypatch.setattr(f"{mod}.read_header", forged)


@pytest.mark.parametrize("command", ["eval", "deploy"])
@pytest.mark.parametrize("spec", ["os:abort", "this:s", "EVIL"])
def test_artifact_source_names_no_code(project, capsys, monkeypatch, command, spec):
    tmp, model, x = project
    art = _artifact(tmp, model, x)
    marker = tmp / "marker"
    _rewrite(tmp / "clean.pt2", tmp / "evil.pt2", _evil_weight(marker))
    spec = str(tmp / "evil.pt2") if spec == "EVIL" else spec
    _forge(art, monkeypatch, {"model": spec, "kind": "reference"})
    capsys.readouterr()
    code, out, err = run_cli(capsys, command, str(art), "-d", "x.safetensors", "--runs", "1")
    assert_one_error_line(code, err, "was made from", "--model")
    assert not marker.exists()
    assert "Beautiful is better" not in out + err  # `import this` never ran


def test_eval_takes_the_model_from_the_command_line_and_checks_weights(project, capsys):
    tmp, model, x = project
    art = _artifact(tmp, model, x)
    code, _out, err = run_cli(capsys, "eval", str(art), "-d", "x.safetensors", "--runs", "1")
    assert_one_error_line(code, err, "sec_factory:make", "SHA-256", "--weights")
    args = ["eval", str(art), "-m", "sec_factory:make", "-d", "x.safetensors", "--runs", "1"]
    code, _out, err = run_cli(capsys, *args, "--weights", "w.safetensors")
    # a loaded machine may add a latency warning; no other warning (weights, pickle) allowed
    others = [ln for ln in err.splitlines() if "warning" in ln and "latency of" not in ln]
    assert code == 0 and not others, err
    torch.manual_seed(1)
    save_file(nn.Sequential(nn.Linear(8, 16), nn.ReLU()).state_dict(), tmp / "other.safetensors")
    code, _out, err = run_cli(capsys, *args, "--weights", "other.safetensors")
    assert code == 2 and "error: " in err and "not the file" in err, err
    assert "pass the --weights (MODEL) it was made from" in err, err


def _bert_config():
    transformers = pytest.importorskip("transformers")
    return transformers.BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
    )


@pytest.mark.parametrize("name", ["T5Model", "AutoModel", "pipeline", "logging", "BertConfig", 3])
def test_hf_header_class_outside_the_allow_list_is_refused(name):
    header = {"extra": {"hf": {"class": name, "config": _bert_config().to_dict()}}}
    with pytest.raises(ArtifactError, match=r"load\(path, model=\.\.\.\)"):
        skeleton_from_header(Path("art"), header)


def test_hf_header_rebuilds_allowed_class_without_auto_map():
    config = _bert_config().to_dict()
    config["auto_map"] = {"AutoModel": "evil_module.EvilModel"}
    model = skeleton_from_header(
        Path("art"), {"extra": {"hf": {"class": "BertModel", "config": config}}}
    )
    assert type(model).__name__ == "BertModel" and not getattr(model.config, "auto_map", None)
    assert transformers_model_class("pipeline") is None  # a function, not a model class
    config["model_type"] = "llama"
    with pytest.raises(ArtifactError, match="config"):
        skeleton_from_header(
            Path("art"), {"extra": {"hf": {"class": "BertModel", "config": config}}}
        )


def test_hf_header_asking_for_a_huge_model_is_refused_before_allocating(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"\0" * 1024)
    config = _bert_config().to_dict()
    header = {"extra": {"hf": {"class": "BertModel", "config": config}}}
    assert type(skeleton_from_header(tmp_path, header)).__name__ == "BertModel"
    config["vocab_size"] = 10**9  # an 8 G-weight skeleton (32 GB) from a 1 KB artifact
    with pytest.raises(ArtifactError, match="more than its 1,024 bytes"):
        skeleton_from_header(tmp_path, header)


def test_hf_directory_with_only_pickled_weights_needs_trust(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(_bert_config())
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CompactnnError, match="--trust-pickle"):
        resolve_model(str(tmp_path / "hf"))
    loaded = resolve_model(str(tmp_path / "hf"), trust_pickle=True)
    assert torch.equal(
        loaded.model.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight
    )


@pytest.mark.parametrize("extra", [None, "evil.py"])
@pytest.mark.parametrize("trust", [False, True])
def test_hf_directory_without_weights_says_so(tmp_path, extra, trust):
    pytest.importorskip("transformers")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    if extra:
        (folder / extra).write_text("raise SystemExit('ran')\n")
    with pytest.raises(CompactnnError) as err:
        resolve_model(str(folder), trust_pickle=trust)
    message = str(err.value)
    assert message.startswith(f"{str(folder)!r} has no weights: ")
    assert "model.safetensors" in message and "pickle" not in message
