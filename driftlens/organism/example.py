"""One organism seed measured the way the demo measures it, cached: what the notebooks start from.

:func:`example` returns an :class:`Example`: the seed's trajectory (base, Korean adaptation,
English control), the organism-world probe set, the activation store captured across every
checkpoint and its drift report against ``base`` -- each built when missing, read from the cache
otherwise (``<cache>/examples/seed-<s>/``). The capture refuses a store whose checkpoints were
built from other weights (a rebuilt organism): the example is then captured again. The demo runs
the same two steps per seed (:func:`measure_seed`) and leaves what it measured in the cache as
the seed's example (:func:`keep_as_example`), so notebooks run after it start at once.
"""
from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from driftlens.organism.demo import DEMO_METRICS, DEMO_MIR_BOOTSTRAP, DEMO_PROBES, DEMO_SITES


@dataclass(frozen=True)
class Example:
    """A measured organism seed: its trajectory, probe set, store and report (paths)."""

    trajectory: object          # driftlens.organism.Trajectory
    probes: Path                # the probe set's manifest.jsonl (its images beside it)
    store: Path                 # the activation store (zarr)
    report: Path                # the drift report (netCDF)

    def __repr__(self) -> str:
        return (f"Example(seed={self.trajectory.seed}, checkpoints={list(self.checkpoints)}, "
                f"store={str(self.store)!r}, report={str(self.report)!r})")

    @property
    def checkpoints(self) -> dict:
        """``{label: model directory}``: base, ko-1..ko-5, en-1..en-5."""
        return self.trajectory.all_checkpoints

    def open_store(self, **kwargs):
        """:func:`driftlens.open_store` on the example's store."""
        from driftlens.store import open_store

        return open_store(self.store, **kwargs)

    def load_report(self):
        """:func:`driftlens.load_report` on the example's report."""
        from driftlens.report import load_report

        return load_report(self.report)


def world_probes(folder, size: int) -> Path:
    """The demo's probe set of the organism's world (72 scenes x 2 renders), written into ``folder``;
    returns its manifest path."""
    from driftlens.organism.probe_sets import make_shapes_probes

    return Path(make_shapes_probes(Path(folder), seed=0, size=size, **DEMO_PROBES))


def measure_seed(trajectory, probes, folder, *, device="auto", progress: bool = True):
    """Capture ``probes`` across every checkpoint of ``trajectory`` into ``folder/activations.zarr``
    and compute its drift report against ``base`` (``folder/drift.nc``); returns the report.

    A store captured from other weights (an older organism build) or another probe set is captured
    again, with a warning. Completed checkpoints of a matching store are kept (the capture resumes).
    """
    from driftlens.capture import capture
    from driftlens.drift import drift
    from driftlens.errors import CheckpointIdentityError
    from driftlens.store import StoreMismatchError, open_store

    folder = Path(folder)
    store = folder / "activations.zarr"
    ckpts = trajectory.all_checkpoints
    kw = dict(out=store, sites=DEMO_SITES, batch_size=16, device=device, progress=progress)
    try:
        capture(ckpts["base"], probes, ckpts, **kw)
    except (CheckpointIdentityError, StoreMismatchError) as exc:
        warnings.warn(f"{store} was captured from another organism build or probe set; capturing it again "
                      f"({str(exc).splitlines()[0]})", stacklevel=2)
        shutil.rmtree(store)
        capture(ckpts["base"], probes, ckpts, **kw)
    return drift(open_store(store), reference="base", metrics=DEMO_METRICS, sites=("hidden",),
                 mir_bootstrap=DEMO_MIR_BOOTSTRAP, progress=progress, device=device, out=folder / "drift.nc")


def _example_folder(seed: int, cache) -> Path:
    from driftlens.organism.train import cache_root

    return Path(cache or cache_root()) / "examples" / f"seed-{int(seed)}"


def _measured(folder: Path, trajectory) -> bool:
    done = folder / "measured"
    return (done.is_file() and done.read_text() == str(trajectory.root) and (folder / "drift.nc").is_file()
            and _has_draws(folder / "drift.nc"))


def _has_draws(report: Path) -> bool:
    """Whether a cached report keeps its cells' bootstrap draws (reports before driftlens.compare did not)."""
    import xarray as xr

    try:
        with xr.open_dataset(report, engine="h5netcdf") as ds:
            return "mmd_boot" in ds.data_vars
    except (OSError, ValueError):
        return False


def keep_as_example(trajectory, measured, cache=None) -> bool:
    """Copy a seed's store and report measured by :func:`measure_seed` into the example cache,
    unless the cache already holds that seed's example for the same build; returns whether it copied."""
    folder = _example_folder(trajectory.seed, cache)
    if _measured(folder, trajectory):
        return False
    measured = Path(measured)
    (folder / "measured").unlink(missing_ok=True)
    world_probes(folder / "probes" / "organism-world", trajectory.recipe.image_size)
    shutil.rmtree(folder / "activations.zarr", ignore_errors=True)
    shutil.copytree(measured / "activations.zarr", folder / "activations.zarr")
    shutil.copy2(measured / "drift.nc", folder / "drift.nc")
    (folder / "measured").write_text(str(trajectory.root))
    return True


def example(seed: int = 0, *, cache=None, device="auto", progress: bool = True) -> Example:
    """The measured organism seed ``seed``, from the cache or built (organism, capture, report).

    Parameters
    ----------
    seed : int
        Organism seed (the demo's are 0, 1, 2).
    cache : path, optional
        Cache root (default ``$DRIFTLENS_CACHE`` or ``~/.cache/driftlens``): the organism lives in
        ``<cache>/organism/``, the example in ``<cache>/examples/seed-<seed>/``.
    device : str
        Capture and drift device.
    progress : bool
        tqdm bars.

    Returns
    -------
    Example
        Building the organism takes minutes on 2 cores the first time; the capture and report
        about a minute; from the cache, a second.
    """
    from driftlens.organism.train import build_seeds
    from driftlens.probes import ProbeSet

    traj = build_seeds([seed], progress=progress, cache=cache)[0]
    folder = _example_folder(seed, cache)
    probes = world_probes(folder / "probes" / "organism-world", traj.recipe.image_size)
    if not _measured(folder, traj):
        (folder / "measured").unlink(missing_ok=True)
        measure_seed(traj, ProbeSet.load(probes), folder, device=device, progress=progress)
        (folder / "measured").write_text(str(traj.root))
    return Example(traj, probes, folder / "activations.zarr", folder / "drift.nc")
