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

``lm_text(split)`` is the raw text for language modelling, split by paragraph:

* each topic is cut at blank lines into paragraphs (code, grammar and headings included,
  trailing spaces removed); duplicates are dropped, first occurrence kept (many topics
  repeat whole sections of others);
* a paragraph whose SHA-256 has a first byte below 32 (about an eighth) is ``"eval"``, every
  other one is ``"train"``: disjoint by construction, and a repeated paragraph can never sit
  on both sides. Each split is its paragraphs, in corpus order, joined by blank lines.
"""

from __future__ import annotations

import functools
import hashlib
import re

from compactnn.errors import CompactnnError

SPLITS = ("calib", "eval")
LM_SPLITS = ("train", "eval")
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


@functools.cache
def lm_paragraphs() -> tuple[str, ...]:
    """Every distinct paragraph of the corpus, in corpus order (blank-line separated)."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        for paragraph in re.split(r"\n[ \t]*\n", topics[key].strip()):
            paragraph = "\n".join(line.rstrip() for line in paragraph.strip("\n").splitlines())
            if paragraph.strip():
                seen.setdefault(paragraph, None)
    return tuple(seen)


def lm_split_of(paragraph: str) -> str:
    """``"eval"`` or ``"train"``: the fixed, content-based split a paragraph belongs to."""
    return "eval" if hashlib.sha256(paragraph.encode()).digest()[0] < 32 else "train"


def lm_text(split: str) -> str:
    """The language-modelling text of one split: its paragraphs joined by blank lines.

    Args:
        split: ``"train"`` (training and calibration) or ``"eval"`` (held out).

    Example:
        >>> len(lm_text("eval")) < len(lm_text("train"))
        True
    """
    if split not in LM_SPLITS:
        raise CompactnnError(f"unknown language-modelling split {split!r}: use one of {LM_SPLITS}.")
    return "\n\n".join(p for p in lm_paragraphs() if lm_split_of(p) == split)
