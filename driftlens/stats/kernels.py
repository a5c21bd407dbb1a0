"""Gaussian-mixture kernel sums, blocked: the one home of the kernel arithmetic of every MMD.

Kernel ``k(a, b) = mean over sigmas of exp(-|a - b|^2 / (2 sigma^2))`` (one bandwidth: the Gaussian
kernel). Every kernel value in driftlens is a tile of :func:`sq_dists` mapped through it:

- :func:`kernel_sum` / :func:`mmd2_unbiased`: row-blocked, differentiable sums (blocks recomputed
  in the backward pass), the unbiased MMD^2 of the anchor drift loss (``AnchorDriftLoss``);
- :func:`kernel_pass`: one streamed pass over the symmetric tiles of a pooled sample, with the
  permutation indicators' products (:func:`driftlens.stats.mmd.mmd2` and ``mmd_test``);
- :func:`paired_mmd_matrix`: the paired cluster MMD's K x K pair terms, free of cancellation (the
  report's ``mmd`` and ``expert_mmd``);
- :func:`median_sigma`: the median-heuristic bandwidth.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from driftlens.errors import UsageError
from driftlens.stats.common import bandwidths, check_inputs, subsample

MedianPairs = Literal["pooled", "reference"]
DEFAULT_BLOCK_SIZE = 2048
MEDIAN_MAX_POINTS = 2000
OFFSET_POINTS = 256


def sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [na, nb] by the expansion, clamped at 0."""
    d2 = torch.addmm((b * b).sum(1)[None, :], a, b.T, alpha=-2.0)  # [na, nb]
    return d2.add_((a * a).sum(1)[:, None]).clamp_(min=0.0)


def median_sigma(x, y=None, *, pairs: MedianPairs = "pooled", max_points: int | None = MEDIAN_MAX_POINTS,
                 seed: int = 0) -> float:
    """Median-heuristic bandwidth ``sqrt(median(d^2) / 2)``.

    Parameters
    ----------
    x, y : tensor [n, d], [m, d]
        Reference and test samples (``y`` may be omitted with ``pairs="reference"``).
    pairs : {"pooled", "reference"}
        ``"pooled"``: unique pairs ``i < j`` of ``[x; y]`` (driftlens default, symmetric in x, y).
        ``"reference"``: unique pairs of ``x`` only (alibi-detect ``MMDDrift``'s inference).
    max_points : int or None
        Above this many rows the median uses a fixed-seed random subsample of ``max_points`` rows
        (``median_max_points`` in :func:`mmd2`); None = all rows (O(N^2) memory).
    seed : int
        Seed of the subsample.

    Returns
    -------
    float
        sigma. The lower median (torch.median) is used; when it is 0 the mean of the non-zero
        squared distances is used; when all points coincide sigma is 1.0.
    """
    if pairs not in ("pooled", "reference"):
        raise UsageError(f"pairs must be 'pooled' or 'reference', got {pairs!r}")
    if pairs == "pooled" and y is None:
        raise UsageError("median_sigma(pairs='pooled') needs both x and y")
    if y is None:
        (x,) = check_inputs(x, names=["x"])
        z = x
    else:
        x, y = check_inputs(x, y, names=["x", "y"])
        z = torch.cat([x, y]) if pairs == "pooled" else x
    z = subsample(z, max_points, seed).detach()  # [k, d], input dtype (float32 or float64)
    z = z - z.mean(0, dtype=torch.float64).to(z.dtype)
    d2 = sq_dists(z, z)  # [k, k]
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    vals = d2[iu[0], iu[1]].to(torch.float64)  # [k(k-1)/2]
    med = float(vals.median())
    if med <= 0.0:
        pos = vals[vals > 0]
        med = float(pos.mean()) if pos.numel() else 2.0  # all points equal -> sigma = 1
    return math.sqrt(med / 2.0)


def gammas_of(sigma) -> tuple[float, ...]:
    """``1 / (2 sigma^2)`` for one bandwidth or each of several."""
    sigmas = (sigma,) if np.isscalar(sigma) or (torch.is_tensor(sigma) and sigma.ndim == 0) else tuple(sigma)
    if not sigmas or any(not (np.isfinite(float(s)) and float(s) > 0) for s in sigmas):
        raise UsageError(f"sigma must be finite and > 0 (one value or several), got {sigma!r}")
    return tuple(1.0 / (2.0 * float(s) ** 2) for s in sigmas)


