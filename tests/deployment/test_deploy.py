"""compactnn.deploy's int8 programs against the simulation: outputs within a step, the
same codes on the kernels, a hand-computed conv, verification naming the diverging layer,
residual, multi-input and dict-input models."""

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.qlayers import QuantConv2d, QuantLinear
from compactnn.data import load_digits8
from compactnn.deployment import api as deploy_api
from compactnn.deployment.onednn import Int8Conv2d, Int8Linear
from compactnn.errors import CompactnnError
from tests.deployment.conftest import make_net, steps


@pytest.mark.parametrize(
    ("backend", "residual"), [("onednn", "exact"), ("onednn", "fast"), ("onnxruntime", "exact")]
)
def test_matches_simulation_within_one_step_on_fresh_inputs(qnet, backend, residual):
    qmodel, calib = qnet
    deployed = compactnn.deploy(qmodel, backend, example=calib[:8], residual=residual)
    assert deployed.backend == backend and deployed.verification.max_diff_steps <= 1.0
    x = torch.randn(16, 3, 16, 16) * 1.5  # not the example: a check the deploy did not see
    with torch.no_grad():
        ref, out = qmodel(x), deployed(x)
    assert steps(ref, out) <= 1.0
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.9


def test_real_digit_images():
    split = load_digits8()
    x = torch.nn.functional.interpolate(split.x_train[:64].float(), size=16)
    qmodel = compactnn.compress(make_net(in_ch=1), "w8a8", calib_data=x, progress=False)
    deployed = compactnn.deploy(qmodel, example=x[:16])  # auto: times both backends
    ints = {k: v for k, v in deployed.selection.items() if k in ("onednn", "onnxruntime")}
    assert set(ints) == {"onednn", "onnxruntime"}  # both int8 candidates timed ...
    assert {"fp32-eager", "fp32-onnxruntime"} <= set(deployed.selection)  # ... beside float
    assert deployed.backend == min(ints, key=ints.get)
    test = torch.nn.functional.interpolate(split.x_test[:64].float(), size=16)
    with torch.no_grad():
        assert steps(qmodel(test), deployed(test)) <= 1.0


def test_every_layer_runs_on_int8_kernels_with_the_same_codes(qnet):
    qmodel, calib = qnet
    deployed = compactnn.deploy(qmodel, "onednn", example=calib[:4])
    int8 = [m for m in deployed.program.modules() if isinstance(m, (Int8Conv2d, Int8Linear))]
    qlayers = [m for m in qmodel.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(int8) == len(qlayers) == 6 and not deployed.kept_float
    codes = sorted(tuple(q.weight_codes.flatten().tolist()) for q in qlayers)
    assert codes == sorted(tuple(m.w_int8.flatten().tolist()) for m in int8)
    # the residual add and its ReLU are fused into the pointwise conv's kernel
    assert sum(getattr(m, "accum", None) is not None for m in int8) == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.program.modules())


def test_int8_conv_against_hand_formula():
    torch.manual_seed(0)
    qmodel = compactnn.compress(
        nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)),
        "w8a8", calib_data=torch.randn(8, 4, 9, 9), progress=False,
    )  # fmt: skip
    layer = qmodel[0]
    scale, zero = float(layer.input_quantizer.scale), int(layer.input_quantizer.zero)
    x = torch.randn(2, 4, 9, 9)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    w = layer.weight_codes.float() * layer.weight_scale.reshape(-1, 1, 1, 1)
    ref = nn.functional.conv2d((q - zero) * scale, w, layer.bias, stride=2, padding=1, groups=2)
    out = Int8Conv2d(layer, None)(q.to(torch.uint8).contiguous(memory_format=torch.channels_last))
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_weights_packed_per_input_shape_give_the_same_results():
    from compactnn.deployment.onednn import PACKED_SHAPES

    torch.manual_seed(0)
    qmodel = compactnn.compress(
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)), "w8a8",
        calib_data=torch.randn(8, 16, 10, 10), progress=False,
    )  # fmt: skip
    conv = Int8Conv2d(qmodel[0], None)
    q = torch.randint(0, 256, (8, 16, 10, 10), dtype=torch.uint8)
    q = q.contiguous(memory_format=torch.channels_last)
    whole = conv(q)
    for n in (1, 3, 5, 2, 8):  # more shapes than are kept: the oldest layouts are dropped
        assert torch.equal(conv(q[:n].contiguous(memory_format=torch.channels_last)), whole[:n])
    assert len(conv._packed_for) == PACKED_SHAPES


def _lower_with_bad_bias(layer: str, shift: float):
    """``lower`` that shifts the bias of the lowered module of ``layer`` (a lowering bug)."""
    real = deploy_api.lower

    def lower(plan):
        gm = real(plan)
        hint = "_" + layer.replace(".", "_")
        [mod] = [m for n, m in gm.named_children() if n.startswith("int8_") and n.endswith(hint)]
        with torch.no_grad():
            mod.bias += shift
        return gm

    return lower


def test_failed_verification_names_the_diverging_layer(monkeypatch, qnet):
    qmodel, calib = qnet
    monkeypatch.setattr(deploy_api, "lower", _lower_with_bad_bias("pw.0", 0.5))
    with pytest.raises(CompactnnError) as err:
        compactnn.deploy(qmodel, "onednn", example=calib[:8])
    msg = str(err.value)
    assert "first layer past the tolerance: pw.0" in msg and "likely 'pw.0'" in msg
    # the simulation hardly moves under a 1e-6 nudge: a kernel error, not the network's
    assert "the simulated model itself moves" in msg and "amplifies" not in msg


