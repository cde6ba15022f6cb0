"""The command line drops torch's two ``W... torch/utils/_pytree.py`` lines about torchao's
Enum classes (printed by every command that imports transformers, which imports torchao),
and nothing else torch logs there."""

from __future__ import annotations

import enum
import logging
import subprocess
import sys

import pytest

from compactnn.cli import quiet_torchao_notice

NOTICE = "register_constant() on Enum subclasses is deprecated"
_IMPORT = "import transformers.modeling_utils"  # imports transformers.quantizers -> torchao


def _stderr(code: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return run.stderr


def test_importing_transformers_under_the_cli_prints_no_torchao_notice():
    pytest.importorskip("torchao")
    pytest.importorskip("transformers")
    before = _stderr(_IMPORT)
    if NOTICE not in before:
        pytest.skip("this torch / torchao pair prints no notice")
    assert "KernelPreference" in before  # the premise: the two lines a command printed
    after = _stderr(
        f"from compactnn.cli import quiet_torchao_notice\nquiet_torchao_notice()\n{_IMPORT}"
    )
    assert NOTICE not in after and "_pytree" not in after, after


def test_only_torchaos_enum_notice_is_dropped(caplog):
    quiet_torchao_notice()
    quiet_torchao_notice()  # installed once
    logger = logging.getLogger("torch.utils._pytree")
    assert sum(type(f).__name__ == "_TorchaoEnumNotice" for f in logger.filters) == 1
    fmt = "%s is an Enum subclass ... Calling register_constant() on Enum subclasses is deprecated"
    torchao_enum = enum.Enum("KernelPreference", "AUTO")
    torchao_enum.__module__ = "torchao.quantization.quantize_.common"
    other_enum = enum.Enum("Mine", "A")  # someone else's: still said
    with caplog.at_level(logging.WARNING, logger="torch.utils._pytree"):
        logger.warning(fmt, torchao_enum)
        logger.warning(fmt, other_enum)
        logger.warning("something else about %s", torchao_enum)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "Mine" in said[0] and said[1].startswith("something else")
