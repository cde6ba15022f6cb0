"""The entry points' OpenMP policy (``measure/reexec.py``): set it, or re-execute once with it,
adding the spin only below the CPU count."""

import pytest

from compactnn.measure import reexec, timing


@pytest.mark.parametrize(
    ("environ", "loaded", "action"),
    [
        ({}, False, "set"),  # OpenMP not loaded yet: it will read the variable
        ({}, True, "reexec"),  # libgomp read it at load: only a new process gets it
        ({"OMP_WAIT_POLICY": "ACTIVE"}, True, "keep"),  # the user's choice wins
        ({reexec.REEXEC_MARK: "1"}, True, "keep"),  # never re-execute twice
        # the user's bare PASSIVE is theirs: no spin added (it inflated timings under load)
        ({"OMP_WAIT_POLICY": "passive"}, True, "keep"),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, False, "keep"),
        ({"GOMP_SPINCOUNT": "0"}, True, "reexec"),  # a spin alone: the policy is still set
    ],
)
def test_passive_policy_action(environ, loaded, action):
    assert reexec.passive_policy_action(environ, loaded) == action


@pytest.mark.parametrize(
    ("environ", "load", "cpus", "spin"),
    [
        ({}, 0.8, 2, timing.PASSIVE_SPINCOUNT),  # idle: the spin helps a small model
        ({}, 1.99, 2, timing.PASSIVE_SPINCOUNT),
        ({}, 2.0, 2, None),  # at or past the CPU count: the spin inflated eager 10-100x
        ({}, 8.5, 2, None),
        ({}, 8.5, 16, timing.PASSIVE_SPINCOUNT),  # a big machine is not busy at load 8.5
        ({}, None, 2, None),  # load unknown: the safe side
        ({"GOMP_SPINCOUNT": "0"}, 0.5, 2, None),  # the user's own spin count is kept
    ],
)
def test_passive_policy_env_adds_the_spin_only_below_the_cpu_count(environ, load, cpus, spin):
    env = reexec.passive_policy_env(environ, load, cpus)
    assert env.pop("OMP_WAIT_POLICY") == "PASSIVE"
    assert env == ({} if spin is None else {"GOMP_SPINCOUNT": spin})


def test_ensure_passive_policy_sets_what_the_load_allows(monkeypatch):
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", reexec.REEXEC_MARK):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(reexec, "load_average", lambda: 9.0)
    monkeypatch.setattr(reexec.os, "cpu_count", lambda: 2)
    reexec.ensure_passive_policy("m", [], openmp_loaded=False)  # "set": no re-execution
    assert timing.omp_wait_policy() == "PASSIVE" and timing.spin_count() == ""
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(reexec, "load_average", lambda: 0.5)
    reexec.ensure_passive_policy("m", [], openmp_loaded=False)
    assert timing.spin_count() == timing.PASSIVE_SPINCOUNT