def test_layer_steps_against_an_independent_computation(qnet):
    """Shift one layer's bias by a known amount: its gap is that shift in its own steps."""
    qmodel, calib = qnet
    fast = compactnn.deploy(qmodel, "onednn", example=calib[:8])
    assert fast.verify(calib[:8]).passed and fast.verify(calib[:8]).layers == ()
    gaps = {g.name: g for g in deploy_api.localize(fast, calib[:8])}
    assert set(gaps) == {"stem.0", "dw.0", "pw.0", "branch_a", "branch_b", "fc"}
    assert all(g.steps <= 1.0 for g in gaps.values())  # a healthy lowering: within a step
    fc = next(m for m in fast.program.modules() if isinstance(m, Int8Linear))
    with torch.no_grad():
        fc.bias += 0.25
    with torch.no_grad():
        ref = qmodel(calib[:8])
    step = float(ref.max() - ref.min()) / 255  # fc writes float: steps of its output's range
    result = fast.verify(calib[:8])
    assert not result.passed and result.first_past_tolerance == "fc"
    assert result.sensitivity is not None and result.sensitivity < 1 and not result.amplified
    worst = result.layers[0]
    assert worst.name == "fc" and worst.form == "float"
    assert worst.steps == pytest.approx(0.25 / step, rel=0.02)


class TinyResNet(nn.Module):
    """Two residual blocks, the second with a strided 1x1 shortcut (ResNet's structure)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a2(self.a1(x)))
        x = torch.relu(self.down(x) + self.b2(self.b1(x)))
        return self.fc(x.mean((2, 3)))


def test_auto_returns_a_verified_model_on_every_call():
    torch.manual_seed(0)
    net = TinyResNet().train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 16, 16))
    calib = torch.randn(32, 3, 16, 16)
    qmodel = compactnn.compress(net.eval(), "w8a8", calib_data=calib, progress=False)
    with torch.no_grad():
        ref = qmodel(calib[:8])
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # float-faster advice on a model this small
            fast = compactnn.deploy(qmodel, example=calib[:8])
        assert fast.verification.passed and fast.backend in ("onednn", "onnxruntime")
        with torch.no_grad():
            assert steps(ref, fast(calib[:8])) <= 1.0  # checked here too, not only by deploy


class TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ca, self.cb = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.relu(self.ca(a)), torch.relu(self.cb(b))], 1)
        return self.fc(x.flatten(1))


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 36 + 2, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        x = torch.relu(self.conv(batch["image"])).flatten(1)
        return self.fc(torch.cat([x, batch["meta"]], 1))


def test_a_dict_passed_as_one_argument_deploys_on_onednn_and_onnxruntime_says_why_not():
    torch.manual_seed(0)
    batch = {"image": torch.rand(8, 1, 6, 6), "meta": torch.rand(8, 2)}
    qmodel = compactnn.compress(DictInput().eval(), "w8a8", calib_data=[(batch,)], progress=False)
    assert compactnn.deploy(qmodel, "onednn", example=(batch,)).verification.passed
    with pytest.raises(CompactnnError, match=r"ONNX Runtime takes tensors.*backend='onednn'"):
        compactnn.deploy(qmodel, "onnxruntime", example=(batch,))


def _two_input_deployment(backend: str, example_form: str):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    a, b = torch.rand(8, 1, 6, 6), torch.rand(8, 1, 6, 6)
    qmodel = compactnn.compress(TwoInputNet().eval(), "w8a8", calib_data=[(a, b)], progress=False)
    example = (a[:4], b[:4]) if example_form == "tuple" else {"b": b[:4], "a": a[:4]}
    return qmodel, compactnn.deploy(qmodel, backend, example=example), a, b


@pytest.mark.parametrize("backend", ["onednn", "onnxruntime"])
def test_a_two_input_model_deploys_and_verifies(backend):
    qmodel, deployed, a, b = _two_input_deployment(backend, "tuple")
    assert deployed.verification.passed
    with torch.no_grad():
        assert steps(qmodel(a, b), deployed(a, b)) <= 1.0


@pytest.mark.parametrize("backend", ["onednn", "onnxruntime"])
def test_a_dict_example_maps_to_forwards_parameters(backend):
    qmodel, deployed, a, b = _two_input_deployment(backend, "dict")  # keys in any order
    assert deployed.verification.passed
    with torch.no_grad():
        ref = qmodel(a, b)
        assert steps(ref, deployed(a=a, b=b)) <= 1.0
        assert torch.equal(deployed(b=b, a=a), deployed(a, b))
        assert torch.equal(deployed(a, b=b), deployed(a, b))
    with pytest.raises(CompactnnError, match=r"input 1 has shape \(8, 2, 6, 6\)"):
        deployed(a, torch.rand(8, 2, 6, 6))  # checked by position as by name
    with pytest.raises(CompactnnError, match=r"missing a required argument: 'b'.*forward\(a: "):
        deployed(a=a, c=b)


class KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, a: torch.Tensor, *, b: torch.Tensor) -> torch.Tensor:
        return self.fa(a) + torch.relu(self.fb(b))


def test_a_keyword_only_input_deploys_on_onednn_and_onnxruntime_asks_for_a_tuple():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    example = {"a": a, "b": b}
    qmodel = compactnn.compress(KeywordOnly().eval(), "w8a8", calib_data=[example], progress=False)
    deployed = compactnn.deploy(qmodel, "onednn", example=example)
    with torch.no_grad():
        assert steps(qmodel(a, b=b), deployed(a, b=b)) <= 1.0
    with pytest.raises(CompactnnError, match=r"ONNX Runtime feeds its inputs by position.*tuple"):
        compactnn.deploy(qmodel, "onnxruntime", example=example)
