import pytest

from compactnn.data import text
from compactnn.errors import CompactnnError


def test_corpus_is_the_topics_in_sorted_order():
    from pydoc_data.topics import topics

    c = text.corpus()
    keys = sorted(topics)
    first, last = topics[keys[0]].strip(), topics[keys[-1]].strip()
    assert c.startswith(first) and c.endswith(last)
    assert len(c) > 100_000


def test_sentences_are_clean_disjoint_and_deduplicated():
    calib, evaluation = text.sentences("calib"), text.sentences("eval")
    assert len(calib) >= 128 and len(evaluation) >= 256
    assert set(calib).isdisjoint(evaluation)
    both = calib + evaluation
    assert len(set(both)) == len(both)
    flat = " ".join(text.corpus().split())  # whitespace normalised
    for s in both:
        assert 5 <= len(s.split()) <= 60
        assert s[0].isupper() and s.endswith(".")
        assert "::=" not in s and ">>>" not in s
        assert s in flat  # real text
        assert text.split_of(s) == ("eval" if s in evaluation else "calib")


def test_sentences_are_deterministic():
    first = text.sentences("eval")
    text._all_sentences.cache_clear()
    assert text.sentences("eval") == first


def test_paragraphs_drop_headings_and_list_markers():
    sample = "Title here\n**********\n\n* Item one is a sentence.\n\nPlain prose line\ncontinues."
    assert text._paragraphs(sample) == ["Item one is a sentence.", "Plain prose line continues."]


def test_unknown_split_is_refused():
    with pytest.raises(CompactnnError, match="train"):
        text.sentences("train")
