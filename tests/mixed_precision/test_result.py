"""``SearchResult.save``: the folder it writes into is checked before anything is written."""

import numpy as np
import pytest
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.mixed_precision import SearchResult
from compactnn.recipe import parse_short_name


def result() -> SearchResult:
    return SearchResult(
        recipe=parse_short_name("w8"),
        assignment={"0": "w8"},
        layers=["0"],
        formats=["w4", "w8"],
        scores=np.zeros((1, 2)),
        costs={"bytes": np.array([[10.0, 20.0]])},
        predicted=0.0,
        cost={"bytes": 20.0},
    )


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("force", [False, True])
def test_an_artifact_folder_is_refused_and_still_loads(tmp_path, force):
    model = nn.Sequential(nn.Linear(8, 4))
    art = tmp_path / "art"
    compactnn.save(compactnn.compress(model, "w8", progress=False), art)
    before = snapshot(art)
    with pytest.raises(CompactnnError, match=r"'.*art' holds a compactnn artifact.*new folder"):
        result().save(art, force=force)
    assert snapshot(art) == before
    compactnn.load(art, model=model)


def test_a_folder_of_other_files_or_a_file_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(CompactnnError, match=r"not empty \(it has notes.txt\).*empty or new"):
        result().save(tmp_path / "mine", force=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CompactnnError, match="is a file; name a folder"):
        result().save(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "x"


def test_an_earlier_result_needs_force_and_the_score_cache_does_not(tmp_path):
    out = tmp_path / "search"
    out.mkdir()
    (out / "sensitivity.json").write_text("{}")  # cache_dir=out, as docs/search.md shows
    assert result().save(out) == out
    assert {p.name for p in out.iterdir()} == {"recipe.yaml", "search.json", "sensitivity.json"}
    before = snapshot(out)
    with pytest.raises(CompactnnError, match="earlier search's results; pass force=True"):
        result().save(out)
    assert snapshot(out) == before
    result().save(out, force=True)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers
