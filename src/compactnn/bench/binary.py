"""Benchmark section ``binary``: the bit-packed popcount convolution against oneDNN int8.

A ReActNet-style stack at ResNet-18's 3x3 layer shapes (64 channels at 56x56, 128 at 28x28,
256 at 14x14, 512 at 7x7; stride 1, zero padding 1), the same ``+-1`` activations and
weights on three paths, each timed with the rotating-block protocol in one process:

- ``popcount``: :class:`compactnn.kernels.bitconv.BitConv2d` from float input (packing the
  signs included), float output with the per-channel scale applied;
- ``int8``: oneDNN's int8 convolution from float input (sign -> uint8 codes included);
- ``fp32``: ``F.conv2d`` of the ``+-1`` float tensors (channels-last);
- ``popcount core`` / ``int8 core``: the kernels alone on inputs already packed / coded.

Each row gives the multiply-accumulates of the layer, the milliseconds of each path, the
ratios, the GOP/s reached (1 MAC = 2 ops) and the fraction of each path's peak: int8 VNNI
64 MACs per 512-bit ``vpdpbusd`` per cycle; popcount 512 binary MACs per
``vpxorq + vpopcntq + vpaddq`` (counted at one such triple per cycle) per core, both at
the clock :func:`peak_clock` gives (measured from a vpdpbusd-only loop where the VNNI build
is there). Times whose timing looked inflated are marked (``*``), with the reasons.

Run: ``OMP_WAIT_POLICY=PASSIVE python -m compactnn.bench.binary [--quick]`` (writes
``docs/bench/binary.md``), or ``run()`` from ``python -m compactnn.bench`` once the section
is registered.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from compactnn.kernels import bitconv
from compactnn.measure.environment import cpu_description, environment
from compactnn.measure.timing import (
    SUSPECT_MARK,
    omp_wait_policy,
    spin_count,
    suspect_reasons,
    time_blocks,
)

PATHS = ("fp32", "int8", "popcount", "int8_core", "popcount_core")  # BinaryRow's times, in order
LAYERS = ((64, 56), (128, 28), (256, 14), (512, 7))  # (channels, spatial size), 3x3 convs
INT8_MACS_PER_CYCLE = 64  # one 512-bit vpdpbusd: 64 uint8 x int8 products per cycle
BINARY_MACS_PER_CYCLE = 512  # one 512-bit xor + popcount + add: 512 +-1 products
OUT = Path("docs/bench/binary.md")
CL = torch.channels_last


@dataclass(frozen=True)
class BinaryRow:
    """One layer shape at one thread count and batch; times in milliseconds (medians)."""

    channels: int
    size: int
    batch: int
    threads: int
    macs: int
    fp32_ms: float
    int8_ms: float
    popcount_ms: float
    int8_core_ms: float
    popcount_core_ms: float
    exact: bool  # popcount and int8 integer outputs equal the float reference
    # "path: reason" for each timing that looked inflated (the TimingWarning's reasons:
    # measure.timing.suspect_reasons), whether or not the once-per-label warning was shown
    suspect: tuple[str, ...] = ()

    def mark(self, path: str) -> str:
        """:data:`SUSPECT_MARK` when ``path``'s timing in this row looked inflated."""
        return SUSPECT_MARK if any(s.startswith(path + ": ") for s in self.suspect) else ""

    @property
    def popcount_vs_int8(self) -> float:
        return self.int8_ms / self.popcount_ms

    @property
    def popcount_vs_fp32(self) -> float:
        return self.fp32_ms / self.popcount_ms

    @property
    def int8_vs_fp32(self) -> float:
        return self.fp32_ms / self.int8_ms

    def gops(self, ms: float) -> float:
        """Operations per second (2 per MAC) in GOP/s for a time in milliseconds."""
        return 2 * self.macs / (ms * 1e-3) / 1e9


