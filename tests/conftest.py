"""Fixtures of the whole test suite."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_search_cache(tmp_path_factory):
    """``compactnn search`` keeps sensitivity scores per user between runs
    (``commands/search_cache``): the suite keeps its own, so no score cached by an earlier
    run (or by the user) skips a measurement a test counts. Child processes inherit it."""
    before = os.environ.get("COMPACTNN_SEARCH_CACHE")
    os.environ["COMPACTNN_SEARCH_CACHE"] = str(tmp_path_factory.mktemp("search-cache"))
    yield
    if before is None:
        os.environ.pop("COMPACTNN_SEARCH_CACHE", None)
    else:
        os.environ["COMPACTNN_SEARCH_CACHE"] = before


@pytest.fixture(autouse=True)
def _no_terminal_width(monkeypatch):
    """Tables as a pipe gets them (aligned, ``commands/term_table.py``) whatever ``COLUMNS``
    the shell running the tests exports; a test of the narrow layout sets it itself."""
    monkeypatch.delenv("COLUMNS", raising=False)
