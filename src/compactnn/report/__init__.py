"""Reports: the demo report, and :func:`build_report` for any model's artifacts on the user's
data (labelled: top-1; inputs alone: perplexity of a causal LM, else output cosine).
Markdown, self-contained HTML, a Pareto plot and the raw results.

The names below load on first use, so :mod:`compactnn.report.delivery` (used by
``compactnn eval``) imports without matplotlib, which only the plot needs.
"""

from typing import Any

from compactnn._submodules import submodule

_LAZY = {
    "build_report": "compactnn.report.any_model",
    "labelled_data": "compactnn.report.any_model",
    "summary_table": "compactnn.report.writer",
    "write_report": "compactnn.report.writer",
}
__all__ = ["build_report", "labelled_data", "summary_table", "write_report"]


def __getattr__(name: str) -> Any:
    """The names above, and ``compactnn.report.<module>``, each imported on first use."""
    if name not in _LAZY:
        return submodule(__name__, name)
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
