"""A tiny document model rendered both to Markdown and to self-contained HTML.

A document is a list of blocks: ``("h1", text)``, ``("h2", text)``, ``("p", text)``,
``("list", [items])``, ``("table", (header, rows[, caption[, row_headers]]))`` and
``("img", (alt, png_bytes, file))``. Text is plain (both renderers escape ``&``, ``<`` and
``>`` in it, so a user's recipe name or title is shown, never run); ``code`` spans in backticks
are kept in Markdown and become ``<code>`` in HTML. Text may be :class:`Spoken`: shown as
itself in Markdown, its words in HTML (what a screen reader says for a range or an empty cell).

In HTML a table has a caption (given, else the heading before it), its header cells are
``<th scope="col">`` and each row's first ``row_headers`` cells (default 1: the recipe or
layer name) ``<th scope="row">``; Markdown has no captions, so there it reads as before.
"""

from __future__ import annotations

import base64
import html
import re
from typing import Any

Block = tuple[str, Any]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
tbody th{background:none;font-weight:normal}caption{text-align:left;font-style:italic}
code{background:#f3f3f3;padding:0 3px;border-radius:3px}
img{max-width:100%}
"""


class Spoken(str):
    """Text shown as itself in Markdown and said as ``words`` in HTML: a range ``1.5-14``
    (a screen reader says "minus") as ``1.5 to 14``, an empty cell ``-`` (said as nothing)
    as why it is empty. Everywhere else it is the plain string ``text``.

    Example:
        >>> cell = Spoken("-", "not measured")
        >>> cell == "-", cell.words
        (True, 'not measured')
    """

    words: str

    def __new__(cls, text: str, words: str | None = None) -> Spoken:
        spoken = super().__new__(cls, text)
        spoken.words = text if words is None else words  # copy and pickle set it after
        return spoken


NOT_MEASURED = Spoken("-", "not measured")


def said(text: Any) -> str:
    """What HTML shows of ``text``: a :class:`Spoken`'s words, else the text itself."""
    return str(getattr(text, "words", text))


def _inline_html(text: Any) -> str:
    escaped = html.escape(said(text))
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _md_text(text: Any) -> str:
    """``text`` for Markdown: ``&``, ``<`` and ``>`` escaped, so a recipe name, a title or a
    layer name is shown, never run as HTML (``to_html`` escapes the same text). Code spans
    keep their backticks; an escaped character inside one shows as its entity.

    Example:
        >>> _md_text("w4 <img src=x> & `a`")
        'w4 &lt;img src=x&gt; &amp; `a`'
    """
    return html.escape(str(text), quote=False)


def _md_line(text: Any) -> str:
    """:func:`_md_text` on one line (a heading, a list item): a newline in a name would end
    the heading or start another block."""
    return _md_text(text).replace("\n", " ")


def _md_cell(text: Any) -> str:
    return _md_line(text).replace("|", "\\|")


def to_markdown(blocks: list[Block]) -> str:
    """Markdown of ``blocks``; images link to their file name. All text is escaped
    (:func:`_md_text`), as :func:`to_html` escapes it."""
    out: list[str] = []
    for kind, data in blocks:
        if kind == "h1":
            out.append(f"# {_md_line(data)}")
        elif kind == "h2":
            out.append(f"## {_md_line(data)}")
        elif kind == "h3":
            out.append(f"### {_md_line(data)}")
        elif kind == "p":
            out.append(_md_text(data))
        elif kind == "list":
            out.append("\n".join(f"- {_md_line(item)}" for item in data))
        elif kind == "table":
            header, rows = data[:2]
            lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            alt, _png, file = data
            out.append(f"![{_md_line(alt)}]({file})")
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return "\n\n".join(out) + "\n"


def _html_table(data: tuple, heading: str) -> str:
    """One ``("table", data)`` block as HTML: a caption (``data``'s third item, else
    ``heading``), column headers scoped to their columns, each row's first ``row_headers``
    (``data``'s fourth item, default 1) cells as row headers."""
    header, rows = data[:2]
    caption = data[2] if len(data) > 2 and data[2] else heading
    lead = data[3] if len(data) > 3 else 1
    head = "".join(f'<th scope="col">{_inline_html(h)}</th>' for h in header)
    trs = "".join(
        "<tr>"
        + "".join(
            f'<th scope="row">{_inline_html(c)}</th>' if i < lead else f"<td>{_inline_html(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    cap = f"<caption>{_inline_html(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>"


def to_html(blocks: list[Block], title: str) -> str:
    """A self-contained HTML page of ``blocks``; images are embedded as base64 data URIs."""
    body: list[str] = []
    heading = ""  # a table's caption unless it has its own
    for kind, data in blocks:
        if kind in ("h1", "h2", "h3"):
            heading = data
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{_inline_html(data)}</{kind}>")
        elif kind == "list":
            items = "".join(f"<li>{_inline_html(i)}</li>" for i in data)
            body.append(f"<ul>{items}</ul>")
        elif kind == "table":
            body.append(_html_table(data, heading))
        elif kind == "img":
            alt, png, _file = data
            b64 = base64.b64encode(png).decode("ascii")
            body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">')
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
