"""Test fixtures, like ``xarray.testing``: synthetic clustered data, stores and reports
(:mod:`~driftlens.testing.synthetic`) and tiny random-weight models of every spec'd family
(:mod:`~driftlens.testing.tiny`). This ``__init__`` only re-exports.
"""
from driftlens.testing import tiny
from driftlens.testing.synthetic import (
    ClusteredSpec,
    RunsSpec,
    clustered_pair,
    make_report,
    make_store,
    pvalue_calibration,
    run_reports,
    shift_vector,
    simulate_contrasts,
    simulate_runs,
    true_mmd2,
)

__all__ = ["ClusteredSpec", "RunsSpec", "clustered_pair", "make_report", "make_store", "pvalue_calibration",
           "run_reports", "shift_vector", "simulate_contrasts", "simulate_runs", "tiny", "true_mmd2"]
