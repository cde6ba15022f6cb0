"""Reports: the demo report, and :func:`build_report` for any model's artifacts on the user's
labelled data. Markdown, self-contained HTML, a Pareto plot and the raw results."""

from compactnn.report.any_model import build_report, labelled_data
from compactnn.report.writer import summary_table, write_report

__all__ = ["build_report", "labelled_data", "summary_table", "write_report"]