def mixture(d2: torch.Tensor, gammas, inplace: bool = False) -> torch.Tensor:
    """The Gaussian-mixture kernel of squared distances ``d2``: the mean over ``gammas`` of ``exp(-g d2)``
    (``inplace``: one gamma overwrites ``d2``)."""
    if len(gammas) == 1:
        return d2.mul_(-gammas[0]).exp_() if inplace else torch.exp(-gammas[0] * d2)
    return sum(torch.exp(-g * d2) for g in gammas) / len(gammas)


def kernel_tile(zi, zj, gammas, offset, diagonal: bool, inplace: bool):
    """Shifted Gaussian kernel tile ``mean_s exp(-g_s d^2) - offset`` [bi, bj]; diagonal zeroed."""
    k = mixture(sq_dists(zi, zj), gammas, inplace)  # [bi, bj]
    k = k.sub_(offset) if inplace else k - offset
    if diagonal:
        if inplace:
            k.fill_diagonal_(0.0)
        else:
            k = k * (1.0 - torch.eye(k.shape[0], dtype=k.dtype, device=k.device))
    return k


def kernel_offset(z: torch.Tensor, gammas, seed: int = 0) -> float:
    """Mean off-diagonal kernel value on a small fixed-seed subsample.

    MMD^2_u is unchanged when a constant is subtracted from every off-diagonal kernel entry; doing
    so with this offset makes the entries small and centred, which keeps float32 sums accurate.
    """
    s = subsample(z.detach(), OFFSET_POINTS, seed + 1).to(torch.float64)
    k = kernel_tile(s, s, gammas, 0.0, diagonal=True, inplace=True)
    n = s.shape[0]
    return float(k.sum() / (n * (n - 1)))


def pooled_blocks(n: int, m: int, block_size: int):
    """Row blocks (start, stop, group) of the pooled [x; y]; a block never straddles x and y."""
    out = []
    for start in range(0, n, block_size):
        out.append((start, min(start + block_size, n), 0))
    for start in range(n, n + m, block_size):
        out.append((start, min(start + block_size, n + m), 1))
    return out


def kernel_pass(z, n, gammas, offset, block_size, indicators=None):
    """One streamed pass over the symmetric tiles of the pooled kernel matrix.

    Returns float64 sums ``(s_xx, s_yy, s_xy)`` of the (shifted, diagonal-free) kernel and, when
    ``indicators`` [N, B] is given, ``(KA [N, B], r [N])`` with ``KA = K0 @ A`` and ``r = K0 @ 1``.
    Memory: O(block_size^2 + N * B).
    """
    N = z.shape[0]
    blocks = pooled_blocks(n, N - n, block_size)
    inplace = not (torch.is_grad_enabled() and z.requires_grad)
    sums = [z.new_zeros((), dtype=torch.float64) for _ in range(3)]  # xx, yy, xy
    ka = r = a = None
    if indicators is not None:
        a = indicators.to(z.dtype)  # [N, B]
        ka = torch.zeros(N, a.shape[1], dtype=torch.float64, device=z.device)  # [N, B]
        r = torch.zeros(N, dtype=torch.float64, device=z.device)  # [N]
    for bi, (i0, i1, gi) in enumerate(blocks):
        zi = z[i0:i1]
        for (j0, j1, gj) in blocks[bi:]:
            diag = i0 == j0
            k = kernel_tile(zi, z[j0:j1], gammas, offset, diagonal=diag, inplace=inplace)  # [bi, bj]
            s = k.sum(dtype=torch.float64)
            if gi != gj:
                sums[2] = sums[2] + s
            else:
                sums[gi] = sums[gi] + (s if diag else 2.0 * s)
            if a is not None:
                ka[i0:i1] += (k @ a[j0:j1]).to(torch.float64)
                r[i0:i1] += k.sum(1, dtype=torch.float64)
                if not diag:
                    ka[j0:j1] += (k.T @ a[i0:i1]).to(torch.float64)
                    r[j0:j1] += k.sum(0, dtype=torch.float64)
    return sums, ka, r


def mmd_from_sums(sums, n, m):
    """Unbiased MMD^2 from the (shifted) kernel sums ``(s_xx, s_yy, s_xy)`` of :func:`kernel_pass`."""
    s_xx, s_yy, s_xy = sums
    return s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2.0 * s_xy / (n * m)