def cpu_ghz() -> float | None:
    """The current clock of the first CPU from ``/proc/cpuinfo`` (None where unknown)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1e3
    return None


def max_ghz() -> float | None:
    """The highest clock the kernel reports (cpufreq's ``cpuinfo_max_freq``; None where
    there is no cpufreq, as in many virtual machines)."""
    path = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(path.read_text().strip()) / 1e6  # kHz
    except (OSError, ValueError):
        return None


def vnni_ghz(iters: int = 4 * 10**7) -> float | None:
    """The clock one core runs 512-bit ``vpdpbusd`` at, measured: a loop of nothing but
    independent vpdpbusd (``vnni_peak_macs``) on one thread, its MACs per second of process
    CPU time (so other jobs on the machine do not lower it; median of 3) divided by
    ``INT8_MACS_PER_CYCLE``. None without the VNNI build."""
    import time

    if not bitconv.available() or not bitconv.load_extension().has_vnni():
        return None
    ext = bitconv.load_extension()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ext.vnni_peak_macs(iters // 40, 1)
        rates = []
        for _ in range(3):
            c0 = time.process_time()
            done = ext.vnni_peak_macs(iters, 1)
            rates.append(done / max(time.process_time() - c0, 1e-9))
    finally:
        torch.set_num_threads(saved)
    return statistics.median(rates) / INT8_MACS_PER_CYCLE / 1e9


def peak_clock() -> tuple[float, str] | None:
    """The clock (GHz) the roofline's peaks count cycles at, and where it comes from: the
    measured vpdpbusd rate (:func:`vnni_ghz`), else cpufreq's maximum clock, else the
    current clock ``/proc/cpuinfo`` reports (which can be below the boost clock the core
    runs at: shares of the peak can then exceed 100%)."""
    ghz = vnni_ghz()
    if ghz:
        return ghz, (
            f"measured: a loop of nothing but 512-bit vpdpbusd ran {ghz * INT8_MACS_PER_CYCLE:.0f}"
            f" GMAC/s of CPU time on one thread, {INT8_MACS_PER_CYCLE} MAC per instruction at one "
            "per cycle"
        )
    ghz = max_ghz()
    if ghz:
        return ghz, "cpufreq's maximum clock (cpuinfo_max_freq)"
    ghz = cpu_ghz()
    if ghz:
        return ghz, "the current clock /proc/cpuinfo reports (the boost clock can be higher)"
    return None


def _layer_calls(channels: int, size: int, batch: int, seed: int = 0):
    """The contenders for one layer shape, plus whether their integers agree exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g).contiguous(memory_format=CL)
    w_pm1 = torch.where(torch.randn(channels, channels, 3, 3, generator=g) >= 0, 1.0, -1.0)
    scale = torch.rand(channels, generator=g) + 0.5
    zero_shift = torch.zeros(channels)
    xf = torch.where(x >= 0, 1.0, -1.0).contiguous(memory_format=CL)
    wf = w_pm1.contiguous(memory_format=CL)
    pop = bitconv.BitConv2d(w_pm1 > 0, (1, 1), (1, 1), (1, 1))
    w8 = w_pm1.to(torch.int8)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    q = (x >= 0).to(torch.uint8).mul_(2).add_(127).contiguous(memory_format=CL)
    packed = torch.ops.onednn.qconv_prepack(w8, scale, 1.0, 128, *geo, list(q.shape))
    wz = torch.zeros(channels, dtype=torch.int64)

    def int8_core(codes=q):
        return torch.ops.onednn.qconv_pointwise(
            codes, 1.0, 128, packed, scale, wz, None, *geo, 1.0, 0, torch.float32, "none", [], ""
        )

    def int8():
        return int8_core((x >= 0).to(torch.uint8).mul_(2).add_(127).contiguous(memory_format=CL))

    words = pop.ext.pack_signs(x, zero_shift)

    def popcount_core():
        return pop.ext.bitconv2d(
            words, pop.weight_words, pop.tap_popcount, channels, channels, 3, 3,
            [1, 1], [1, 1], [1, 1], scale, None,
        )  # fmt: skip

    calls = {
        "fp32": lambda: F.conv2d(xf, wf, padding=1),
        "int8": int8,
        "popcount": lambda: pop(x, zero_shift, scale),
        "int8_core": int8_core,
        "popcount_core": popcount_core,
    }
    with torch.no_grad():
        ref = F.conv2d(xf.double(), w_pm1.double(), padding=1)
        exact = torch.equal(pop(x, zero_shift).double(), ref)
        dots8 = (int8_core() / scale.view(1, -1, 1, 1)).round().double()
        exact = exact and torch.equal(dots8, ref)
    return calls, exact


def bench_binary(
    layers=LAYERS, batches=(1, 8), threads=(1, 2), runs: int = 9, pause_s: float = 0.05
) -> list[BinaryRow]:
    """Time every path on every (layer, batch, threads); returns one row each.

    Example:
        >>> rows = bench_binary(((64, 8),), batches=(1,), threads=(1,), runs=3)  # doctest: +SKIP
    """
    rows = []
    for channels, size in layers:
        for batch in batches:
            calls, exact = _layer_calls(channels, size, batch)
            for t in threads:
                with torch.no_grad():
                    # warm blocks of ~50 ms: one cold call per block timed the threads'
                    # wake-up, and 2 threads then looked slower than 1 on every path
                    times = time_blocks(
                        calls, warmup=2, runs=runs, threads=t, pause_s=pause_s, block_s=0.05
                    )
                ms = {k: v.median_s * 1e3 for k, v in times.items()}
                macs = batch * size * size * channels * channels * 9
                odd = tuple(f"{k}: {why}" for k in PATHS for why in suspect_reasons(times[k]))
                times_ms = (ms[k] for k in PATHS)
                rows.append(BinaryRow(channels, size, batch, t, macs, *times_ms, exact, odd))
    return rows


