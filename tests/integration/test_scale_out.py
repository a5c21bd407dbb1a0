"""The grid on a Dask cluster of process workers: the same report as in one process, even when a worker dies.

Tier: integration (starts a ``distributed.LocalCluster`` of two worker processes; no model).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import xarray as xr

import driftlens as dl
from driftlens import engine
from driftlens.store import open_store
from driftlens.testing import make_store
from driftlens.testing.blocks import DelayedBlocks

distributed = pytest.importorskip("distributed")

METRICS = ("mmd", "sliced_w", "paired_shift", "gap", "mir")
OPTIONS = dict(metrics=METRICS, n_permutations=200, n_bootstrap=200, transport_resamples=20, seed=3, progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("scale") / "store.zarr", n_layers=4, planted=((1, "hidden"), (3, "key")))


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
    assert float(alone["mmd"].sel(checkpoint="shifted", layer=1, site="hidden", modality="visual")) > 0.05


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
