import dataclasses
from typing import ClassVar

import pytest

from compactnn.core.config import MethodConfig
from compactnn.errors import CompactnnError


def test_which_configs_need_or_use_calibration_data():
    """needs_data: the step cannot run without it (the CLI refuses before loading);
    uses_data: it reads it when given (--data data-free generates images only then)."""
    from compactnn.prune.dns import DNSConfig
    from compactnn.prune.gradual import GradualConfig
    from compactnn.prune.magnitude import MagnitudeConfig
    from compactnn.prune.nm import NMConfig
    from compactnn.quant.ffn import FFNConfig

    cases = {
        DNSConfig(): (True, True),
        DNSConfig(surgery_steps=0, finetune_steps=0): (False, False),
        GradualConfig(): (True, True),
        NMConfig(): (False, False),
        NMConfig(finetune_steps=10): (True, True),
        MagnitudeConfig(): (False, False),
        FFNConfig(): (False, True),  # the refit reads data when given, runs without
        FFNConfig(refit=False): (False, False),
    }
    for config, (needs, uses) in cases.items():
        assert (config.needs_data(), config.uses_data()) == (needs, uses), config


def test_a_renamed_field_under_both_names_is_refused():
    @dataclasses.dataclass(frozen=True)
    class RenamedConfig(MethodConfig):
        renamed_fields: ClassVar[dict[str, str]] = {"amount": "sparsity"}
        sparsity: float = 0.5

    assert RenamedConfig.from_dict({"amount": 0.3}).sparsity == 0.3  # the old name still loads
    for both in ({"amount": 0.3, "sparsity": 0.9}, {"sparsity": 0.9, "amount": 0.3}):
        with pytest.raises(CompactnnError, match="'amount' is the earlier name of 'sparsity'"):
            RenamedConfig.from_dict(both, where="steps[0].config")
