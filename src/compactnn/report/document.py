"""A tiny document model rendered both to Markdown and to self-contained HTML.

A document is a list of blocks: ``("h1", text)``, ``("h2", text)``, ``("p", text)``,
``("list", [items])``, ``("table", (header, rows))`` and ``("img", (alt, png_bytes, file))``.
Text is plain (both renderers escape ``&``, ``<`` and ``>`` in it, so a user's recipe name or
title is shown, never run); ``code`` spans in backticks are kept in Markdown and become
``<code>`` in HTML.
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
code{background:#f3f3f3;padding:0 3px;border-radius:3px}
img{max-width:100%}
"""


def _inline_html(text: str) -> str:
    escaped = html.escape(str(text))
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
            header, rows = data
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


def to_html(blocks: list[Block], title: str) -> str:
    """A self-contained HTML page of ``blocks``; images are embedded as base64 data URIs."""
    body: list[str] = []
    for kind, data in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{_inline_html(data)}</{kind}>")
        elif kind == "list":
            items = "".join(f"<li>{_inline_html(i)}</li>" for i in data)
            body.append(f"<ul>{items}</ul>")
        elif kind == "table":
            header, rows = data
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in header)
            trs = "".join(
                "<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>"
                for row in rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
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
