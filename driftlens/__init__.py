"""driftlens: layer-wise, calibrated drift of visual tokens in vision-language models.

The package namespace only re-exports; importing it loads no model and touches no file.
"""
from driftlens import inference, metrics
from driftlens._version import __version__
from driftlens.capture import capture
from driftlens.drift import DriftError, drift, load_report, save_report
from driftlens.inputs import model_inputs
from driftlens.probes import Probe, ProbeSet, list_probe_sets
from driftlens.ranks import RankSchedule, ScheduleError, allocate_ranks
from driftlens.specs import Spec, SpecError, list_specs, load_spec
from driftlens.store import open_store

__all__ = ["DriftError", "Probe", "ProbeSet", "RankSchedule", "ScheduleError", "Spec", "SpecError", "__version__",
           "allocate_ranks", "capture", "drift", "inference", "list_probe_sets", "list_specs", "load_report",
           "load_spec", "metrics", "model_inputs", "open_store", "save_report"]
