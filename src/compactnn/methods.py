"""Imports every method file once, so each registers its handler. Add a method here."""

from compactnn.quant import rtn  # noqa: F401
