import copy
import io
import sys
import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.qlayers import QuantConv2d, QuantLinear
from compactnn.data import load_digits8
from compactnn.deployment import api as deploy_api
from compactnn.deployment import float_check
from compactnn.deployment.onednn import Int8Conv2d, Int8Linear
from compactnn.errors import CompactnnError
from tests.deployment.conftest import make_net


def steps(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Independent re-computation of the difference in steps of the output scale."""
    step = (ref.max() - ref.min()).item() / 255
    return (ref - out).abs().max().item() / step


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


class WithConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(2)  # (N, 8, H*W)
        return self.fc(self.seq(x).mean(-1))


def test_unsupported_layer_kept_in_float_with_a_warning_or_refused():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    qmodel = compactnn.compress(WithConv1d(), "w8a8", calib_data=x, progress=False)
    with pytest.warns(UserWarning, match=r"kept in float.*seq \(QuantConv1d"):
        deployed = compactnn.deploy(qmodel, "onednn", example=x)
    assert list(deployed.kept_float) == ["seq"]


def test_auto_warns_only_about_the_chosen_backends_kept_layers(monkeypatch):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    qmodel = compactnn.compress(WithConv1d(), "w8a8", calib_data=x, progress=False)
    times = {"onnxruntime": 1.0, "onednn": 2.0}  # the ONNX Runtime candidate keeps nothing
    monkeypatch.setattr(float_check, "time_contenders", lambda c, _x: {k: times[k] for k in c})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deployed = compactnn.deploy(qmodel, example=x, time_float=False)
    assert deployed.backend == "onnxruntime" and deployed.kept_float == {}
    assert not [w for w in caught if "kept in float" in str(w.message)]
    with torch.no_grad():
        assert steps(qmodel(x), deployed(x)) <= 1.0
    with pytest.raises(CompactnnError, match=r"ignore=\['seq'\]"):
        compactnn.deploy(qmodel, "onednn", example=x, unsupported="error")


def test_bad_inputs_fail_loudly(qnet):
    qmodel, calib = qnet
    with pytest.raises(CompactnnError, match="example="):
        compactnn.deploy(qmodel)
    with pytest.raises(CompactnnError, match="backend"):
        compactnn.deploy(qmodel, backend="tpu", example=calib[:2])
    with pytest.raises(CompactnnError, match="no quantized layers"):
        compactnn.deploy(make_net(), example=calib[:2])
    weight_only = compactnn.compress(make_net(), "w8", progress=False)
    with warnings.catch_warnings(), pytest.raises(CompactnnError, match="w8a8"):
        warnings.simplefilter("ignore")
        compactnn.deploy(weight_only, example=calib[:2])
    with pytest.raises(CompactnnError, match="FAILED"):
        compactnn.deploy(qmodel, example=calib[:4], tolerance=-1.0)


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


def test_example_is_keyword_only(qnet):
    qmodel, calib = qnet
    with pytest.raises(TypeError):
        compactnn.deploy(qmodel, "onednn", calib[:4])


def test_missing_onnxruntime_names_the_extra(qnet, monkeypatch):
    qmodel, calib = qnet
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(CompactnnError, match=r"pip install 'compactnn\[onnx\]'"):
        compactnn.deploy(qmodel, "onnxruntime", example=calib[:4])
    with pytest.warns(UserWarning, match=r"skipped backends: onnxruntime .*compactnn\[onnx\]"):
        deployed = compactnn.deploy(qmodel, example=calib[:4])  # auto: oneDNN only
    assert deployed.backend == "onednn" and set(deployed.selection) == {"onednn", "fp32-eager"}


class _Off(nn.Module):
    """A wrong 'integer' program: the simulation's output shifted by 100 output steps."""

    def __init__(self, sim: nn.Module) -> None:
        super().__init__()
        self.sim = sim

    def forward(self, x):
        return self.sim(x) + 100.0


def test_auto_keeps_the_backend_that_passes_verification(monkeypatch, qnet):
    qmodel, calib = qnet
    real_build = deploy_api._build

    def build(backend, sim, *args):
        if backend == "onnxruntime":  # make this candidate diverge
            return deploy_api.DeployedModel(_Off(copy.deepcopy(sim)), "onnxruntime", {})
        return real_build(backend, sim, *args)

    monkeypatch.setattr(deploy_api, "_build", build)
    with pytest.warns(UserWarning, match=r"failed verification: onnxruntime"):
        fast = compactnn.deploy(qmodel, example=calib[:8])
    assert fast.backend == "onednn" and fast.verification.passed
    assert "onnxruntime" not in fast.selection  # the failed candidate is not timed


def test_auto_raises_when_every_backend_diverges(monkeypatch, qnet):
    qmodel, calib = qnet
    monkeypatch.setattr(
        deploy_api,
        "_build",
        lambda backend, sim, *a: deploy_api.DeployedModel(_Off(copy.deepcopy(sim)), backend, {}),
    )
    with pytest.raises(CompactnnError, match="steps"):
        compactnn.deploy(qmodel, example=calib[:8])


def test_the_plain_artifact_writer_refuses_a_deployed_model(qnet, tmp_path):
    """compactnn.save routes a deployed model to save_deployed (tests/deployment/test_ship.py);
    the artifact writer underneath refuses it rather than write an empty artifact."""
    from compactnn import api

    qmodel, calib = qnet
    fast = compactnn.deploy(qmodel, "onednn", example=calib[:8])
    with pytest.raises(CompactnnError, match="save_deployed"):
        api.save(fast, tmp_path / "d")
    assert not (tmp_path / "d").exists()


SHIP_IT = r"compactnn\.save\(deployed, path\).*compactnn\.load\(path, model=\.\.\.\)"


def test_pickling_a_deployed_session_names_compactnn_save_and_deepcopy_still_works():
    """An ONNX Runtime model runs a session closure, which pickle cannot store."""
    weight = torch.tensor([[1.0, -2.0]])

    def session(x: torch.Tensor) -> torch.Tensor:  # a local function, like ort_callable's
        return x @ weight.T

    deployed = deploy_api.DeployedModel(session, "onnxruntime", {"fc": "kept"})
    with pytest.raises(CompactnnError, match=SHIP_IT):
        torch.save(deployed, io.BytesIO())
    twin = copy.deepcopy(deployed)
    x = torch.tensor([[3.0, 1.0]])
    assert twin is not deployed and twin.kept_float == {"fc": "kept"}
    assert twin.kept_float is not deployed.kept_float
    assert twin(x).item() == 1.0 == deployed(x).item()
    assert copy.copy(deployed)(x).item() == 1.0


@pytest.mark.parametrize("backend", ["onednn", "onnxruntime"])
def test_torch_save_of_a_deployed_model_names_compactnn_save(backend, qnet):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    qmodel, calib = qnet
    deployed = compactnn.deploy(qmodel, backend, example=calib[:4])
    with pytest.raises(CompactnnError, match=SHIP_IT):
        torch.save(deployed, io.BytesIO())
    if backend == "onnxruntime":  # copies as before (oneDNN's prepacked weights refuse)
        assert torch.equal(copy.deepcopy(deployed)(calib[:4]), deployed(calib[:4]))


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
    # stem.0 and dw.0 run before pw.0 and are within the tolerance: pw.0 is named first


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


def test_auto_says_when_float_is_faster(monkeypatch, qnet):
    qmodel, calib = qnet
    times = {"onednn": 0.004, "onnxruntime": 0.003, "fp32-onnxruntime": 0.001, "fp32-eager": 0.01}
    monkeypatch.setattr(
        float_check, "time_contenders", lambda contenders, ex: {k: times[k] for k in contenders}
    )
    with pytest.warns(UserWarning, match=r"ONNX Runtime fp32 runs this model 3\.0x faster"):
        fast = compactnn.deploy(qmodel, example=calib[:4])
    assert fast.backend == "onnxruntime" and fast.selection == times
    assert "1.00 ms against 3.00 ms" in fast.recommendation
    times.update({"fp32-onnxruntime": 0.0029, "fp32-eager": 0.01})  # within the 10% margin
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(TorchScript|removed).*")
        fast = compactnn.deploy(qmodel, example=calib[:4])
    assert fast.recommendation is None
    fast = compactnn.deploy(qmodel, example=calib[:4], time_float=False)
    assert set(fast.selection) == {"onednn", "onnxruntime"} and fast.recommendation is None


def test_float_model_is_the_simulation_without_quantizers(qnet):
    from compactnn.core.qlayers import ActQuantizer

    qmodel, calib = qnet
    fmodel = float_check.float_model(qmodel)
    assert not any(type(m).__name__.startswith("Quant") for m in fmodel.modules())
    off = copy.deepcopy(qmodel)  # the simulation's own forward with its quantizers off
    for m in off.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = False
    with torch.no_grad():
        assert torch.allclose(fmodel(calib[:4]), off(calib[:4]), atol=1e-6)
        assert not torch.allclose(fmodel(calib[:4]), qmodel(calib[:4]), atol=1e-6)


def test_export_onnx_of_an_onnxruntime_deployed_model(qnet, tmp_path):
    from compactnn.export.ort import ort_callable

    qmodel, calib = qnet
    fast = compactnn.deploy(qmodel, "onnxruntime", example=calib[:8])
    fast.export_onnx(tmp_path / "m.onnx")
    run = ort_callable((tmp_path / "m.onnx").read_bytes())
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(run(x), fast(x))
    with torch.no_grad():
        assert steps(qmodel(x), run(x)) <= 1.0
    (tmp_path / "mine.onnx").write_bytes(b"user's file")
    with pytest.raises(CompactnnError, match="force"):
        fast.export_onnx(tmp_path / "mine.onnx")  # an existing file only with force
    assert (tmp_path / "mine.onnx").read_bytes() == b"user's file"
    fast.export_onnx(tmp_path / "mine.onnx", force=True)
    assert (tmp_path / "mine.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    onednn = compactnn.deploy(qmodel, "onednn", example=calib[:8])
    with pytest.raises(CompactnnError, match=r"already deployed \(on onednn\).*deployed.source"):
        compactnn.deploy(onednn, "onnxruntime", example=calib[:8])
    with pytest.raises(CompactnnError, match="backend='onnxruntime'"):
        onednn.export_onnx(tmp_path / "n.onnx")
    assert not (tmp_path / "n.onnx").exists()


def test_weight_only_transformer_is_pointed_to_the_low_bit_kernels():
    from compactnn.models.tiny_hf import tiny_model

    model, calib = tiny_model("llama")
    q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    with pytest.raises(CompactnnError) as info:
        compactnn.deploy(q, example=calib[0])
    message = str(info.value)
    assert "compactnn.to_kernels(q)" in message and "compactnn.to_ort_nbits" in message
    assert "kernels=True" in message and "compactnn eval" in message
    assert "quantizes activations" not in message and len(message) < 500


def tiny_bert():
    """A random 2-layer BERT (hidden 32, vocab 100) and a batch of token ids."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=100, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertModel(config).eval(), {"input_ids": torch.randint(0, 100, (4, 8))}


@pytest.mark.filterwarnings("ignore:smoothquant")
@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-smoothquant"])
def test_w8a8_transformer_is_refused_before_tracing_and_pointed_to_the_kernels(recipe, monkeypatch):
    model, batch = tiny_bert()
    q = compactnn.compress(model, recipe, calib_data=[batch], progress=False)

    def never(*args, **kwargs):
        raise AssertionError("deploy traced the transformer")

    monkeypatch.setattr(deploy_api, "_build", never)
    monkeypatch.setattr(deploy_api, "call_model", never)
    for backend in ("auto", "onnxruntime"):
        with pytest.raises(CompactnnError) as info:
            compactnn.deploy(q, backend, example=batch)
        message = str(info.value)
        assert "BertModel" in message and "compactnn.to_kernels" in message
        assert "compactnn eval" in message and len(message) < 500
    # per-token (dynamic) activations run on to_kernels' int8 kernels; static ones do not
    assert ("run on int8 kernels" in message) == (recipe == "w8a8-smoothquant")
    assert ("'w8a8-smoothquant'" in message) == (recipe == "w8a8")


def test_a_weight_only_cnn_lists_a_few_layers_per_reason():
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(16, 16) for _ in range(12)]).eval()
    q = compactnn.compress(net, "w8", calib_data=torch.randn(4, 16), progress=False)
    with pytest.raises(
        CompactnnError, match=r"12 layers: its input is not quantized.*\(0, 1, 2, \.\.\.\)"
    ):
        compactnn.deploy(q, example=torch.randn(4, 16))


class TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ca, self.cb = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.relu(self.ca(a)), torch.relu(self.cb(b))], 1)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("backend", ["onednn", "onnxruntime"])
def test_a_two_input_model_deploys_and_verifies(backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    a, b = torch.rand(8, 1, 6, 6), torch.rand(8, 1, 6, 6)
    qmodel = compactnn.compress(TwoInputNet().eval(), "w8a8", calib_data=[(a, b)], progress=False)
    deployed = compactnn.deploy(qmodel, backend, example=(a[:4], b[:4]))
    assert deployed.verification.passed
    with torch.no_grad():
        assert steps(qmodel(a, b), deployed(a, b)) <= 1.0


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


@pytest.mark.parametrize("backend", ["onednn", "onnxruntime"])
def test_wrong_input_shapes_name_expected_and_got(backend, qnet):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    qmodel, calib = qnet  # (N, 3, 16, 16)
    deployed = compactnn.deploy(qmodel, backend, example=calib[:4])
    with pytest.raises(CompactnnError, match=r"shape \(4, 1, 16, 16\).*\(N, 3, 16, 16\)"):
        deployed(torch.randn(4, 1, 16, 16))
    with pytest.raises(CompactnnError, match=r"shape \(64,\).*rank 4"):
        deployed(torch.randn(64))
    other_size = torch.randn(2, 3, 8, 8)
    if backend == "onnxruntime":
        with pytest.raises(CompactnnError, match="only the size it was deployed with"):
            deployed(other_size)
    else:
        assert deployed(other_size).shape == (2, 10)
    assert deployed(calib[:7]).shape == (7, 10)  # any batch size
