"""driftlens: layer-wise, calibrated drift of visual tokens in vision-language models.

The package namespace only re-exports; importing it loads no model and touches no file. It sets one
environment default first, before anything here imports torch: ``OMP_WAIT_POLICY=PASSIVE`` when
unset and torch is not loaded yet (see :mod:`driftlens.threads`: spinning OpenMP threads made a
report 3-10x slower beside other CPU work).
"""
# ruff: noqa: E402 -- the wait policy must be set before the imports below load torch
from driftlens.threads import passive_openmp as _passive_openmp

_passive_openmp()
from driftlens import compare, inference, merges, metrics, outcomes, plot, train
from driftlens._version import __version__
from driftlens.capture import CaptureError, capture
from driftlens.drift import DriftError, drift
from driftlens.errors import (
    ArgumentTypeError,
    CheckpointIdentityError,
    DataError,
    DriftlensError,
    EnvironmentProblem,
    ScheduleError,
    ScheduleFileError,
    SelectionError,
    StoreIntegrityError,
    UsageError,
)
from driftlens.explore import explore
from driftlens.inputs import model_inputs
from driftlens.merges import Merge
from driftlens.probes import Probe, ProbeError, ProbeSet, list_probe_sets
from driftlens.probing import linear_probe
from driftlens.ranks import allocate_ranks
from driftlens.report import load_report, save_report
from driftlens.schedule import RankSchedule
from driftlens.sources import SourceError
from driftlens.specs import Spec, SpecError, list_specs, load_spec
from driftlens.store import StoreMismatchError, check_store, open_store, verify_store
from driftlens.train.anchor import AnchorDriftLoss
from driftlens.train.objective import DriftObjective
from driftlens.train.tap import VisualTap

__all__ = ["AnchorDriftLoss", "ArgumentTypeError", "CaptureError", "CheckpointIdentityError", "DataError",
           "DriftError", "DriftObjective", "DriftlensError", "EnvironmentProblem", "Merge", "Probe", "ProbeError",
           "ProbeSet", "RankSchedule", "ScheduleError", "ScheduleFileError", "SelectionError", "SourceError", "Spec",
           "SpecError",
           "StoreIntegrityError", "StoreMismatchError", "UsageError", "VisualTap", "allocate_ranks", "capture",
           "check_store", "compare", "drift", "explore", "inference", "list_probe_sets", "list_specs", "load_report",
           "linear_probe", "load_spec", "merges", "metrics", "model_inputs", "open_store", "outcomes", "plot",
           "save_report", "train", "verify_store", "__version__"]


def __getattr__(name):
    # ``dl.probe`` (linear probes) was renamed ``dl.linear_probe``: ``dl.Probe`` is a probe image
    if name == "probe":
        import warnings

        warnings.warn("dl.probe was renamed dl.linear_probe (dl.Probe is a probe image)", FutureWarning,
                      stacklevel=2)
        return linear_probe
    raise AttributeError(f"module 'driftlens' has no attribute {name!r}")
