"""The grid on a Dask cluster of process workers: the same report as in one process, even when a worker dies.

Tier: integration (starts a ``distributed.LocalCluster`` of two worker processes; no model).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
import xarray as xr

import driftlens as dl
from driftlens import engine
from driftlens.store import open_store
from driftlens.testing import make_store
from driftlens.testing.blocks import DelayedBlocks

distributed = pytest.importorskip("distributed")

METRICS = ("mmd", "gauss_w2", "paired_shift", "gap", "mir")      # one metric of each kind of the registry
OPTIONS = dict(metrics=METRICS, n_permutations=200, n_bootstrap=200, transport_resamples=10, seed=3, progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("scale") / "store.zarr", n_layers=3, planted=((1, "hidden"), (2, "key")))


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as cluster, distributed.Client(cluster) as c:
        yield c


def test_two_process_workers_give_the_single_process_report(store, client):
    alone = dl.drift(store, **OPTIONS)
    spread = dl.drift(store, client=client, **OPTIONS)
    ran_on = client.run(os.getpid)
    assert len(set(ran_on.values()) - {os.getpid()}) == 2            # two other processes did the work
    xr.testing.assert_identical(alone, spread)                        # every value, bit for bit, and every attr
    # and the report is not trivially equal: the planted layer stands out (as in one process)
    cell = dict(checkpoint="shifted", site="hidden", modality="visual")
    mmd = alone["mmd"].sel(**cell)                                   # [layer]
    assert float(mmd.sel(layer=1)) > 10 * float(abs(mmd.sel(layer=[0, 2])).max())
    assert float(alone["mmd_p"].sel(layer=1, **cell)) < 0.05


def _kill_a_busy_worker(client, done: threading.Event, killed: list):
    """Once a task has finished and another is running, SIGKILL the worker process running it."""
    while not done.is_set():
        busy = {w: keys for w, keys in client.processing().items() if keys}
        finished = client.run_on_scheduler(
            lambda dask_scheduler: sum(ts.state == "memory" for ts in dask_scheduler.tasks.values()))
        if busy and finished >= 1:
            worker = next(iter(busy))
            pid = client.run(os.getpid, workers=[worker])[worker]
            os.kill(pid, signal.SIGKILL)
            killed.append((worker, pid))
            return
        time.sleep(0.05)


def test_a_worker_killed_mid_grid_does_not_change_the_report(store, client):
    ds = open_store(store)
    plan = engine.make_plan(ds, **{k: v for k, v in OPTIONS.items() if k != "progress"})
    blocks = engine.StoreBlocks.of_store(store)
    expected = engine.assemble(plan, engine.run_grid(plan, blocks, progress=False))
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_busy_worker, args=(client, done, killed), daemon=True)
    killer.start()
    try:
        results = engine.run_grid(plan, DelayedBlocks(blocks, 0.15), client=client, progress=False)
    finally:
        done.set()
        killer.join(10)
    assert killed, "no worker was killed: the grid finished before the killer saw a running task"
    xr.testing.assert_identical(expected, engine.assemble(plan, results))
    client.wait_for_workers(2, timeout=60)      # the nanny restarted the killed worker


# ----------------------------------------------------------------------------- capture as tasks


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """Three saved tiny LLaVA checkpoints, a probe subset, and their store captured in this process."""
    from driftlens.testing import tiny

    from .test_capture import subset

    root = tmp_path_factory.mktemp("capture-tasks")
    ckpts = {f"step-{i}": tiny.save("llava", root / f"step-{i}", seed=i, n_layers=2) for i in range(3)}
    probes = subset("shapes-bilingual", 4, root / "probes")
    alone = dl.capture(ckpts["step-0"], probes, ckpts, out=root / "alone.zarr", batch_size=2, progress=False)
    return {"root": root, "ckpts": ckpts, "probes": probes, "alone": alone}


def _same_store(a, b):
    sa, sb = open_store(a, verify="full"), open_store(b, verify="full")
    assert list(sa.checkpoint.values) == list(sb.checkpoint.values)          # trajectory order kept
    for site in sa.data_vars:
        np.testing.assert_allclose(sb[site].values, sa[site].values, rtol=1e-5, atol=1e-6, err_msg=site)


def test_checkpoints_captured_as_tasks_equal_the_single_process_store(trajectory, client):
    t = trajectory
    out = dl.capture(t["ckpts"]["step-0"], t["probes"], t["ckpts"], out=t["root"] / "tasks.zarr", batch_size=2,
                     progress=False, client=client)
    _same_store(t["alone"], out)


def _kill_a_worker_once_busy(client, done: threading.Event, killed: list):
    while not done.is_set():
        busy = [w for w, keys in client.processing().items() if keys]
        if busy:
            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.05)


def test_a_capture_task_killed_mid_write_is_redone_and_the_store_is_valid(trajectory, client):
    t = trajectory
    client.wait_for_workers(2, timeout=60)
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_once_busy, args=(client, done, killed), daemon=True)
    killer.start()
    try:
        out = dl.capture(t["ckpts"]["step-0"], t["probes"], t["ckpts"], out=t["root"] / "killed.zarr",
                         batch_size=2, progress=False, client=client)
    finally:
        done.set()
        killer.join(10)
    assert killed
    assert dl.store.verify_store(out, "full") == ([], [])
    _same_store(t["alone"], out)
