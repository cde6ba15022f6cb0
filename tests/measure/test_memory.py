"""Resident memory of a running model, measured in a fresh process."""

from __future__ import annotations

import textwrap

import pytest

from compactnn.errors import CompactnnError
from compactnn.measure.memory import MIB, resident_memory

BUILDERS = textwrap.dedent(
    """
    import torch

    KEPT = []

    def hold(mib):
        # a "model" holding exactly `mib` MiB of weights, touched so the pages are resident
        w = torch.ones(mib * 1024 * 1024 // 4)
        KEPT.append(w)
        return lambda: w.sum()

    def transient(mib):
        # loads `mib` MiB, keeps nothing: freed memory must not be counted
        w = torch.ones(mib * 1024 * 1024 // 4)
        del w
        return lambda: None

    def data(mib):
        # what the model needs but is not the model (a data set, a skeleton): held by setup
        return {"data": torch.ones(mib * 1024 * 1024 // 4)}

    def hold_with(context, mib):
        assert context["data"].numel() > 0  # setup's result comes first
        return hold(mib)

    def broken():
        raise RuntimeError("no such artifact: out/missing")
    """
)


@pytest.fixture
def builders(tmp_path, monkeypatch):
    (tmp_path / "rss_builders.py").write_text(BUILDERS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "rss_builders"


def test_held_weights_are_counted_and_freed_ones_are_not(builders):
    # the first torch call also maps kernels and thread stacks (a few MiB that vary with the
    # machine): the difference between two holds cancels that fixed cost
    held = resident_memory(f"{builders}:hold", [64], preload=("json",))
    small = resident_memory(f"{builders}:hold", [16], preload=("json",))
    assert abs((held.added - small.added) - 48 * MIB) < 4 * MIB, (held, small)
    assert held.added >= 64 * MIB - 2 * MIB, held
    assert held.peak >= held.after >= held.before > 0
    freed = resident_memory(f"{builders}:transient", [48])
    assert freed.added < small.added - 12 * MIB, (freed, small)  # 48 MiB freed, 16 held
    assert freed.peak - freed.before > 40 * MIB  # it did load them: the high-water mark shows it
    assert held.to_dict()["added"] == held.added


def test_setup_is_held_before_the_first_reading_and_passed_to_the_builder(builders):
    # 64 MiB of setup data is not counted; the 16 MiB the builder holds is, as without setup
    plain = resident_memory(f"{builders}:hold", [16])
    mem = resident_memory(f"{builders}:hold_with", [16], setup=f"{builders}:data", setup_args=[64])
    # the 16 MiB are counted, the 64 MiB of setup are not (the interpreter's own first-use
    # allocations move either reading by up to ~10 MiB from run to run: 18.9 vs 27.4 seen)
    for m in (plain, mem):
        assert 15 * MIB < m.added < 48 * MIB, (mem, plain)
    assert mem.before - plain.before > 60 * MIB, (mem, plain)  # setup's data was resident


def test_bad_builder_names_the_problem(builders):
    with pytest.raises(CompactnnError, match="module:function"):
        resident_memory("rss_builders.hold")
    with pytest.raises(CompactnnError, match="setup="):
        resident_memory(f"{builders}:hold", [1], setup="rss_builders.data")
    with pytest.raises(CompactnnError, match="no such artifact"):
        resident_memory(f"{builders}:broken")
