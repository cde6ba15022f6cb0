import pytest
import torch

from compactnn.core.seeding import forked_rng, keeps_global_rng, reseed, seeded_rng


def test_seeded_rng_draws_from_the_seed_and_gives_the_caller_its_state_back():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with seeded_rng(7):
        got = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)  # the stream torch.manual_seed(7) gives, unchanged
    assert torch.equal(got, torch.rand(5))


def test_forked_rng_restores_the_state_when_the_block_raises():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError), forked_rng():
        reseed(0)
        torch.rand(3)
        raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), before)


def test_keeps_global_rng_decorator():
    @keeps_global_rng
    def draw(seed: int) -> torch.Tensor:
        """Doc kept."""
        reseed(seed)
        return torch.randn(4)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = draw(1), draw(1)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), before)
    assert draw.__doc__ == "Doc kept."


def test_reseed_queues_no_cuda_seed_while_cuda_is_not_initialised(monkeypatch):
    # torch.manual_seed would queue a CUDA seed that replaces the caller's at CUDA's start
    calls = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", calls.append)
    with seeded_rng(5):
        pass
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    reseed(5)  # an initialised CUDA is seeded as torch.manual_seed would
    assert calls == [5]
