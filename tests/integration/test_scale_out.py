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
    # hidden size 160: large enough that LAPACK's eigensolvers round differently with one thread (a worker)
    # and two (this process) unless driftlens pins them to one -- at 12, MIR agreed by luck
    return make_store(tmp_path_factory.mktemp("scale") / "store.zarr", n_layers=3, dim=160,
                      planted=((1, "hidden"), (2, "key")))


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


def _hold_store_writes(client, seconds: float) -> None:
    """On every current worker, pause after each store step a capture task takes, so a kill can land in
    the middle (a worker the nanny restarts after the kill runs unpatched). Nested functions: cloudpickle
    ships them by value (the workers cannot import this test module)."""

    def hold(seconds=seconds):
        import time as _time

        from driftlens import store

        if not hasattr(store, "_held"):
            store._held = (store.CheckpointWriter.add, store.write_store_record)

            def add(self, *args, **kwargs):
                store._held[0](self, *args, **kwargs)
                _time.sleep(seconds)

            def record(*args, **kwargs):
                _time.sleep(seconds)
                return store._held[1](*args, **kwargs)

            store.CheckpointWriter.add, store.write_store_record = add, record

    client.run(hold)


def _release_store_writes(client) -> None:
    def release():
        from driftlens import store

        if hasattr(store, "_held"):
            store.CheckpointWriter.add, store.write_store_record = store._held
            del store._held

    client.run(release)


def _mid_creation(out) -> str | None:
    """The label whose task is creating the store at ``out`` (a temporary creation folder holds arrays)."""
    if any((tmp / "layer").exists() for tmp in out.parent.glob(f".{out.name}.creating-*")):
        return "step-0"
    return None


def _mid_write(out) -> str | None:
    """A label whose rows are being written: a chunk file of its slot exists, and it is not complete."""
    import json

    try:
        attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError):
        return None
    for i, label in enumerate(attrs.get("checkpoints", [])):
        if label not in attrs.get("completed", []) and any((out / "hidden" / "c" / str(i)).rglob("*")):
            return label
    return None


def _kill_the_task_when(client, state, out, done: threading.Event, killed: list):
    """SIGKILL the worker running the capture task of the label ``state(out)`` names, once it names one."""
    while not done.is_set():
        label = state(out)
        busy = [w for w, keys in client.processing().items()
                if label and any(str(k).startswith(f"driftlens-capture-{label}-") for k in keys)]
        if busy:
            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(label)
            return
        time.sleep(0.05)


@pytest.mark.parametrize("state", [_mid_creation, _mid_write], ids=["creating the store", "writing rows"])
def test_a_capture_task_killed_mid_write_is_redone_and_the_store_is_valid(trajectory, client, state):
    """A worker is killed while its task is in the state the test means (not whenever a task runs: a kill
    that landed during store creation made the rerun refuse "not a driftlens store", which atomic creation
    fixed). The scheduler reruns the task; the store is whole and equals the one captured in one process."""
    t = trajectory
    client.wait_for_workers(2, timeout=60)
    out = t["root"] / f"killed-{state.__name__}.zarr"
    done, killed = threading.Event(), []
    _hold_store_writes(client, 0.5)
    killer = threading.Thread(target=_kill_the_task_when, args=(client, state, out, done, killed), daemon=True)
    killer.start()
    try:
        dl.capture(t["ckpts"]["step-0"], t["probes"], t["ckpts"], out=out, batch_size=2, progress=False,
                   client=client)
    finally:
        done.set()
        killer.join(10)
        client.wait_for_workers(2, timeout=60)
        _release_store_writes(client)
    assert killed, f"the worker was not killed {state.__name__[1:].replace('_', ' ')}"
    assert dl.store.verify_store(out, "full") == ([], [])
    _same_store(t["alone"], out)
    assert not list(out.parent.glob(f".{out.name}.creating-*"))        # the killed creation's folder is gone
