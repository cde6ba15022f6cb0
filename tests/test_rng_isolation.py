"""Library calls seed torch for their own work only: a user who seeds an experiment, calls
compactnn, then draws random numbers gets the stream they seeded (the caller's generator
state after each call is exactly what it was before), and each call still gives the same
result for the same seed."""

import pytest
import torch
from torch import nn

import compactnn
from compactnn.datafree.dafl import sample, train_dafl
from compactnn.datafree.pu import pu_distill, select_in_distribution
from compactnn.models import lazy, tiny_lm
from compactnn.training.wrap import prepare_qat


class _Net(nn.Module):
    """conv -> BN -> ReLU, global pool, linear head: input (N, 1, 8, 8), 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _inputs():
    gen = torch.Generator().manual_seed(1)
    with torch.random.fork_rng(devices=[]):  # the test's own module draws nothing either
        net = _Net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    x = torch.randn(32, 1, 8, 8, generator=gen)
    return net.eval(), x, torch.randint(0, 3, (32,), generator=gen)


def _student():
    net, _, _ = _inputs()
    return net.train()


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items() if torch.is_tensor(v)}


def _tiny_lm():
    arch = tiny_lm.TinyLMConfig(
        hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, context=16, vocab_size=320
    )
    fit = tiny_lm.LMFitConfig(steps=1, batch_size=2, warmup=1)
    ref = tiny_lm.build_tiny_lm(
        progress=False, arch=arch, fit=fit, n_calib=2, calib_batch=2, n_eval=2, seed=3
    )
    return _state(ref.model)


def _tiny_hf():
    pytest.importorskip("transformers")
    from compactnn.models.tiny_hf import tiny_model

    model, batches = tiny_model("llama", seed=3)
    return _state(model), batches


def _dafl_sample():
    net, _, _ = _inputs()
    gen, _, _ = train_dafl(net, None, input_shape=(1, 8, 8), steps=1, batch_size=4, seed=3)
    return sample(gen, net, 4, seed=3).x


def _call(name: str):
    net, x, y = _inputs()
    kw = {"seed": 3, "progress": False}
    if name == "compress":
        return _state(compactnn.compress(net, "w4a8", x, **kw))
    if name == "prepare_qat":
        return _state(prepare_qat(net, "w4a4-lsq", x, **kw))
    if name == "train":
        return _state(compactnn.train(net, "w4a4-pact", (x, y), epochs=1, **kw))
    if name == "select_in_distribution":
        return select_in_distribution(net, x[:8], x, prior=0.5, epochs=2, **kw)
    if name == "pu_distill":
        return _state(pu_distill(_student(), net, x, epochs=1, batch_size=16, **kw)[0])
    if name == "train_dafl":
        out = train_dafl(net, _student(), input_shape=(1, 8, 8), steps=2, batch_size=4, **kw)
        return [_state(out[0]), _state(out[1])]
    if name == "dafl_sample":
        return _dafl_sample()
    if name == "tiny_model":
        return _tiny_hf()
    if name == "lazy_seeded":
        return _state(lazy.seeded(lambda: nn.Linear(4, 3), 3))
    assert name == "build_tiny_lm"
    return _tiny_lm()


ENTRY_POINTS = [
    "compress",
    "prepare_qat",
    "train",
    "select_in_distribution",
    "pu_distill",
    "train_dafl",
    "dafl_sample",
    "tiny_model",
    "lazy_seeded",
    "build_tiny_lm",
]


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(p, q) for p, q in zip(a, b, strict=True))
    return a == b


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACTNN_CACHE", str(tmp_path))  # build_tiny_lm trains, not loads
    torch.set_num_threads(1)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_call_keeps_the_callers_rng_and_its_own_determinism(name, monkeypatch):
    queued = []  # torch.manual_seed queues a CUDA seed that would replace the caller's
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", queued.append)
    torch.manual_seed(123)
    queued.clear()  # the caller's own seed
    before = torch.get_rng_state()
    first = _call(name)
    assert torch.equal(torch.get_rng_state(), before), f"{name} changed the caller's RNG"
    if name != "train":  # train seeds CUDA for a run that may start it (cross-file note)
        assert queued == [], f"{name} queued a CUDA seed"
    torch.manual_seed(999)  # another caller state: the same seed gives the same result
    assert _equal(_call(name), first)
