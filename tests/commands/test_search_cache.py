"""``compactnn search`` keeps its sensitivity scores in a per-user cache, format by format: a
search killed halfway measures only the rest when run again."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from compactnn.cli import main
from compactnn.commands import search_cache
from compactnn.mixed_precision import sensitivity as sens

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )
"""
FORMATS = ["w2a8", "w3a8", "w4a8", "w8a8"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "cachenet.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("COMPACTNN_SEARCH_CACHE", raising=False)  # tests/conftest.py's
    monkeypatch.setenv("COMPACTNN_CACHE", str(tmp_path / "cache"))
    import cachenet

    model = cachenet.make()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.st")
    torch.manual_seed(1)
    save_file({"x": torch.randn(64, 1, 8, 8)}, tmp_path / "calib.safetensors")
    return tmp_path


@pytest.fixture
def measured(monkeypatch):
    """The formats measured (one entry per layer measured), optionally interrupted (a
    KeyboardInterrupt, as Ctrl-C or SIGTERM gives) when a format past the first ``stop``
    begins."""
    seen: list[str] = []
    stop: list[int] = []
    real = sens.format_weight

    def counting(w, fmt, original=None):
        if stop and fmt.name not in seen and len(set(seen)) >= stop[0]:
            raise KeyboardInterrupt
        seen.append(fmt.name)
        return real(w, fmt, original)

    monkeypatch.setattr(sens, "format_weight", counting)
    return seen, stop


def run(capsys, tmp, out, *more, weights="w.st", data="calib.safetensors"):
    argv = ["search", "cachenet:make", "--weights", str(tmp / weights), "--data",
            str(tmp / data), "--formats", ",".join(FORMATS), "--avg-bits", "4",
            "--out", str(out), "--no-progress", *more]  # fmt: skip
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def scores(out):
    return json.loads((out / "search.json").read_text())["scores"]


def test_a_killed_search_keeps_the_formats_it_measured(project, capsys, measured, monkeypatch):
    tmp = project
    seen, stop = measured
    stop.append(2)
    code, _, err = run(capsys, tmp, tmp / "s")  # Ctrl-C (or SIGTERM) in the third format
    assert code != 0 and "interrupted" in err
    assert sorted(set(seen)) == ["w2a8", "w3a8"]
    assert not (tmp / "s").exists() or not any((tmp / "s").iterdir())  # --out as it was
    cached = json.loads((tmp / "cache" / "search" / "sensitivity.json").read_text())
    assert len(cached["entries"]) == 2  # written as each format ended
    seen.clear()
    stop.clear()
    code, printed, _ = run(capsys, tmp, tmp / "s")
    assert code == 0
    assert sorted(set(seen)) == ["w4a8", "w8a8"]  # the first two are not measured again
    cache_dir = tmp / "cache" / "search"
    assert f"sensitivity: 2 of 4 formats from the cache in {cache_dir}" in printed
    # an uninterrupted run, on an empty cache, finds the same scores and recipe
    monkeypatch.setenv("COMPACTNN_CACHE", str(tmp / "fresh"))
    seen.clear()
    code, printed, _ = run(capsys, tmp, tmp / "u")
    assert code == 0 and sorted(set(seen)) == FORMATS
    assert "sensitivity: 4 formats measured, cached in" in printed
    assert scores(tmp / "s") == scores(tmp / "u")
    assert (tmp / "s" / "recipe.yaml").read_text() == (tmp / "u" / "recipe.yaml").read_text()
    keep = json.loads((tmp / "s" / "sensitivity.json").read_text())  # --out: this search's
    assert keep == json.loads((tmp / "u" / "sensitivity.json").read_text())
    assert len(keep["entries"]) == 4
    seen.clear()
    code, printed, _ = run(capsys, tmp, tmp / "u", "--force")  # all from the cache now
    assert code == 0 and seen == [] and "4 of 4 formats from the cache" in printed


def test_another_weight_or_data_file_is_measured_again(project, capsys, measured):
    tmp = project
    seen, _ = measured
    assert run(capsys, tmp, tmp / "a")[0] == 0 and sorted(set(seen)) == FORMATS
    weights = load_file(tmp / "w.st")
    weights["3.weight"][0, 0] += 0.5  # one weight of the last layer changed
    save_file(weights, tmp / "w2.st")
    seen.clear()
    code, printed, _ = run(capsys, tmp, tmp / "b", weights="w2.st")
    assert code == 0 and sorted(set(seen)) == FORMATS and "from the cache" not in printed
    data = load_file(tmp / "calib.safetensors")
    data["x"][0, 0, 0, 0] += 1.0  # one input value of the first batch changed
    save_file(data, tmp / "calib2.safetensors")
    seen.clear()
    code, printed, _ = run(capsys, tmp, tmp / "c", data="calib2.safetensors")
    assert code == 0 and sorted(set(seen)) == FORMATS and "from the cache" not in printed
    entries = json.loads((tmp / "cache" / "search" / "sensitivity.json").read_text())["entries"]
    assert len(entries) == 12  # three searches' scores side by side
    seen.clear()
    assert run(capsys, tmp, tmp / "d")[0] == 0 and seen == []  # the first one's, reused


@pytest.mark.parametrize(
    "text, why",
    [
        ('{"version": 2, "entries": {"ab', "it is damaged (not JSON)"),
        ('{"hello": "world"}', "it is not a compactnn sensitivity cache"),
        ('{"version": 2, "entries": {"k": {"0": "x"}}}', "its entries are damaged"),
        ('{"version": 1, "entries": {}}', "it is a cache of version 1, not 2"),
    ],
)
def test_a_damaged_or_foreign_cache_file_is_ignored_with_one_warning(
    project, capsys, measured, text, why
):
    tmp = project
    seen, _ = measured
    path = tmp / "cache" / "search" / "sensitivity.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    code, _, err = run(capsys, tmp, tmp / "s")
    assert code == 0 and sorted(set(seen)) == FORMATS  # never trusted: measured
    lines = [line for line in err.splitlines() if "sensitivity cache" in line]
    assert lines == [f"warning: ignoring the sensitivity cache {path}: {why}; its scores are "
                     "measured again and the file replaced."]  # fmt: skip
    assert len(json.loads(path.read_text())["entries"]) == 4  # replaced by a valid file


def test_an_unwritable_cache_folder_is_one_warning_and_the_search_runs(
    project, capsys, measured, monkeypatch
):
    tmp = project
    (tmp / "afile").write_text("not a folder")
    monkeypatch.setenv("COMPACTNN_CACHE", str(tmp / "afile" / "cache"))
    code, printed, err = run(capsys, tmp, tmp / "s")
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning: cannot write")]
    assert len(warned) == 1 and "set COMPACTNN_CACHE to a writable folder" in warned[0]
    assert "sensitivity: 4 formats measured (not cached)" in printed
    assert len(json.loads((tmp / "s" / "sensitivity.json").read_text())["entries"]) == 4
    seen, _ = measured
    seen.clear()  # with --force, --out's earlier scores are reused even so
    code, printed, _ = run(capsys, tmp, tmp / "s", "--force")
    assert code == 0 and seen == []
    assert "4 of 4 formats from --out's earlier sensitivity.json" in printed


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACTNN_SEARCH_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("COMPACTNN_CACHE", str(tmp_path / "c"))
    assert search_cache.cache_root() == tmp_path / "own"
    monkeypatch.delenv("COMPACTNN_SEARCH_CACHE")
    assert search_cache.cache_root() == tmp_path / "c" / "search"
    monkeypatch.delenv("COMPACTNN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert search_cache.cache_root() == tmp_path / "x" / "compactnn" / "search"
