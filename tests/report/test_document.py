"""Markdown and HTML rendering of report blocks."""

from __future__ import annotations

import base64

import pytest

from compactnn.report.document import to_html, to_markdown


def test_markdown_blocks():
    md = to_markdown(
        [
            ("h1", "T"),
            ("p", "text with `code`"),
            ("table", (["a", "b"], [["1", "x|y"]])),
            ("list", ["one", "two"]),
            ("img", ("alt", b"png", "p.png")),
        ]
    )
    assert md == (
        "# T\n\ntext with `code`\n\n| a | b |\n|---|---|\n| 1 | x\\|y |\n\n- one\n- two\n\n"
        "![alt](p.png)\n"
    )


def test_html_escapes_and_embeds():
    html = to_html([("p", "<b> & `x`"), ("img", ("alt", b"\x89PNG", "p.png"))], "title")
    assert "&lt;b&gt; &amp; <code>x</code>" in html
    encoded = base64.b64encode(b"\x89PNG").decode()
    assert f"data:image/png;base64,{encoded}" in html


def test_unknown_block_is_an_error():
    with pytest.raises(ValueError, match="unknown block"):
        to_markdown([("video", None)])


def test_html_tables_have_a_caption_column_scopes_and_row_headers():
    blocks = [("h2", "Layer formats"), ("table", (["layer", "w8"], [["fc", "int8"], ["c", "-"]]))]
    page = to_html(blocks, "t")
    # by hand: the caption defaults to the heading before the table
    assert "<table><caption>Layer formats</caption><thead><tr>" in page
    assert '<th scope="col">layer</th><th scope="col">w8</th>' in page
    assert '<tr><th scope="row">fc</th><td>int8</td></tr>' in page
    named = to_html([("table", (["model", "recipe", "x"], [["m", "r", "1"]], "Results", 2))], "t")
    assert "<caption>Results</caption>" in named
    assert '<tr><th scope="row">m</th><th scope="row">r</th><td>1</td></tr>' in named
    # Markdown has no caption: the table reads as before
    assert to_markdown(blocks[1:]) == "| layer | w8 |\n|---|---|\n| fc | int8 |\n| c | - |\n"


def test_spoken_text_is_shown_in_markdown_and_said_in_words_in_html():
    from compactnn.report.document import Spoken

    cell = Spoken("1.63 ms (1.52-14.04)", "1.63 ms (1.52 to 14.04)")
    empty = Spoken("-", "not measured")
    assert cell == "1.63 ms (1.52-14.04)" and empty == "-"  # a plain str everywhere else
    blocks = [("table", (["row", "latency", "memory"], [["a", cell, empty]]))]
    assert "| a | 1.63 ms (1.52-14.04) | - |" in to_markdown(blocks)
    page = to_html(blocks, "t")
    assert "<td>1.63 ms (1.52 to 14.04)</td><td>not measured</td>" in page
    assert "<td>-</td>" not in page
    import copy
    import pickle

    for twin in (copy.deepcopy(empty), pickle.loads(pickle.dumps(empty))):
        assert twin == "-" and twin.words == "not measured"
