"""Dask plumbing shared by the grid (:mod:`driftlens.engine`) and capture: gather, clients.

Only imported when a Dask client is in play; ``distributed`` is the ``scale`` extra.
"""
from __future__ import annotations

import contextlib
import os

from driftlens._version import install_hint
from driftlens.errors import EnvironmentProblem, UsageError

INSTALL = install_hint("scale")
#: Seconds to wait for a scheduler's handshake, and then for a first worker, before giving up with a
#: one-line error (``$DRIFTLENS_DASK_TIMEOUT`` or ``--dask-timeout`` change it; a cluster whose workers
#: start from a batch queue may need more).
DEFAULT_TIMEOUT = 60.0


def _distributed():
    try:
        import distributed
    except ImportError:
        raise EnvironmentProblem(f"running on a Dask cluster needs Dask's `distributed`: {INSTALL}") from None
    return distributed


def dask_timeout(timeout: float | None = None) -> float:
    """The Dask wait in seconds: ``timeout``, else ``$DRIFTLENS_DASK_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`."""
    if timeout is None:
        text = os.environ.get("DRIFTLENS_DASK_TIMEOUT")
        if not text:
            return DEFAULT_TIMEOUT
        try:
            timeout = float(text)
        except ValueError:
            raise UsageError(f"DRIFTLENS_DASK_TIMEOUT={text!r} is not a number of seconds") from None
    if not 0 < float(timeout) < float("inf"):
        raise UsageError(f"the Dask timeout must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


def _handshake(address: str, timeout: float) -> None:
    """Open a comm to ``address`` and complete Dask's handshake within ``timeout`` seconds, then close it.

    ``distributed.Client(address, timeout=...)`` bounds the TCP connect but not the handshake read
    after it, so a port that accepts and never answers hangs it for ever; this probe bounds both. It
    runs its own event loop in a helper thread (safe inside Jupyter's running loop).
    """
    import asyncio
    import concurrent.futures

    from distributed import Security
    from distributed.comm import connect

    limit = 1.5 * timeout + 1             # the connect's own retries (a refused port) end first, with their message
    args = Security().get_connection_args("client")      # TLS settings from the Dask config, as Client uses

    async def probe():
        comm = await asyncio.wait_for(connect(address, timeout=timeout, **args), limit)
        await comm.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(asyncio.run, probe()).result()
        except (concurrent.futures.TimeoutError, TimeoutError):
            raise EnvironmentProblem(f"the Dask scheduler at {address} did not answer within {limit:g} s "
                                     f"(something listens there but does not speak Dask, or it is overloaded); "
                                     f"check the address, or raise --dask-timeout / $DRIFTLENS_DASK_TIMEOUT") from None
        except OSError as exc:
            raise EnvironmentProblem(f"no Dask scheduler answered at {address} ({exc})") from None
        except ValueError as exc:           # e.g. an inproc:// address of another process
            raise UsageError(f"--scheduler {address!r} cannot be reached from this process ({exc})") from None


def check_client(client, timeout: float | None = None) -> None:
    """Refuse a closed client, and wait (bounded) for the cluster's first worker before submitting work.

    Raises
    ------
    driftlens.errors.EnvironmentProblem
        The client is closed, or its scheduler has no worker after ``timeout`` seconds (see
        :func:`dask_timeout`): tasks would wait for ever.
    """
    status = getattr(client, "status", None)
    if status in ("closed", "closing", "failed"):
        raise EnvironmentProblem(f"the Dask client is {status} (client.close() was called, or its scheduler went "
                                 f"away): create a new distributed.Client and pass it as client=")
    timeout = dask_timeout(timeout)
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        where = getattr(getattr(client, "scheduler", None), "address", "the scheduler")
        raise EnvironmentProblem(f"the Dask cluster at {where} has no worker after {timeout:g} s, so no task could "
                                 f"run: start workers (`dask worker {where}`), or raise --dask-timeout / "
                                 f"$DRIFTLENS_DASK_TIMEOUT if they are still starting") from None
    except Exception as exc:  # noqa: BLE001 - distributed's CommClosedError, CancelledError ... on a dead client
        raise EnvironmentProblem(f"the Dask client cannot reach its scheduler ({type(exc).__name__}: {exc}); "
                                 f"create a new distributed.Client") from None


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


def _address(scheduler: str) -> str:
    """``scheduler`` as a Dask address, or :class:`~driftlens.errors.UsageError` naming it."""
    from distributed.comm import parse_address
    from distributed.comm.registry import backends

    text = str(scheduler).strip()
    try:
        scheme, _ = parse_address(text)
        if scheme not in backends:
            raise ValueError(f"unknown protocol {scheme!r}")
        if scheme in ("tcp", "tls", "ws", "wss"):
            from distributed.comm.addressing import parse_host_port

            parse_host_port(text.split("://", 1)[-1])
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--scheduler {scheduler!r} is not a Dask scheduler address ({exc}); write it like "
                         f"tcp://HOST:8786") from None
    return text


@contextlib.contextmanager
def client_for(workers: int | None = None, scheduler: str | None = None, timeout: float | None = None):
    """A Dask client: a LocalCluster of ``workers`` processes (one thread each), or the scheduler at an address.

    Yields None when neither is given; closes what it started on exit. A scheduler must answer Dask's
    handshake within ``timeout`` seconds (:func:`dask_timeout`), and have a worker within as many more.
    """
    if workers is None and scheduler is None:
        yield None
        return
    distributed = _distributed()
    timeout = dask_timeout(timeout)
    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            address = _address(scheduler)
            _handshake(address, timeout)
            try:
                client = stack.enter_context(distributed.Client(address, timeout=timeout))
            except (OSError, TimeoutError) as exc:
                raise EnvironmentProblem(f"no Dask scheduler answered at {scheduler} ({exc})") from None
            check_client(client, timeout)
        else:
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=int(workers), threads_per_worker=1, processes=True, dashboard_address=":0"))
            client = stack.enter_context(distributed.Client(cluster))
        yield client
