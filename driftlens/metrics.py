"""Drift metrics between two sets of vectors (tokens x features): a facade over :mod:`driftlens.stats`.

The conventions (kernel, unbiased MMD^2, median heuristic, Sinkhorn cost, sliced Wasserstein) are
stated once, in :mod:`driftlens.stats.mmd` and the other family modules.

The functions live in the metric families of :mod:`driftlens.stats` (kernels and MMD in
:mod:`~driftlens.stats.kernels` / :mod:`~driftlens.stats.mmd`, transport in
:mod:`~driftlens.stats.transport`, gap and MIR in :mod:`~driftlens.stats.crossmodal`, shifts in
:mod:`~driftlens.stats.shift`); this module re-exports the public ones (``dl.metrics.*``).
"""
from __future__ import annotations

from driftlens.stats.crossmodal import mir, mir_total, modality_gap, modality_gap_vector
from driftlens.stats.kernels import DEFAULT_BLOCK_SIZE, MEDIAN_MAX_POINTS, MedianPairs, median_sigma
from driftlens.stats.mmd import MMDTestResult, Sigma, mmd2, mmd2_loss, mmd_test
from driftlens.stats.shift import Shift, TokenShift, shift, token_shift
from driftlens.stats.transport import SINKHORN_MAX_POINTS, gaussian_w2, sinkhorn, sliced_wasserstein

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MEDIAN_MAX_POINTS",
    "MMDTestResult",
    "MedianPairs",
    "SINKHORN_MAX_POINTS",
    "Shift",
    "Sigma",
    "TokenShift",
    "gaussian_w2",
    "median_sigma",
    "mir",
    "mir_total",
    "mmd2",
    "mmd2_loss",
    "mmd_test",
    "modality_gap",
    "modality_gap_vector",
    "shift",
    "sinkhorn",
    "sliced_wasserstein",
    "token_shift",
]
