"""OpenMP threads beside other CPU work (driftlens.threads; bench/bench_contention.py measures the speed).

Importing driftlens before torch asks for the passive wait policy before torch's OpenMP runtime
loads (it reads the setting once, then); where torch came first with the spinning default, the
report's in-process loop runs on one intra-op thread and puts the count back.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import driftlens as dl
from driftlens import engine, threads
from driftlens.store import open_store
from driftlens.testing import make_store

PROBE = r"""
import os, sys
seen = {}
def hook(event, args):
    if event == "import" and args[0] == "torch" and "torch" not in seen:
        seen["torch"] = os.environ.get("OMP_WAIT_POLICY")
sys.addaudithook(hook)
{first}
import driftlens
print(seen.get("torch", "not imported"), driftlens.threads.openmp_waits_passively())
"""


def _probe(first: str, policy: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    res = subprocess.run([sys.executable, "-c", PROBE.replace("{first}", first)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.split()


@pytest.mark.heavy                  # three interpreters that import torch
def test_importing_driftlens_first_sets_the_passive_policy_before_torch_loads():
    assert _probe("", None) == ["PASSIVE", "True"]
    assert _probe("", "active") == ["active", "False"]            # the user's setting wins
    assert _probe("import torch", None) == ["None", "False"]      # too late: left alone, and known


def test_serial_torch_runs_one_thread_only_where_openmp_spins(monkeypatch):
    before = torch.get_num_threads()
    if before == 1:
        pytest.skip("torch runs one thread here")
    monkeypatch.setattr(threads, "_PASSIVE_AT_LOAD", True)
    with threads.serial_torch():
        assert torch.get_num_threads() == before
    monkeypatch.setattr(threads, "_PASSIVE_AT_LOAD", False)
    with pytest.raises(RuntimeError, match="inside"):
        with threads.serial_torch():
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before                      # restored, also on an error


def test_the_report_loop_runs_serially_where_openmp_spins(tmp_path, monkeypatch):
    if torch.get_num_threads() == 1:
        pytest.skip("torch runs one thread here")
    seen, run_task = [], engine.run_task

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return run_task(*args, **kwargs)

    monkeypatch.setattr(engine, "run_task", spy)
    monkeypatch.setattr(threads, "_PASSIVE_AT_LOAD", False)
    ds = open_store(make_store(tmp_path / "s.zarr", n_clusters=12))
    kw = {"metrics": ("mmd", "mir"), "n_permutations": 20, "n_bootstrap": 20, "progress": False}
    serial = dl.drift(ds, **kw)
    assert seen and set(seen) == {1}
    monkeypatch.setattr(threads, "_PASSIVE_AT_LOAD", True)
    seen.clear()
    parallel = dl.drift(ds, **kw)
    assert set(seen) == {torch.get_num_threads()} != {1}
    serial.attrs.pop("created", None), parallel.attrs.pop("created", None)
    import xarray as xr

    xr.testing.assert_identical(serial, parallel)                  # the thread count changes no number
