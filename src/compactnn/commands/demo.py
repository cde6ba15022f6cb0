"""``compactnn demo [--out DIR] [--force] [--quick] [--no-memory]``: the reference suite and
its report."""

from __future__ import annotations

import argparse

from compactnn.commands._common import thread_count
from compactnn.measure.timing import DEFAULT_THREADS


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="compress the reference models with the demo suite and write a report",
        description=(
            "Compress the reference models (mnist-cnn, minilm) with the demo suite, run each "
            "on its deployed form (integer kernels; 'simulated' where none applies), measure "
            "quality, size, latency against the fastest float path and the resident memory of "
            "each delivered model (a fresh process per row), and write report.md, "
            "report.html, pareto.png and results.json into --out."
        ),
    )
    p.add_argument("--out", "-o", default="out/demo", help="report directory (out/demo)")
    p.add_argument("--force", action="store_true", help="replace an existing report")
    p.add_argument("--quick", action="store_true", help="3 timed runs, no torch.compile")
    p.add_argument(
        "--threads", type=thread_count, default=DEFAULT_THREADS, help="torch threads (2)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the resident memory column (a fresh process per row, 5-20 s each)",
    )
    return p


def summary_lines(results: dict, width: int | None) -> list[str]:
    """The demo's summary for the terminal: the Markdown table, or, where it is wider than
    ``width`` (the terminal's; None: a pipe, never reflowed), one block of ``column: value``
    lines per row as ``eval`` and ``report`` print (:mod:`compactnn.commands.term_table`)."""
    from compactnn.commands.term_table import render
    from compactnn.report import summary_table
    from compactnn.report.writer import SUMMARY_HEADER, summary_rows

    table = summary_table(results).splitlines()
    if width is None or max(map(len, table)) <= width:
        return table
    return render(list(SUMMARY_HEADER), summary_rows(results), width)


def run(args: argparse.Namespace) -> int:
    from compactnn.commands.term_table import terminal_width
    from compactnn.demo import run_demo

    results = run_demo(
        args.out,
        force=args.force,
        quick=args.quick,
        threads=args.threads,
        progress=not args.no_progress,
        memory=not args.no_memory,
    )
    print("\n".join(summary_lines(results, terminal_width())))
    env = results["environment"]
    memory = env.get("memory_s")
    memory = f" ({memory:.0f} s of it resident memory)" if memory is not None else ""
    print(
        f"\n{env['threads']} threads, OMP_WAIT_POLICY={env.get('omp_wait_policy', 'unset')}, "
        f"load {env.get('load_avg', 'n/a')}; the demo took {env.get('demo_s', 0):.0f} s{memory}"
    )
    print(f"\nreport: {args.out}/report.html (also report.md, pareto.png, results.json)")
    return 0
