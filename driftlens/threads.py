"""OpenMP threads beside other CPU work: a passive wait policy, or one intra-op thread.

torch's CPU kernels run their parallel regions on OpenMP (GNU libgomp in the Linux wheels). With
OpenMP's default wait policy, a thread that finishes its share spins for a while before it sleeps,
and a parallel region ends only when every thread of the team arrives. On a machine whose cores are
also busy with other work (a training job, a test run), the spinning threads take turns on the cores
with that work, and each of the report's thousands of small and mid-size ops waits for a
descheduled team member: ``driftlens drift`` on the demo store took 3-10x its idle time beside one
other torch process (bench/bench_contention.py; bench/RESULTS.md, issue 28). With the passive
policy the idle threads sleep at once and the same report takes about its fair share.

libgomp reads ``OMP_WAIT_POLICY`` once, when it is loaded (``import torch``). Importing
``driftlens`` before torch therefore sets it (only when unset: a user's own setting wins), which
covers the command line (its entry point imports the package first), scripts and Dask workers (they
inherit the environment). Where torch was loaded first with the default policy (a notebook that
imported torch before driftlens), :func:`serial_torch` runs the report's loop on one intra-op
thread instead: no parallel region, nothing to wait for. Neither changes a number: the report's
values do not depend on the thread count (tests/unit/test_thread_invariance.py, and the reports
compared by bench/bench_contention.py).
"""
from __future__ import annotations

import contextlib
import os
import sys

_PASSIVE_AT_LOAD: bool | None = None    # torch's OpenMP loaded with the passive wait policy (None: not known yet)


def passive_openmp() -> None:
    """Ask OpenMP for the passive wait policy when torch is not loaded yet (a user's setting wins).

    Called once, first thing, by ``driftlens/__init__.py``. Records whether the OpenMP runtime
    that torch loads (now or later) waits passively, for :func:`serial_torch`.
    """
    global _PASSIVE_AT_LOAD
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _PASSIVE_AT_LOAD = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def openmp_waits_passively() -> bool:
    """Whether torch's OpenMP threads sleep as soon as they are idle (see :func:`passive_openmp`)."""
    if _PASSIVE_AT_LOAD is None:
        passive_openmp()
    return bool(_PASSIVE_AT_LOAD)


@contextlib.contextmanager
def serial_torch():
    """Run the enclosed torch ops on one intra-op thread when OpenMP's idle threads spin.

    A no-op when the wait policy is passive (the command line, or driftlens imported before
    torch) or torch already runs one thread. Otherwise torch's thread count is 1 inside and
    restored on exit (also on an error). Not for code that other threads run at the same time:
    the thread count is process-wide.
    """
    import torch

    before = torch.get_num_threads()
    if before == 1 or openmp_waits_passively():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
