"""Test fixtures, like ``xarray.testing``: synthetic clustered data, stores and reports
(:mod:`~driftlens.testing.synthetic`) and tiny random-weight models of every spec'd family
(:mod:`~driftlens.testing.tiny`). This ``__init__`` only re-exports.
"""
from driftlens.testing import tiny
from driftlens.testing.synthetic import (
    ClusteredSpec,
    clustered_pair,
    make_report,
    make_store,
    pvalue_calibration,
    shift_vector,
    true_mmd2,
)

__all__ = ["ClusteredSpec", "clustered_pair", "make_report", "make_store", "pvalue_calibration", "shift_vector",
           "tiny", "true_mmd2"]
