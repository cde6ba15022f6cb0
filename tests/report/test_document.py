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
