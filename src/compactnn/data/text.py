"""Real English text that ships with Python: the help topics of ``pydoc_data.topics``.

``corpus()`` is every topic's text, topics in sorted key order, joined by blank lines.

``sentences(split)`` extracts clean prose sentences from it:

* paragraphs are runs of non-blank lines, joined with spaces; headings (paragraphs with an
  underline such as ``*****``) are dropped, and a leading list marker (``*``, ``-``, ``1.``)
  is removed. Code and grammar blocks are left to the sentence filter below;
* a paragraph is cut into sentences after ``.``, ``!`` or ``?`` followed by a space and an
  upper-case letter, ``*`` or ``"``;
* a sentence is kept when it has 5 to 60 words, starts with an upper-case letter, ends with
  ``.``, holds no code markers (``::=``, ``>>>``, ``{``, ``}``, ``|``, ``=``) and is at
  least 70% letters and spaces; duplicates are dropped (first occurrence kept, in order);
* the split is fixed by content: a sentence whose SHA-256 (of its UTF-8 text) has a first
  byte below 64 (about a quarter) is ``"eval"``, every other one is ``"calib"``. The two
  splits are disjoint by construction and do not move when the corpus gains a topic.
"""

from __future__ import annotations

import functools
import hashlib
import re

from compactnn.errors import CompactnnError

SPLITS = ("calib", "eval")
MIN_WORDS, MAX_WORDS = 5, 60
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z*\"])")
_LIST_MARKER = re.compile(r"^(\*|-|\d+\.)\s+")
_CODE_MARKERS = ("::=", ">>>", "{", "}", "|", "=")
_UNDERLINE = re.compile(r"^\s*([*=\-^~#])\1{2,}\s*$")


@functools.cache
def corpus() -> str:
    """The whole text: every ``pydoc_data.topics`` topic, in sorted key order.

    Example:
        >>> "assert" in corpus()
        True
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def _paragraphs(text: str) -> list[str]:
    """Non-heading paragraphs, lines joined, list markers removed."""
    paragraphs, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip():
            current.append(line)
            continue
        kept = [ln.strip() for ln in current if not _UNDERLINE.match(ln)]
        if current and len(kept) == len(current):  # a paragraph with an underline is a heading
            paragraphs.append(_LIST_MARKER.sub("", " ".join(kept)))
        current = []
    return paragraphs


def _is_clean(sentence: str) -> bool:
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not sentence[0].isupper() or not sentence.endswith("."):
        return False
    if any(marker in sentence for marker in _CODE_MARKERS):
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in sentence)
    return letters >= 0.7 * len(sentence)


@functools.cache
def _all_sentences() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for paragraph in _paragraphs(corpus()):
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = " ".join(sentence.split())
            if _is_clean(sentence):
                seen.setdefault(sentence, None)
    return tuple(seen)


def split_of(sentence: str) -> str:
    """``"eval"`` or ``"calib"``: the fixed, content-based split a sentence belongs to."""
    return "eval" if hashlib.sha256(sentence.encode()).digest()[0] < 64 else "calib"


def sentences(split: str) -> list[str]:
    """Clean English sentences of one split, in corpus order.

    Args:
        split: ``"calib"`` (for calibration and training) or ``"eval"`` (held out).

    Example:
        >>> set(sentences("calib")).isdisjoint(sentences("eval"))
        True
    """
    if split not in SPLITS:
        raise CompactnnError(f"unknown sentence split {split!r}: use one of {SPLITS}.")
    return [s for s in _all_sentences() if split_of(s) == split]
