"""The peak a model's build and first forward pass reach, apart from what came before them."""

from __future__ import annotations

import textwrap

import pytest

from compactnn.measure.memory import MIB, ResidentMemory, resident_memory

BUILDERS = textwrap.dedent(
    """
    import torch

    def loaded_then_freed(mib):
        # setup touches `mib` MiB and frees them: the process's high-water mark before the
        # build is that, not the model's
        w = torch.ones(mib * 1024 * 1024 // 4)
        del w
        return {}

    def spike(context, mib, keep):
        # a loader that needs `mib` MiB at once (a dense copy) and keeps `keep` MiB
        w = torch.ones(mib * 1024 * 1024 // 4)
        kept = w[: keep * 1024 * 1024 // 4].clone()
        del w
        return lambda: kept.sum()
    """
)


@pytest.fixture
def builders(tmp_path, monkeypatch):
    (tmp_path / "peak_builders.py").write_text(BUILDERS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "peak_builders"


def test_peak_is_the_builds_own_not_the_setups(builders):
    # setup peaks at 160 MiB and frees them; the build peaks at 64 MiB and keeps 8
    mem = resident_memory(
        f"{builders}:spike", [64, 8], setup=f"{builders}:loaded_then_freed", setup_args=[160]
    )
    assert mem.peak_reset, mem
    assert 60 * MIB < mem.peak_added < 120 * MIB, mem  # the build's 64, not setup's 160
    assert mem.peak_added >= mem.added, mem  # the high-water mark is at or above the end
    assert mem.to_dict()["peak_added"] == mem.peak_added


def test_without_the_reset_the_peak_added_is_an_upper_bound():
    old = ResidentMemory(before=100, after=150, peak=400)  # an older child: no reset
    assert not old.peak_reset and old.peak_added == 300