def prepare_pooled(x, y, sigma, median_pairs, median_max_points, seed):
    """Checked ``x``, ``y``, the centred pooled sample ``z`` [n + m, d], the bandwidths and their gammas."""
    x, y = check_inputs(x, y, names=["x", "y"])
    if sigma is None or (isinstance(sigma, str) and sigma == "median"):
        sig = [median_sigma(x, y, pairs=median_pairs, max_points=median_max_points, seed=seed)]
    elif isinstance(sigma, str):
        raise UsageError(f"sigma must be None, 'median', a float or a sequence of floats; got {sigma!r}")
    else:
        sig = bandwidths(sigma)
    z = torch.cat([x, y])  # [N, d]
    # translation invariance: centring reduces cancellation in |a|^2 + |b|^2 - 2 a.b
    z = z - z.mean(0, dtype=torch.float64).to(z.dtype)
    gammas = [1.0 / (2.0 * s * s) for s in sig]
    return x, y, z, sig, gammas


def paired_mmd_matrix(r: torch.Tensor, c: torch.Tensor, codes: torch.Tensor, k: int, sigma: float,
                      block_size: int = 4096, cache: dict | None = None) -> torch.Tensor:
    """Pair term of the paired cluster MMD, ``H[a, b] = <D_a, D_b>`` [K, K] float64.

    ``H[a, b] = mean over i in a, j in b of k(r_i, r_j) + k(c_i, c_j) - k(r_i, c_j) - k(c_i, r_j)``,
    ``D_a`` the difference between the kernel mean embeddings of cluster ``a``'s tokens at the
    reference (``r``) and at the checkpoint (``c``). Its U-statistic (mean over ``a != b``) is
    unbiased for the MMD^2 between the two token distributions (each cluster weighted equally),
    whatever the number of clusters.

    Computed without cancellation: with ``delta = c - r``, ``A = -gamma (d^2(r_i, c_j) - d^2(r_i, r_j))``,
    ``B = -gamma (d^2(c_i, r_j) - d^2(r_i, r_j))`` (both from ``r . delta`` products, never as a
    difference of large distances), the four-term sum per pair is exactly
    ``k(r_i, r_j) [expm1(A) expm1(B) + exp(A + B) expm1(2 gamma delta_i . delta_j)]`` where the
    shifts are small (the four kernels summed from their log values elsewhere: :func:`pair_terms`).
    A checkpoint that differs from the reference by float rounding gives pair terms of the size
    of ``|delta|^2``, not of float32 rounding of kernel values (which would not be exchangeable).

    Parameters
    ----------
    r, c : tensor [n, d]
        The same token rows at the reference and at the checkpoint.
    codes : long tensor [n]
        Cluster code (0..K-1) of each row.
    k : int
        Number of clusters K.
    sigma : float
        Gaussian kernel bandwidth: ``k(x, y) = exp(-|x - y|^2 / (2 sigma^2))``.
    block_size : int
        Tile size; memory O(block_size^2).
    cache : dict, optional
        Keeps the reference's kernel tiles between calls with the same ``r`` (one cell, several
        checkpoints).
    """
    gamma = 1.0 / (2.0 * sigma * sigma)
    delta = c - r
    dn = (delta * (c + r)).sum(1)                                     # |c_i|^2 - |r_i|^2   [n]
    out = torch.zeros(k, k, dtype=torch.float64, device=r.device)
    n = r.shape[0]
    for i0 in range(0, n, block_size):
        i1 = min(i0 + block_size, n)
        ri, di = r[i0:i1], delta[i0:i1]
        rows = torch.zeros(k, n, dtype=torch.float64, device=r.device)
        for j0 in range(0, n, block_size):
            j1 = min(j0 + block_size, n)
            rj, dj = r[j0:j1], delta[j0:j1]
            key = (i0, j0)
            krr = None if cache is None else cache.get(key)
            if krr is None:
                krr = sq_dists(ri, rj).mul_(-gamma).exp_()                             # k(r_i, r_j)
                if cache is not None:
                    cache[key] = krr
            a = (ri @ dj.T).mul_(2.0).sub_(dn[j0:j1][None, :]).mul_(gamma)       # -gamma (d2(r_i,c_j) - d2(r_i,r_j))
            b = (di @ rj.T).mul_(2.0).sub_(dn[i0:i1][:, None]).mul_(gamma)       # -gamma (d2(c_i,r_j) - d2(r_i,r_j))
            e = (di @ dj.T).mul_(2.0 * gamma)                                      # 2 gamma delta_i . delta_j
            t = pair_terms(krr, a, b, e)
            rows[:, j0:j1] += torch.zeros(k, j1 - j0, dtype=t.dtype, device=t.device).index_add_(
                0, codes[i0:i1], t).to(torch.float64)
        out += torch.zeros(k, k, dtype=torch.float64, device=r.device).index_add_(1, codes, rows)
    counts = torch.bincount(codes, minlength=k).to(torch.float64)
    return out / (counts[:, None] * counts[None, :]).clamp(min=1.0)


