"""Block-by-block calibration on tiny random Llama, OPT, GPT-2 and BERT models."""

import warnings

import pytest
import torch

import compactnn
from compactnn.core.qlayers import QuantLinear
from compactnn.engines.sequential import find_blocks
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import ARCHS, outputs, tiny_model

warnings.filterwarnings("ignore", message="kept in float")


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_every_architecture_beats_rtn_and_round_trips(arch, tmp_path):
    model, calib = tiny_model(arch)
    ref = torch.cat([outputs(model, b) for b in calib[:2]])
    rtn = compactnn.compress(model, "w3-g32-mse", calib_data=calib, progress=False)
    gq = compactnn.compress(model, "w3-g32-gptq", calib_data=calib, progress=False)
    _, blocks = find_blocks(gq)
    inner = [m for m in blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert inner and all(isinstance(m, QuantLinear) for m in inner)  # GPT-2's Conv1D too
    out_g = torch.cat([outputs(gq, b) for b in calib[:2]])
    assert _rel_err(out_g, ref) < _rel_err(torch.cat([outputs(rtn, b) for b in calib[:2]]), ref)
    assert "hf" in gq._compactnn["extra"]
    compactnn.save(gq, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a")  # no float model: rebuilt from the HF config
    for b in calib[:2]:
        assert torch.equal(outputs(loaded, b), outputs(gq, b))
    assert torch.equal(outputs(model, calib[0]), ref[: len(calib[0]["input_ids"])])  # untouched


def test_peak_memory_is_reported():
    model, calib = tiny_model("llama")
    q = compactnn.compress(model, "w4-g32-gptq", calib_data=calib, progress=False)
    assert q._compactnn["measured"]["peak_rss_mib"]["GPTQConfig"] > 0
    assert q._compactnn["extra"]["calibration"]["GPTQConfig"]["blocks"] == 2


def test_bad_inputs_are_named():
    model, calib = tiny_model("llama")
    with pytest.raises(CompactnnError, match="calibration data"):
        compactnn.compress(model, "w4-g32-gptq", progress=False)
    with pytest.raises(CompactnnError, match="group_size=48 does not divide"):
        compactnn.compress(model, "w4-g48-gptq", calib_data=calib, progress=False)
    with pytest.raises(CompactnnError, match="repeated blocks"):
        compactnn.compress(torch.nn.Sequential(torch.nn.Linear(64, 64)), "w4-g32-gptq",
                           calib_data=torch.randn(8, 64), progress=False)  # fmt: skip
