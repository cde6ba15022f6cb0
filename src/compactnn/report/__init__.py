"""The demo report: Markdown, self-contained HTML, a Pareto plot and the raw results."""

from compactnn.report.writer import summary_table, write_report

__all__ = ["summary_table", "write_report"]
