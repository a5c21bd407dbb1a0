"""Shared by every metric family: input validation, seeded subsamples, one-BLAS-thread sections.

Pure helpers on torch tensors; the metric functions of :mod:`driftlens.stats` validate their inputs
with :func:`check_inputs` (the one validation helper) and run LAPACK work inside
:func:`one_blas_thread` so a value does not depend on the process's thread count.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

from driftlens.errors import ArgumentTypeError, UsageError

_MKL_LOCAL = None                       # mkl_set_num_threads_local of torch's MKL (False: none found)
_SERIAL = threading.RLock()             # the fallback's process-wide BLAS limit, one holder at a time


def as_tensor(a, name: str) -> torch.Tensor:
    """``a`` as a tensor (numpy arrays converted without a copy); anything else refused, naming ``name``."""
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    raise ArgumentTypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(a).__name__}")


def bad_rows(a: torch.Tensor, limit: int = 5) -> str:
    """How many rows of ``a`` [n, d] hold NaN/Inf, and the first few of them, for an error message."""
    bad = (~torch.isfinite(a)).any(dim=1).nonzero().flatten()
    shown = ", ".join(str(int(i)) for i in bad[:limit].tolist())
    more = f" (and {bad.numel() - limit} more)" if bad.numel() > limit else ""
    return f"{bad.numel()} row(s) with NaN/Inf, first at rows [{shown}]{more}"


def check_inputs(*arrays, names: Sequence[str] | None = None, min_rows: int = 2, same_rows: bool = False):
    """Validate and harmonise metric inputs; the one shared validation helper.

    Each input must be 2-D ``[rows, features]``, floating (integers are converted), finite, have at
    least ``min_rows`` rows; all inputs must share the feature size and device (and the row count
    when ``same_rows``). Returns the tensors promoted to one floating dtype (float16/bfloat16 ->
    float32). Raises ``ValueError``/``TypeError`` naming the offending input.
    """
    names = list(names) if names is not None else [f"input {i}" for i in range(len(arrays))]
    ts = [as_tensor(a, n) for a, n in zip(arrays, names)]
    for t, n in zip(ts, names):
        if t.dim() != 2:
            raise UsageError(f"{n}: expected a 2-D tensor [rows, features], got shape {tuple(t.shape)}")
        if t.is_complex():
            raise ArgumentTypeError(f"{n}: complex tensors are not supported (dtype {t.dtype})")
        if t.shape[0] < min_rows:
            raise UsageError(f"{n}: needs at least {min_rows} rows (tokens), got {t.shape[0]}")
        if t.shape[1] < 1:
            raise UsageError(f"{n}: has no features (shape {tuple(t.shape)})")
    d0 = ts[0].shape[1]
    for t, n in zip(ts[1:], names[1:]):
        if t.shape[1] != d0:
            raise UsageError(
                f"feature sizes differ: {names[0]} has {d0} features, {n} has {t.shape[1]}")
        if t.device != ts[0].device:
            raise UsageError(f"devices differ: {names[0]} on {ts[0].device}, {n} on {t.device}")
    if same_rows:
        for t, n in zip(ts[1:], names[1:]):
            if t.shape[0] != ts[0].shape[0]:
                raise UsageError(f"paired metric needs the same rows: {names[0]} has "
                                 f"{ts[0].shape[0]} rows, {n} has {t.shape[0]}")
    dtype = torch.float32
    for t in ts:
        if t.dtype == torch.float64:
            dtype = torch.float64
    out = []
    for t, n in zip(ts, names):
        t = t.to(dtype)
        if not bool(torch.isfinite(t).all()):
            raise UsageError(f"{n}: {bad_rows(t)}")
        out.append(t)
    return out


def bandwidths(sigma) -> list[float]:
    """One kernel bandwidth or several (float, sequence, array or tensor) as a list of finite positive floats."""
    if isinstance(sigma, torch.Tensor):
        vals = [float(s) for s in sigma.detach().reshape(-1).cpu().tolist()]
    elif isinstance(sigma, np.ndarray):
        vals = [float(s) for s in sigma.reshape(-1).tolist()]
    elif isinstance(sigma, (list, tuple)):
        vals = [float(s) for s in sigma]
    else:
        vals = [float(sigma)]
    if not vals:
        raise UsageError("sigma: empty sequence")
    for s in vals:
        if not math.isfinite(s) or s <= 0:
            raise UsageError(f"sigma must be finite and > 0, got {s}")
    return vals


def generator(seed: int) -> torch.Generator:
    """A CPU torch generator seeded with ``seed``."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def subsample(a: torch.Tensor, k: int | None, seed: int) -> torch.Tensor:
    """Fixed-seed subsample of at most ``k`` rows (rows in random order); all rows when k is None."""
    if k is None or a.shape[0] <= k:
        return a
    idx = torch.randperm(a.shape[0], generator=generator(seed))[:k].to(a.device)
    return a[idx]


def mkl_set_num_threads_local():
    """``MKL_Set_Num_Threads_Local`` (the C interface of ``mkl_set_num_threads_local``) of the MKL
    inside torch's CPU library, or False (another BLAS)."""
    global _MKL_LOCAL
    if _MKL_LOCAL is None:
        _MKL_LOCAL = False
        try:
            import ctypes
            import glob
            import os

            if torch.backends.mkl.is_available():
                lib = os.path.join(os.path.dirname(torch.__file__), "lib")
                for name in sorted(glob.glob(os.path.join(lib, "*torch_cpu*"))):
                    try:
                        fn = ctypes.CDLL(name).MKL_Set_Num_Threads_Local     # the C interface (by value)
                    except (OSError, AttributeError):
                        continue
                    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                    _MKL_LOCAL = fn
                    break
        except (ImportError, OSError):
            pass
    return _MKL_LOCAL


@contextlib.contextmanager
def one_blas_thread():
    """Run the enclosed BLAS / LAPACK calls on one thread, so their rounding does not depend on the
    process's thread count.

    LAPACK's eigensolvers and Cholesky (and BLAS products on some shapes) round differently with
    1 and 2 threads: a Dask worker (one thread) and the driver (all cores) gave MIR values 3e-6
    apart. With torch's MKL, the limit is MKL's per-thread setting (``mkl_set_num_threads_local``:
    nothing else in the process changes); with another BLAS, threadpoolctl's process-wide limit,
    held by one caller at a time. torch's own reductions (over a dim with several outputs) are
    already thread-count invariant.
    """
    fn = mkl_set_num_threads_local()
    if fn:
        before = fn(1)
        try:
            yield
        finally:
            fn(before)
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                 # nothing to limit with: rounding may follow the thread count
        yield
        return
    with _SERIAL, threadpool_limits(limits=1, user_api="blas"):
        yield


def ordered_mean(x: torch.Tensor) -> float:
    """Mean of a 1-D tensor in one summation order (numpy's pairwise sum; torch splits a long full
    reduction across threads)."""
    return float(np.mean(x.detach().cpu().numpy()))


def ordered_std(x: torch.Tensor) -> float:
    """Unbiased standard deviation of a 1-D tensor in one summation order (see :func:`ordered_mean`)."""
    return float(np.std(x.detach().cpu().numpy(), ddof=1))
