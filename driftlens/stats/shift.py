"""Paired displacement of the same token rows between two checkpoints, and the report's ``paired_shift``."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from driftlens.stats.common import check_inputs
from driftlens.stats.resampling import (
    Inference,
    Rows,
    cluster_sums,
    draws,
    gram_rows,
    paired_centred,
    percentile_interval,
    quadratic_u,
    row_chunks,
)
from driftlens.stats.settings import Cell, Settings


class Shift(NamedTuple):
    """Paired displacement of token rows: mean cosine distance ``1 - cos`` and mean L2 distance."""

    cosine: float
    l2: float


class TokenShift(NamedTuple):
    """Per-token displacement: cosine distances and L2 distances, float64 tensors ``[n]``."""

    cosine: torch.Tensor
    l2: torch.Tensor


def shift(a, b) -> Shift:
    """Mean paired displacement of the same token rows ``a``, ``b`` ``[n, d]`` at two checkpoints:
    the means of :func:`token_shift`'s per-token distances, as ``Shift(cosine, l2)`` floats."""
    per = token_shift(a, b)
    return Shift(cosine=float(per.cosine.mean()), l2=float(per.l2.mean()))


def token_shift(a, b) -> TokenShift:
    """Paired displacement of the same token rows between two checkpoints.

    Parameters
    ----------
    a, b : tensor [n, d]
        The same tokens (same row order) at two checkpoints.

    Returns
    -------
    TokenShift(cosine, l2)
        Float64 tensors ``[n]``. Cosine distance convention for zero rows: 0 when both rows are
        zero, 1 when only one is.
    """
    a, b = check_inputs(a, b, names=["a", "b"], min_rows=1, same_rows=True)
    with torch.no_grad():
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        na, nb = a64.norm(dim=1), b64.norm(dim=1)  # [n]
        denom = na * nb
        cos = torch.where(denom > 0, (a64 * b64).sum(1) / denom.clamp(min=1e-300),
                          torch.where((na == 0) & (nb == 0), 1.0, 0.0).to(a64))
        cosd = (1.0 - cos).clamp(min=0.0, max=2.0)  # [n]
        l2 = (a64 - b64).norm(dim=1)  # [n]
    return TokenShift(cosine=cosd, l2=l2)


def paired_shift_terms(r: torch.Tensor, c: torch.Tensor, codes: torch.Tensor, k: int):
    """Per-cluster terms of the paired shift.

    Returns
    -------
    disp : tensor [K] float64
        Mean over the cluster's rows of ``|c_i - r_i|^2``.
    pair : tensor [K, K] float64
        ``mean over i in a, j in b of |r_i - r_j|^2`` (used for ``a != b`` only).
    """
    codes = codes.to(r.device)
    f64 = dict(dtype=torch.float64, device=r.device)
    disp, mu, m2 = torch.zeros(k, **f64), torch.zeros(k, r.shape[1], **f64), torch.zeros(k, **f64)
    for s, e in row_chunks(*r.shape):                                  # float64, a chunk of rows at a time
        r64, c64, cc = r[s:e].to(torch.float64), c[s:e].to(torch.float64), codes[s:e]
        disp += cluster_sums((c64 - r64).pow(2).sum(1), cc, k)          # [K]
        mu += cluster_sums(r64, cc, k)                                  # [K, d]
        m2 += cluster_sums(r64.pow(2).sum(1), cc, k)                    # [K]
    n = cluster_sums(torch.ones(codes.shape[0], **f64), codes, k).clamp(min=1.0)
    disp, mu, m2 = disp / n, mu / n[:, None], m2 / n                    # cluster means
    pair = m2[:, None] + m2[None, :] - 2.0 * gram_rows(mu)              # [K, K]
    return disp.cpu(), pair.cpu()


def shift_estimates(disp: torch.Tensor, pair: torch.Tensor, counts: torch.Tensor) -> np.ndarray:
    """The paired shift at all-ones weights (first entry) and at each bootstrap column of ``counts``.

    ``sqrt(weighted mean of disp / weighted U-statistic of pair)``.
    """
    k = disp.shape[0]
    w = torch.cat([torch.ones(k, 1, dtype=torch.float64), counts.to(torch.float64)], 1)   # [K, 1 + B]
    num = (w * disp[:, None]).sum(0) / w.sum(0)
    den = quadratic_u(pair, w)
    return torch.sqrt(num.clamp(min=0) / den).numpy()


def paired_shift(r, c, clusters, n_bootstrap: int = 1000, level: float = 0.95, seed: int = 0):
    """Paired token displacement relative to the spread between clusters, with its interval.

    ``sqrt(E|c_i - r_i|^2 / E_{a != b}|r_i - r_j|^2)`` (clusters weighted equally): how far a
    token moved between the reference (``r``) and the checkpoint (``c``), in units of how far
    apart tokens of different clusters are at the reference.

    Returns
    -------
    (effect, lo, hi) : floats
        Bootstrap draws use ``seed + 1`` (as :func:`driftlens.drift`).
    """
    r, c = paired_centred(r, c, clusters, "paired_shift")
    rows = Rows(np.arange(r.shape[0]), np.asarray(clusters), r.device)
    inf, _ = cell("paired_shift", Cell(r, c, rows, float("nan")),
                  Settings(n_bootstrap=n_bootstrap, level=level, seed=seed))
    return inf.effect, inf.lo, inf.hi


def cell(name: str, x: Cell, s: Settings) -> tuple[Inference, np.ndarray]:
    """The report's paired cell: the paired shift and its cluster-bootstrap interval (``p`` NaN: a
    deterministic model's displacement has no sampling null). Returns ``(Inference, draws [B])``."""
    rows = x.rows
    est = shift_estimates(*paired_shift_terms(x.r, x.c, rows.codes, rows.k),
                          draws("counts", rows.k, s.n_bootstrap, s.seed))
    lo, hi = percentile_interval(est[1:], s.level)
    return Inference(float(est[0]), lo, hi, float("nan"), rows.k), est[1:]
