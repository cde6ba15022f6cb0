"""The deploy bench's timing child runs with the compactnn command's OpenMP policy: PASSIVE,
with the bounded spin where the load leaves room (a bare PASSIVE ran the oneDNN deployment
of ResNet-18 64x64 at batch 1 2.5x slower)."""

import subprocess

from compactnn.bench import deploy
from compactnn.omp_policy import PASSIVE_SPINCOUNT


def _child_env(monkeypatch, load, environ):
    seen = {}

    def fake_run(cmd, env, **kw):
        seen.update(env)
        return subprocess.CompletedProcess(cmd, 0, "tables\n", "")

    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(deploy, "load_average", lambda: load)
    monkeypatch.setattr(deploy.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(deploy.subprocess, "run", fake_run)
    assert deploy._child(quick=True) == "tables\n"
    return seen


def test_quiet_machine_child_gets_the_bounded_spin(monkeypatch):
    env = _child_env(monkeypatch, 0.5, {})
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["GOMP_SPINCOUNT"] == PASSIVE_SPINCOUNT


def test_loaded_machine_child_sleeps_at_once(monkeypatch):
    env = _child_env(monkeypatch, 5.0, {"OMP_WAIT_POLICY": "ACTIVE"})
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in env


def test_a_users_spin_count_is_kept(monkeypatch):
    env = _child_env(monkeypatch, 0.5, {"GOMP_SPINCOUNT": "100"})
    assert env["GOMP_SPINCOUNT"] == "100"
