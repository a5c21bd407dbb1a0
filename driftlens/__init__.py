"""driftlens: layer-wise, null-calibrated drift of visual tokens in vision-language models.

The package namespace only re-exports; importing it loads no model and touches no file.
"""
from driftlens._version import __version__

__all__ = ["__version__"]
