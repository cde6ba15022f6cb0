"""``compactnn demo``'s terminal summary fits a narrow terminal as eval's and report's do."""

from compactnn.commands.demo import summary_lines
from compactnn.report import summary_table
from tests.report.test_writer import synthetic


def test_a_pipe_and_a_wide_terminal_get_the_markdown_table():
    results = synthetic()
    table = summary_table(results).splitlines()
    assert summary_lines(results, None) == table
    assert summary_lines(results, max(map(len, table))) == table


def test_a_narrow_terminal_gets_blocks_that_fit_with_every_row():
    results = synthetic()
    lines = summary_lines(results, 60)
    assert lines and all(len(line) <= 60 for line in lines)
    text = "\n".join(lines)
    for row in results["rows"]:
        assert row["recipe"] in text
    assert "recipe: " in text
