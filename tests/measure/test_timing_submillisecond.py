"""Timings under 1 ms: judged by the median against the fastest call and by the block medians."""

from __future__ import annotations

from compactnn.measure.timing import (
    MIN_JUDGED_S,
    Timing,
    _block,
    suspect_mark,
    suspect_reasons,
)


def _sub_ms(median: float, low: float, high: float, blocks=(), **kw) -> Timing:
    return Timing(median, low, high, 90, 2, 2, block_medians_s=tuple(blocks), **kw)


def test_quiet_sub_ms_with_one_preempted_call_is_not_marked():
    # digits-resnet ort-fp32, tester's rep/dr1: 0.15 ms (0.14-4.42), 6% above its fastest call
    t = _sub_ms(0.148e-3, 0.139e-3, 4.42e-3, (0.150e-3, 0.147e-3, 0.146e-3), cpu_share=0.6)
    assert t.median_s < MIN_JUDGED_S and t.spread > 20
    assert suspect_reasons(t) == []


def test_median_far_above_the_fastest_call_is_marked():
    # rep/dr1's w4a8 int8: 0.55 ms (0.33-16.55), unmarked before; its speedup is marked with it
    t = _sub_ms(0.554e-3, 0.326e-3, 16.55e-3)
    reasons = suspect_reasons(t)
    assert reasons == [
        "median 0.55 ms is 70% above the fastest call (0.33 ms): most calls were slowed by "
        "something else"
    ]
    clean = _sub_ms(0.148e-3, 0.139e-3, 4.42e-3).to_dict()
    assert suspect_mark(clean, t.to_dict()) == " *"
    assert suspect_mark(clean) == ""


def test_median_just_under_the_limit_is_not_marked():
    assert suspect_reasons(_sub_ms(0.119e-3, 0.1e-3, 0.5e-3)) == []
    assert suspect_reasons(_sub_ms(0.121e-3, 0.1e-3, 0.5e-3))[0].startswith("median 0.12 ms is 21%")


def test_one_slow_block_is_marked_even_with_a_clean_median():
    # measured under a `yes` neighbour: one 30-call block ran at 8.5 ms/call
    t = _sub_ms(0.259e-3, 0.241e-3, 346e-3, (0.253e-3, 0.246e-3, 8.525e-3))
    assert suspect_reasons(t) == [
        "block medians 0.25-8.53 ms spread 3197% around the median: a block ran while "
        "something else did"
    ]
    # blocks within 25% of the median: not marked
    assert suspect_reasons(_sub_ms(0.2e-3, 0.19e-3, 1e-3, (0.19e-3, 0.2e-3, 0.239e-3))) == []


def test_sub_ms_cpu_share_alone_is_not_marked():
    # PASSIVE pool threads sleep between parallel regions: their wake-up is off-CPU wall time
    assert suspect_reasons(_sub_ms(0.35e-3, 0.329e-3, 9e-3, cpu_s=0.13e-3, cpu_share=0.37)) == []


def test_long_calls_keep_the_per_call_spread_rule():
    t = Timing(4.02e-3, 1.58e-3, 11.43e-3, 48, 2, 2, block_medians_s=(4e-3, 4.1e-3, 3.9e-3))
    assert suspect_reasons(t)[0].startswith("runs spread 245% around the median")


def test_block_records_its_median():
    times: list[float] = []
    cpu: list[tuple[float, float, float]] = []
    _block(lambda: None, 5, times, cpu)
    assert len(times) == 5 and len(cpu) == 1
    assert cpu[0][2] == sorted(times)[2]
