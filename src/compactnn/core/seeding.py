"""Seeding that leaves the caller's random number generators as they were.

A library call that runs ``torch.manual_seed(seed)`` on the process-wide generator resets
the stream of whoever called it: their shuffles, dropout masks and initialisations then
change with whether compactnn ran. The entry points here seed torch's global generators
for their own work and put the caller's states back when they return or raise:

- :func:`seeded_rng`: a ``with`` block run from ``seed``;
- :func:`keeps_global_rng`: a decorator for a function that calls :func:`reseed` part way.

The CPU generator is always saved and seeded; CUDA's only once CUDA is initialised.
``torch.manual_seed`` queues a CUDA seed when CUDA is not initialised yet, which would
then replace the caller's own queued seed at initialisation: :func:`reseed` does not.

Example:
    >>> _ = torch.manual_seed(123); before = torch.get_rng_state()
    >>> with seeded_rng(0):
    ...     a = torch.rand(2)
    >>> with seeded_rng(0):
    ...     b = torch.rand(2)
    >>> torch.equal(a, b), torch.equal(torch.get_rng_state(), before)
    (True, True)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

_F = TypeVar("_F", bound=Callable[..., Any])


def reseed(seed: int) -> None:
    """Seed torch's CPU generator (and CUDA's, once initialised) with ``seed``: the
    CPU stream is the one ``torch.manual_seed(seed)`` gives."""
    torch.default_generator.manual_seed(int(seed))
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def forked_rng() -> Iterator[None]:
    """Run the block, then put torch's global generator states (CPU, and CUDA if
    initialised when the block started) back as they were, even when it raises."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's global generators seeded from ``seed``; the caller's
    states come back afterwards (:func:`forked_rng`)."""
    with forked_rng():
        reseed(seed)
        yield


def keeps_global_rng(fn: _F) -> _F:
    """``fn`` run inside :func:`forked_rng`: whatever it seeds or draws, its caller's
    global generator states are the same after the call as before."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with forked_rng():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