def _roofline(rows: list[BinaryRow], clock: tuple[float, str] | None) -> list[str]:
    """The per-core peaks at ``clock`` (GHz, where it comes from) and the share of them the
    1-thread core timings reach (median over layers)."""
    if not clock:
        return ["No clock known: the peaks are not computed."]
    ghz, source = clock
    p8, pb = 2 * INT8_MACS_PER_CYCLE * ghz, 2 * BINARY_MACS_PER_CYCLE * ghz
    one = [r for r in rows if r.threads == 1]
    f8 = statistics.median(r.gops(r.int8_core_ms) / p8 for r in one) if one else 0.0
    fb = statistics.median(r.gops(r.popcount_core_ms) / pb for r in one) if one else 0.0
    text = (
        f"At {ghz:.2f} GHz ({source}) the int8 VNNI peak is {INT8_MACS_PER_CYCLE} MAC/cycle = "
        f"{p8:.0f} GOP/s per core and the popcount peak {BINARY_MACS_PER_CYCLE} binary "
        f"MAC/cycle = {pb:.0f} GOP/s per core "
        f"({BINARY_MACS_PER_CYCLE // INT8_MACS_PER_CYCLE}x), both at the same clock. Measured "
        f"at 1 thread (median over layers): int8 core {f8:.0%} of its peak, popcount core "
        f"{fb:.0%} of its peak. The popcount peak assumes one xor + popcount + add of 512 bits "
        "per cycle; Zen 4 splits 512-bit ops into two 256-bit halves, so its real ceiling is "
        "lower."
    )
    if max(f8, fb) > 1:
        text += " A share above 100% means the core ran faster than this clock: the peak is low."
    return [text]


def to_markdown(
    rows: list[BinaryRow], env: dict | None = None, clock: tuple[float, str] | None = None
) -> str:
    """The section's Markdown: setup, the table, the roofline and the per-layer choice.
    ``clock``: (GHz, its source) for the peaks; :func:`peak_clock` when not given."""
    clock = clock or peak_clock()
    env = env or environment(max(r.threads for r in rows))
    lines = [
        "## Binary convolution: bit-packed popcount vs oneDNN int8 vs fp32",
        "",
        "`OMP_WAIT_POLICY=PASSIVE python -m compactnn.bench.binary` "
        f"({cpu_description()}; {env['machine']}; torch {env['torch']}; "
        f"OMP_WAIT_POLICY={omp_wait_policy() or 'unset'}; "
        f"GOMP_SPINCOUNT={spin_count() or 'unset'}; {env['date']}; "
        f"VPOPCNTDQ kernel: {bitconv.load_extension().has_vpopcnt()}).",
        "ReActNet-style 3x3 convolutions at ResNet-18 shapes (C in = C out, stride 1, pad 1), "
        "the same +-1 values on every path; medians of rotating rounds of blocks, each block "
        "about 50 ms of warm calls (at most 30). "
        "`popcount` and `int8` include turning float input into signs (bit packing / uint8 "
        "codes); `core` columns time the kernel alone. GOP/s count 2 ops per MAC.",
        "",
        "| layer | batch | threads | MMAC | fp32 ms | int8 ms | popcount ms | int8 core ms "
        "| popcount core ms | popcount / int8 | popcount / fp32 | int8 GOP/s | popcount GOP/s "
        "| exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = " | ".join(f"{getattr(r, k + '_ms'):.2f}{r.mark(k)}" for k in PATHS)
        lines.append(
            f"| {r.channels}ch {r.size}x{r.size} | {r.batch} | {r.threads} | {r.macs / 1e6:.0f} "
            f"| {ms} | {r.popcount_vs_int8:.2f}x | {r.popcount_vs_fp32:.2f}x "
            f"| {r.gops(r.int8_core_ms):.0f} | {r.gops(r.popcount_core_ms):.0f} | {r.exact} |"
        )
    suspects = [
        f"{r.channels}ch {r.size}x{r.size} b{r.batch}/t{r.threads} {why}"
        for r in rows
        for why in r.suspect
    ]
    if suspects:
        lines += [
            "",
            f"`{SUSPECT_MARK.strip()}`: the timing looked inflated (the TimingWarning's reasons; "
            "ratios built on it are suspect too): " + "; ".join(suspects) + ".",
        ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", f"Load average after the run: {load:.1f} on {os.cpu_count()} CPUs.", ""]
    lines += ["**Roofline (per core).**", *_roofline(rows, clock)]
    lines += ["", "**Choice per layer** (`lower_binary_blocks(kernel='auto')` measures the same):"]
    for channels, size in dict.fromkeys((r.channels, r.size) for r in rows):
        sel = [r for r in rows if (r.channels, r.size) == (channels, size)]
        wins = sum(r.popcount_vs_int8 > 1 for r in sel)
        best = "popcount" if wins * 2 > len(sel) else "int8"
        ratios = ", ".join(f"b{r.batch}/t{r.threads} {r.popcount_vs_int8:.2f}x" for r in sel)
        lines.append(f"- {channels}ch {size}x{size}: **{best}** (popcount / int8: {ratios})")
    return "\n".join(lines) + "\n"


def run(quick: bool = False) -> str:
    """The section's Markdown (``quick``: batch 1, 1 thread, 3 runs)."""
    if quick:
        rows = bench_binary(batches=(1,), threads=(1,), runs=3)
    else:
        rows = bench_binary()
    return to_markdown(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m compactnn.bench.binary", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    rows = bench_binary(batches=(1,), threads=(1,), runs=3) if args.quick else bench_binary()
    text = to_markdown(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    for r in rows:
        print(asdict(r))


if __name__ == "__main__":
    main()
