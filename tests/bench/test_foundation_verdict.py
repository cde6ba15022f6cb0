"""The foundation section says in words whether compactnn's fastest row beats float."""

from types import SimpleNamespace as NS

from compactnn.bench.foundation import verdict


def _paths(best: float, winner: str, **timings: float) -> NS:
    return NS(
        best=NS(median_s=best),
        winner=winner,
        timings={k: NS(median_s=v) for k, v in timings.items()},
    )


def test_the_fastest_rows_are_named_and_a_slower_one_is_said_to_be_slower():
    big = _paths(0.050, "ort-fp32", w8=0.040, w4=0.030, ort_dyn=0.020, fp32=0.050)
    one = _paths(0.005, "ort-fp32-fused", w8=0.006, w4=0.0055, ort_dyn=0.004, fp32=0.005)
    text = verdict(["w8", "w4"], ["ort_dyn"], big, one, 16)
    assert (
        "Batch 16: compactnn's fastest compressed row, w4, is 1.67x the fastest float path" in text
    )
    assert "the fastest peer, ort_dyn, 2.50x" in text
    assert "Batch 1: w4 is 0.91x the fastest float path (ort-fp32-fused), slower than float" in text
    assert text.count("slower than float") == 1


def test_untimed_rows_give_no_sentence():
    big = _paths(0.05, "ort-fp32", fp32=0.05)
    assert verdict(["w8"], [], big, big, 8) == ""
