"""Drift report files: a report (an ``xarray.Dataset``) written as netCDF, atomically, and read back.

A report is plain data: every reader of a report (``ranks``, ``plot``, ``compare``, the HTML page)
opens it with :func:`load_report` and never needs the activation store it was computed from.
"""
from __future__ import annotations

import os
from pathlib import Path

from driftlens.errors import DataError, EnvironmentProblem, UsageError


def check_report_path(path, inputs=()) -> Path:
    """An output file path that can be written: local, not a folder, its parent a writable folder, and
    not an input (``inputs``: paths or ``(description, path)``; see :func:`driftlens.outputs.check_output`)."""
    from driftlens.outputs import check_output, local

    path = local(path)
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; give a file name such as {path / 'report.nc'}")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise UsageError(f"--out {path}: {parent} is a file, so {path.parent} cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise EnvironmentProblem(f"--out {path}: not writable")
    check_output(path, inputs)
    return path


def save_report(report, path) -> Path:
    """Write a drift report as netCDF (h5netcdf engine), atomically; returns the path.

    The file is encoded in memory, then written under a temporary name beside ``path`` and renamed
    (:func:`driftlens.outputs.atomic_write`): HDF5 never meets a full disk or a file-size limit, the
    previous file survives any failure, and no temporary file is left. A path inside the report's
    own activation store (``attrs["store_path"]``) is refused.
    """
    from driftlens.outputs import atomic_write

    path = check_report_path(path, [("activation store", report.attrs.get("store_path") or None)])
    blob = report.to_netcdf(engine="h5netcdf")          # bytes: netCDF-4 / HDF5 encoded in memory
    return atomic_write(path, bytes(blob))


def load_report(path):
    """Read a drift report written by :func:`save_report`.

    Raises :class:`~driftlens.errors.DataError` when the file is not a readable netCDF drift report.
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no drift report at {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a drift report (a .nc file written by `driftlens drift`)")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            rep = ds.load()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a readable drift report ({type(exc).__name__}: {exc})") from exc
    if "checkpoint" not in rep.dims or "layer" not in rep.dims:
        raise DataError(f"{path} is a netCDF file but not a driftlens drift report (it has dims "
                        f"{dict(rep.sizes)}, a report has checkpoint and layer)")
    if rep.sizes["checkpoint"] == 0:
        raise DataError(f"{path}: the report holds no checkpoint")
    return rep
