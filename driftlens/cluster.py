"""Dask plumbing shared by the grid (:mod:`driftlens.engine`) and capture: gather, clients.

Only imported when a Dask client is in play; ``distributed`` is the ``scale`` extra.
"""
from __future__ import annotations

import contextlib

from driftlens.errors import EnvironmentProblem

INSTALL = "pip install 'driftlens[scale]'"


def _distributed():
    try:
        import distributed
    except ImportError:
        raise EnvironmentProblem(f"running on a Dask cluster needs Dask's `distributed`: {INSTALL}") from None
    return distributed


def gather(client, futures, bar=None, step: int = 1) -> list:
    """Results of ``futures`` in submission order, taken as they finish (``bar`` advanced by ``step`` each).

    A task's own error is raised here, as it would be in one process; on any error or an
    interruption the tasks not yet finished are cancelled.
    """
    distributed = _distributed()
    by_key = {}
    try:
        for fut in distributed.as_completed(futures):
            by_key[fut.key] = fut.result()
            if bar is not None:
                bar.update(step)
    finally:
        client.cancel([f for f in futures if f.key not in by_key])
    return [by_key[f.key] for f in futures]


@contextlib.contextmanager
def client_for(workers: int | None = None, scheduler: str | None = None):
    """A Dask client: a LocalCluster of ``workers`` processes (one thread each), or the scheduler at an address.

    Yields None when neither is given; closes what it started on exit.
    """
    if workers is None and scheduler is None:
        yield None
        return
    distributed = _distributed()
    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            try:
                client = stack.enter_context(distributed.Client(scheduler, timeout="30s"))
            except OSError as exc:
                raise EnvironmentProblem(f"no Dask scheduler answered at {scheduler} ({exc})") from None
        else:
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=int(workers), threads_per_worker=1, processes=True, dashboard_address=":0"))
            client = stack.enter_context(distributed.Client(cluster))
        yield client
