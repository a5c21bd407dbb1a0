"""Maximum mean discrepancy: the two-sample MMD^2, its permutation test, the paired cluster MMD and its cell.

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
- The report's ``mmd`` is the paired cluster MMD^2 (:func:`paired_mmd`, :func:`cell`): a
  U-statistic over clusters of :func:`driftlens.stats.kernels.paired_mmd_matrix`'s pair terms.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

from driftlens.errors import DriftError, check_count
from driftlens.stats.common import generator
from driftlens.stats.kernels import (
    DEFAULT_BLOCK_SIZE,
    MEDIAN_MAX_POINTS,
    MedianPairs,
    kernel_offset,
    kernel_pass,
    median_sigma,
    mmd_from_sums,
    paired_mmd_matrix,
    prepare_pooled,
)
from driftlens.stats.resampling import Inference, Rows, draws, paired_centred, u_statistic_draws
from driftlens.stats.settings import Cell, Settings

Sigma = Literal["median"] | float | Sequence[float] | None   # a kernel bandwidth, or several


def mmd2(x, y, sigma: Sigma = None, *, block_size: int = DEFAULT_BLOCK_SIZE, median_pairs: MedianPairs = "pooled",
         median_max_points: int | None = MEDIAN_MAX_POINTS, seed: int = 0) -> float:
    """Unbiased MMD^2 with a Gaussian kernel, computed block by block.

    Parameters
    ----------
    x : tensor [n, d]
        Reference sample (n >= 2).
    y : tensor [m, d]
        Test sample (m >= 2).
    sigma : None, "median", float or sequence of floats
        Kernel bandwidth(s). None/"median": median heuristic (module docstring). Several values:
        the kernel is the mean of the Gaussian kernels (alibi-detect's convention).
    block_size : int
        Tile size; memory is O(block_size^2), never O((n + m)^2).
    median_pairs : {"pooled", "reference"}
        Which pairs the median heuristic uses (see :func:`median_sigma`).
    median_max_points : int or None
        Fixed-seed subsample size for the median heuristic.
    seed : int
        Seed of the median subsample.

    Returns
    -------
    float
        The estimate; the sigma the median heuristic picks is :func:`median_sigma` with the same
        ``median_pairs``, ``median_max_points`` and ``seed``. :func:`mmd2_loss` is the same estimate
        as a differentiable tensor.
    """
    with torch.no_grad():
        return float(mmd2_loss(x, y, sigma, block_size=block_size, median_pairs=median_pairs,
                               median_max_points=median_max_points, seed=seed))


def mmd2_loss(x, y, sigma: Sigma = None, *, block_size: int = DEFAULT_BLOCK_SIZE,
              median_pairs: MedianPairs = "pooled", median_max_points: int | None = MEDIAN_MAX_POINTS,
              seed: int = 0) -> torch.Tensor:
    """:func:`mmd2` as a 0-d float64 tensor on the input's device, differentiable w.r.t. ``x`` and ``y``.

    A sigma from the median heuristic is treated as a constant. Parameters as :func:`mmd2`.
    """
    block_size = check_count("block_size", block_size)
    x, y, z, _, gammas = prepare_pooled(x, y, sigma, median_pairs, median_max_points, seed)
    offset = kernel_offset(z, gammas, seed)
    sums, _, _ = kernel_pass(z, x.shape[0], gammas, offset, block_size)
    return mmd_from_sums(sums, x.shape[0], y.shape[0])


class MMDTestResult(NamedTuple):
    """Result of :func:`mmd_test`.

    ``statistic`` is MMD^2_u (identical to :func:`mmd2` with the same arguments); ``p_value`` is
    ``(1 + #{null >= statistic}) / (B + 1)``; ``sigma`` the bandwidth(s) used; ``null`` the B
    permuted statistics (float64 numpy array), ``null_mean``/``null_std`` their mean and std.
    """

    statistic: float
    p_value: float
    sigma: tuple
    n_permutations: int
    null_mean: float
    null_std: float
    null: np.ndarray


def permutation_indicators(n: int, m: int, n_permutations: int, seed: int) -> torch.Tensor:
    """[n + m, B] bool; column b marks the rows that permutation b assigns to the x group."""
    g = generator(seed)
    a = torch.zeros(n + m, n_permutations, dtype=torch.bool)
    for b in range(n_permutations):
        a[torch.randperm(n + m, generator=g)[:n], b] = True
    return a


def mmd_test(x, y, n_permutations: int = 1000, sigma=None, seed: int = 0, *,
             block_size: int = DEFAULT_BLOCK_SIZE, median_pairs: MedianPairs = "pooled",
             median_max_points: int | None = MEDIAN_MAX_POINTS) -> MMDTestResult:
    """Permutation two-sample test on the unbiased MMD^2, all permutations in one kernel pass.

    For pooled ``z = [x; y]`` (N = n + m rows), kernel ``K0`` with zero diagonal and an
    assignment indicator ``a`` (1 for rows put in the x group),
    ``MMD^2_u(a) = q c1 - 2 (a.r) c2 + T / (m(m-1))`` with ``q = a^T K0 a``, ``r = K0 1``,
    ``T = 1^T K0 1``, ``c1 = 1/(n(n-1)) + 1/(m(m-1)) + 2/(nm)``, ``c2 = 1/(m(m-1)) + 1/(nm)``.
    ``K0 @ A`` for all B indicator columns is accumulated tile by tile while the kernel is built
    once, so B = 1000 permutations cost about one extra matrix product per tile.
    Memory O(block_size^2 + N * B). The observed statistic uses the direct sums (same code as
    :func:`mmd2`, same value).

    Parameters
    ----------
    x, y : tensor [n, d], [m, d]
    n_permutations : int
        B >= 1.
    sigma : None, "median", float or sequence
        As in :func:`mmd2`.
    seed : int
        Seeds the permutations (and the median subsample).
    block_size, median_pairs, median_max_points
        As in :func:`mmd2`.

    Returns
    -------
    MMDTestResult
    """
    n_permutations = check_count("n_permutations", n_permutations)
    block_size = check_count("block_size", block_size)
    with torch.no_grad():
        x, y, z, sig, gammas = prepare_pooled(x, y, sigma, median_pairs, median_max_points, seed)
        n, m = x.shape[0], y.shape[0]
        offset = kernel_offset(z, gammas, seed)
        ind = permutation_indicators(n, m, n_permutations, seed).to(z.device)  # [N, B]
        sums, ka, r = kernel_pass(z, n, gammas, offset, block_size, indicators=ind)
        stat = mmd_from_sums(sums, n, m)
        a = ind.to(torch.float64)  # [N, B]
        q = (a * ka).sum(0)  # [B]
        ar = a.T @ r  # [B]
        tot = r.sum()
        c1 = 1.0 / (n * (n - 1)) + 1.0 / (m * (m - 1)) + 2.0 / (n * m)
        c2 = 1.0 / (m * (m - 1)) + 1.0 / (n * m)
        null = q * c1 - 2.0 * ar * c2 + tot / (m * (m - 1))  # [B]
        # tolerance for rounding between the direct sums and the quadratic forms (ties, e.g.
        # identical points, must not turn into spurious small p-values)
        scale = (abs(sums[0]) / (n * (n - 1)) + abs(sums[1]) / (m * (m - 1))
                 + 2.0 * abs(sums[2]) / (n * m))
        tol = 100.0 * torch.finfo(z.dtype).eps * float(scale)
        stat_f = float(stat)
        null_np = null.cpu().numpy()
        k = int((null_np >= stat_f - tol).sum())
    return MMDTestResult(
        statistic=stat_f,
        p_value=(k + 1) / (n_permutations + 1),
        sigma=tuple(sig),
        n_permutations=int(n_permutations),
        null_mean=float(null_np.mean()),
        null_std=float(null_np.std(ddof=1)) if n_permutations > 1 else 0.0,
        null=null_np,
    )


def paired_mmd(r, c, clusters, sigma=None, n_permutations: int = 1000, n_bootstrap: int = 1000,
               level: float = 0.95, seed: int = 0) -> Inference:
    """Paired cluster MMD^2 between the same token rows at two checkpoints, with inference.

    Parameters
    ----------
    r, c : tensor [n, d]
        The same tokens (same row order) at the reference and at the checkpoint.
    clusters : sequence [n]
        Cluster label of each row (the unit of independence).
    sigma : float, optional
        Kernel bandwidth; default the median heuristic over ``r``'s pairs.
    n_permutations, n_bootstrap : int
        Cluster sign flips and cluster-bootstrap draws.
    level : float
        Interval coverage.
    seed : int
        Sign flips use ``seed``, bootstrap draws ``seed + 1`` (as :func:`driftlens.drift`).

    Returns
    -------
    Inference(effect, lo, hi, p, n_clusters)
        ``effect`` is the U-statistic over distinct clusters (see :func:`paired_mmd_matrix`).
    """
    r, c = paired_centred(r, c, clusters, "paired_mmd")
    sigma = median_sigma(r, pairs="reference", seed=seed) if sigma is None else float(sigma)
    rows = Rows(np.arange(r.shape[0]), np.asarray(clusters), r.device)
    settings = Settings(n_permutations=n_permutations, n_bootstrap=n_bootstrap, level=level, seed=seed)
    return cell("mmd", Cell(r, c, rows, sigma, where="paired_mmd"), settings)[0]


def cell(name: str, x: Cell, s: Settings) -> tuple[Inference, np.ndarray]:
    """The report's kernel cell: paired cluster MMD^2 with its sign-flip p-value and bootstrap interval.

    ``x.r``, ``x.c`` [n, d] the cell's centred rows, ``x.sigma`` the bandwidth, ``x.cache`` the
    reference's kernel tiles (kept across a task's checkpoints). Returns ``(Inference, draws [B])``: the
    bootstrap draws, paired with every other cell's by the report's counts (seed ``s.seed + 1``).
    """
    rows = x.rows
    h = paired_mmd_matrix(x.r, x.c, rows.codes, rows.k, x.sigma, cache=x.cache)
    try:
        return u_statistic_draws(h.cpu(), draws("flips", rows.k, s.n_permutations, s.seed),
                                 draws("counts", rows.k, s.n_bootstrap, s.seed), s.level)
    except FloatingPointError as exc:
        raise DriftError(f"{name} at {x.where}: {exc} (sigma {x.sigma:.4g}); please report this with the "
                         f"store") from exc
