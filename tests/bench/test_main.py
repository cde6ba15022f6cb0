"""``python -m compactnn.bench``: section files, and the combined file rebuilt from them."""

from __future__ import annotations

import sys
import types

import pytest

from compactnn.bench import __main__ as bench_main


@pytest.fixture
def fake_sections(monkeypatch):
    for name, text in (("alpha", "## Alpha\n\nA"), ("beta", "## Beta\n\nB")):
        mod = types.ModuleType(f"fake_bench_{name}")
        mod.run = lambda quick=False, text=text: text + (" quick" if quick else "")
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    broken = types.ModuleType("fake_bench_broken")
    broken.run = lambda quick=False: 1 / 0
    monkeypatch.setitem(sys.modules, "fake_bench_broken", broken)
    monkeypatch.setattr(
        bench_main,
        "SECTIONS",
        {"alpha": "fake_bench_alpha", "broken": "fake_bench_broken", "beta": "fake_bench_beta"},
    )


def test_sections_run_independently_and_combine(tmp_path, fake_sections):
    out = tmp_path / "benchmarks.md"
    assert bench_main.main(["--only", "beta", "--out", str(out)]) == 0
    assert (tmp_path / "bench" / "beta.md").read_text() == "## Beta\n\nB\n"
    assert "## Alpha" not in out.read_text()
    assert bench_main.main(["--only", "alpha", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    # both sections, in SECTIONS order, the rerun one updated, the other kept
    assert text.index("## Alpha\n\n**Quick run**") < text.index("A quick")
    assert text.index("A quick") < text.index("## Beta\n\nB")
    assert text.startswith(bench_main.TITLE)


def test_a_quick_run_says_so_at_the_top_of_its_section_file(tmp_path, fake_sections):
    out = tmp_path / "benchmarks.md"
    assert bench_main.main(["--only", "alpha", "--quick", "--out", str(out)]) == 0
    lines = (tmp_path / "bench" / "alpha.md").read_text().splitlines()
    assert lines[0] == "## Alpha"  # the heading stays first, the banner right under it
    assert lines[2] == bench_main.QUICK_BANNER and "not the committed full" in lines[2]
    assert lines[4] == "A quick"
    assert bench_main.main(["--only", "alpha", "--out", str(out)]) == 0  # a full run: no banner
    assert "Quick run" not in (tmp_path / "bench" / "alpha.md").read_text()
    assert bench_main.mark_quick("| t |\n").startswith(bench_main.QUICK_BANNER)  # no heading


def test_a_failing_section_keeps_the_others(tmp_path, fake_sections):
    out = tmp_path / "benchmarks.md"
    assert bench_main.main(["--out", str(out)]) == 1
    assert (tmp_path / "bench" / "alpha.md").exists() and (tmp_path / "bench" / "beta.md").exists()
    assert not (tmp_path / "bench" / "broken.md").exists()


def test_unknown_section(tmp_path, fake_sections, capsys):
    assert bench_main.main(["--only", "nope", "--out", str(tmp_path / "b.md")]) == 2
    assert "unknown section" in capsys.readouterr().err


def test_foundation_is_registered():
    from compactnn.bench.sections import SECTIONS

    assert SECTIONS["foundation"] == "compactnn.bench.foundation"
