"""Drift metrics between two sets of vectors (tokens x features).

Pure functions on torch tensors (any device, float32 or float64; float16/bfloat16 are computed in
float32). Inputs are 2-D ``[n_tokens, n_features]``; numpy arrays are accepted and converted.
Results come back as Python floats (or tensors on the input's device where a function says so).

Conventions (DESIGN.md, "Conventions"):

- Kernel: Gaussian RBF ``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))``. With several sigmas the kernel
  is the *mean* of the individual kernels (alibi-detect's convention).
- MMD^2 is the unbiased estimator (kernel diagonal excluded)::

      MMD^2_u = sum_{i!=j} k(x_i,x_j) / (n(n-1)) + sum_{i!=j} k(y_i,y_j) / (m(m-1))
                - 2 sum_{i,j} k(x_i,y_j) / (n m)

  It can be negative (it is an unbiased estimate of a non-negative number).
- Median heuristic: ``sigma = sqrt(median(d^2) / 2)`` where the median is the *lower* median
  (torch.median) of the squared distances over unique off-diagonal pairs ``i < j``. With
  ``pairs="pooled"`` (the default, DESIGN.md) the pairs are taken over the pooled sample
  ``[x; y]``, so sigma is a symmetric function of the pooled sample and the permutation test is
  exact. ``pairs="reference"`` uses the reference pairs only and reproduces alibi-detect's
  ``MMDDrift`` sigma inference exactly (its ``sigma_median`` is called on ``(x_ref, x_ref)`` and picks
  element ``n + (n^2 - n) // 2 - 1`` of the sorted distances including the n zero diagonal
  entries, i.e. the lower median of the unique pairs). Above ``median_max_points`` rows the
  median is computed on a fixed-seed random subsample of that many rows.
  Fallback when the median is 0 (more than half of the pairs coincide): the mean of the non-zero
  squared distances is used instead; when all points coincide ``sigma = 1.0``.
- Sinkhorn: geomloss ``SamplesLoss("sinkhorn", p=2)`` uses the cost ``|a - b|^2 / 2``, so the
  debiased divergence tends to ``W2^2 / 2`` as ``blur -> 0``.
- Sliced Wasserstein: ``(mean over projections of W_p^p)^(1/p)`` as POT's
  ``ot.sliced_wasserstein_distance``.
- ``gaussian_w2`` returns W2 (not W2^2); ``mir`` returns the Frechet distance, which *is* a squared
  W2 between the fitted Gaussians (Huang et al. call it FD, as in FID).

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
