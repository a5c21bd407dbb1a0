"""driftlens: layer-wise, null-calibrated drift of visual tokens in vision-language models.

The package namespace only re-exports; importing it loads no model and touches no file.
"""
from driftlens import metrics
from driftlens._version import __version__
from driftlens.capture import capture
from driftlens.drift import drift, load_report, save_report
from driftlens.store import open_store

__all__ = ["__version__", "capture", "drift", "load_report", "metrics", "open_store", "save_report"]
