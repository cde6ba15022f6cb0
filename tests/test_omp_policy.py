"""The entry points' OpenMP policy (``omp_policy.py``): set it, or re-execute once with it,
adding the spin only below the CPU count; ``import compactnn`` loads no OpenMP, so the
``compactnn`` command sets the policy in its own process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compactnn import omp_policy as reexec
from compactnn.measure import timing


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


def test_this_test_process_has_openmp_loaded():
    assert reexec.openmp_runtime_loaded()  # torch is imported here, with its libgomp


def test_importing_the_package_and_the_cli_loads_no_openmp():
    """What lets the command (and ``python -m compactnn.bench``) set the policy without
    re-executing itself (1-3 s per command)."""
    code = (
        "import sys, compactnn, compactnn.cli, compactnn.omp_policy as o; "
        "import compactnn.bench.__main__; "
        "print('torch' in sys.modules, o.openmp_runtime_loaded())"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


def test_the_command_sets_the_policy_in_its_own_process(tmp_path):
    """The real console script: a --plugin module (imported after the policy is set, before
    the command runs) sees OMP_WAIT_POLICY=PASSIVE, and no re-execution happened (it marks
    the environment)."""
    script = Path(sys.executable).parent / "compactnn"
    if not script.is_file():
        pytest.skip("the compactnn console script is not installed")
    (tmp_path / "probe_env.py").write_text(
        "import os\nprint('POLICY', os.environ.get('OMP_WAIT_POLICY'),"
        f" os.environ.get({reexec.REEXEC_MARK!r}))\n"
    )
    drop = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "PYTHONPATH", reexec.REEXEC_MARK)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    proc = subprocess.Popen(
        [str(script), "eval", "no-such-artifact", "--plugin", "probe_env"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = proc.communicate(timeout=300)
    assert out.split()[:3] == ["POLICY", "PASSIVE", "None"], (out, err[-2000:])
    assert proc.returncode == 2 and err.startswith("error:"), err[-2000:]


@pytest.mark.parametrize("name", ["resolve_recipe", "Recipe"])
def test_a_public_name_imported_first_sees_the_built_in_methods(name):
    """Lazy names (PEP 562) must not lose what the eager import did: registering the methods
    (``compactnn.resolve_recipe('w4a8')`` alone said "unknown method 'rtn'")."""
    code = (
        f"import compactnn; from compactnn import {name}; "
        "print(compactnn.resolve_recipe('w4a8').name)"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "w4a8", out.stderr[-2000:]