def pair_terms(krr: torch.Tensor, a: torch.Tensor, b: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``k(r_i,r_j) + k(c_i,c_j) - k(r_i,c_j) - k(c_i,r_j)`` from ``k(r_i,r_j)`` and the exponent shifts.

    ``k(r_i,c_j) = krr e^a``, ``k(c_i,r_j) = krr e^b``, ``k(c_i,c_j) = krr e^(a+b+e)``. Where the
    shifts are small (|a|, |b|, |e| < 1: the checkpoint is near the reference) the sum is
    ``krr [expm1(a) expm1(b) + e^(a+b) expm1(e)]``, free of cancellation; elsewhere the four
    kernels are summed directly from their (never positive) log values, free of overflow.
    """
    small = (a.abs() < 1) & (b.abs() < 1) & (e.abs() < 1)
    ac, bc, ec = a.clamp(-1, 1), b.clamp(-1, 1), e.clamp(-1, 1)
    near = torch.expm1(ac).mul_(torch.expm1(bc)).add_(torch.exp(ac + bc).mul_(torch.expm1(ec))).mul_(krr)
    if bool(small.all()):
        return near
    log_k = torch.log(krr)
    far = krr + torch.exp(log_k + a + b + e) - torch.exp(log_k + a) - torch.exp(log_k + b)
    return torch.where(small, near, far)


def block_kernel_sum(xb: torch.Tensor, y: torch.Tensor, gammas: tuple[float, ...],
                     diag_from: int | None) -> torch.Tensor:
    """``sum_{i, a} k(xb_i, y_a)`` over one row block, ``k`` the mean of ``exp(-gamma |.|^2)`` over
    ``gammas``; ``diag_from`` = index of ``xb``'s first row in ``y`` when pairs (i, i) are to be
    left out (within-sample sums)."""
    k = mixture(sq_dists(xb, y), gammas)                    # [b, n]
    if diag_from is not None:
        rows = torch.arange(xb.shape[0], device=xb.device)
        k = k.index_put((rows, rows + diag_from), torch.zeros((), dtype=k.dtype, device=k.device))
    return k.sum()


def kernel_sum(x: torch.Tensor, y: torch.Tensor, sigma, within: bool = False,
               block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """``sum k(x_i, y_a)`` over all pairs (``within=True``: ``y is x`` and pairs ``i == a`` are left out).

    ``k`` is the Gaussian kernel ``exp(-|x - y|^2 / (2 sigma^2))``, or with several ``sigma`` the
    mean of theirs. Differentiable: rows of ``x`` are processed in blocks of ``block_size``; when
    ``x`` needs gradients and there is more than one block, each block is recomputed in the backward
    pass (checkpointing), so the kernel tiles of all blocks are never held at once.
    """
    from torch.utils.checkpoint import checkpoint

    gammas = gammas_of(sigma)
    m = x.shape[0]
    grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    total = x.new_zeros(())
    for start in range(0, m, block_size):
        xb = x[start:start + block_size]                    # [b, d]
        diag = start if within else None
        if grad and m > block_size:
            part = checkpoint(block_kernel_sum, xb, y, gammas, diag, use_reentrant=False)
        else:
            part = block_kernel_sum(xb, y, gammas, diag)
        total = total + part
    return total


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, sigma, yy: torch.Tensor | None = None,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """Differentiable unbiased MMD^2 between rows of ``x`` [m, d] and ``y`` [n, d] with fixed bandwidth(s).

    ``sigma``: one bandwidth, or several (the kernel is the mean of their Gaussian kernels).
    ``yy`` may pass the precomputed mean of ``k(y_a, y_b)`` over ``a != b`` (constant anchors: the
    anchor drift loss computes it once).
    """
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise UsageError(f"MMD^2 needs at least 2 rows per side, got {m} current and {n} anchor rows")
    xx = kernel_sum(x, x, sigma, within=True, block_size=block_size) / (m * (m - 1))
    if yy is None:
        yy = kernel_sum(y, y, sigma, within=True, block_size=block_size) / (n * (n - 1))
    xy = kernel_sum(x, y, sigma, block_size=block_size) / (m * n)
    return xx + yy.to(xx.dtype) - 2.0 * xy
