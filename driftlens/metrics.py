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
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

from driftlens.errors import ArgumentTypeError, UsageError, check_count

__all__ = [
    "MMDTestResult",
    "Shift",
    "gaussian_w2",
    "median_sigma",
    "mir",
    "mir_total",
    "TokenShift",
    "mmd2",
    "mmd2_loss",
    "mmd_test",
    "modality_gap",
    "modality_gap_vector",
    "shift",
    "token_shift",
    "sinkhorn",
    "sliced_wasserstein",
]

Sigma = Literal["median"] | float | Sequence[float] | None   # a kernel bandwidth, or several
MedianPairs = Literal["pooled", "reference"]

DEFAULT_BLOCK_SIZE = 2048
MEDIAN_MAX_POINTS = 2000
SINKHORN_MAX_POINTS = 2048
_OFFSET_POINTS = 256


# ----------------------------------------------------------------------------- validation


def _as_tensor(a, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    raise ArgumentTypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(a).__name__}")


def _bad_rows(a: torch.Tensor, limit: int = 5) -> str:
    bad = (~torch.isfinite(a)).any(dim=1).nonzero().flatten()
    shown = ", ".join(str(int(i)) for i in bad[:limit].tolist())
    more = f" (and {bad.numel() - limit} more)" if bad.numel() > limit else ""
    return f"{bad.numel()} row(s) with NaN/Inf, first at rows [{shown}]{more}"


def _check(*arrays, names: Sequence[str] | None = None, min_rows: int = 2, same_rows: bool = False):
    """Validate and harmonise metric inputs; the one shared validation helper.

    Each input must be 2-D ``[rows, features]``, floating (integers are converted), finite, have at
    least ``min_rows`` rows; all inputs must share the feature size and device (and the row count
    when ``same_rows``). Returns the tensors promoted to one floating dtype (float16/bfloat16 ->
    float32). Raises ``ValueError``/``TypeError`` naming the offending input.
    """
    names = list(names) if names is not None else [f"input {i}" for i in range(len(arrays))]
    ts = [_as_tensor(a, n) for a, n in zip(arrays, names)]
    for t, n in zip(ts, names):
        if t.dim() != 2:
            raise UsageError(f"{n}: expected a 2-D tensor [rows, features], got shape {tuple(t.shape)}")
        if t.is_complex():
            raise ArgumentTypeError(f"{n}: complex tensors are not supported (dtype {t.dtype})")
        if t.shape[0] < min_rows:
            raise UsageError(f"{n}: needs at least {min_rows} rows (tokens), got {t.shape[0]}")
        if t.shape[1] < 1:
            raise UsageError(f"{n}: has no features (shape {tuple(t.shape)})")
    d0 = ts[0].shape[1]
    for t, n in zip(ts[1:], names[1:]):
        if t.shape[1] != d0:
            raise UsageError(
                f"feature sizes differ: {names[0]} has {d0} features, {n} has {t.shape[1]}")
        if t.device != ts[0].device:
            raise UsageError(f"devices differ: {names[0]} on {ts[0].device}, {n} on {t.device}")
    if same_rows:
        for t, n in zip(ts[1:], names[1:]):
            if t.shape[0] != ts[0].shape[0]:
                raise UsageError(f"paired metric needs the same rows: {names[0]} has "
                                 f"{ts[0].shape[0]} rows, {n} has {t.shape[0]}")
    dtype = torch.float32
    for t in ts:
        if t.dtype == torch.float64:
            dtype = torch.float64
    out = []
    for t, n in zip(ts, names):
        t = t.to(dtype)
        if not bool(torch.isfinite(t).all()):
            raise UsageError(f"{n}: {_bad_rows(t)}")
        out.append(t)
    return out


def _sigmas(sigma) -> list[float]:
    if isinstance(sigma, torch.Tensor):
        vals = [float(s) for s in sigma.detach().reshape(-1).cpu().tolist()]
    elif isinstance(sigma, np.ndarray):
        vals = [float(s) for s in sigma.reshape(-1).tolist()]
    elif isinstance(sigma, (list, tuple)):
        vals = [float(s) for s in sigma]
    else:
        vals = [float(sigma)]
    if not vals:
        raise UsageError("sigma: empty sequence")
    for s in vals:
        if not math.isfinite(s) or s <= 0:
            raise UsageError(f"sigma must be finite and > 0, got {s}")
    return vals


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _subsample(a: torch.Tensor, k: int | None, seed: int) -> torch.Tensor:
    """Fixed-seed subsample of at most ``k`` rows (rows in random order); all rows when k is None."""
    if k is None or a.shape[0] <= k:
        return a
    idx = torch.randperm(a.shape[0], generator=_generator(seed))[:k].to(a.device)
    return a[idx]


# ----------------------------------------------------------------------------- kernel helpers


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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
        (x,) = _check(x, names=["x"])
        z = x
    else:
        x, y = _check(x, y, names=["x", "y"])
        z = torch.cat([x, y]) if pairs == "pooled" else x
    z = _subsample(z, max_points, seed).detach()  # [k, d], input dtype (float32 or float64)
    z = z - z.mean(0, dtype=torch.float64).to(z.dtype)
    d2 = _sq_dists(z, z)  # [k, k]
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    vals = d2[iu[0], iu[1]].to(torch.float64)  # [k(k-1)/2]
    med = float(vals.median())
    if med <= 0.0:
        pos = vals[vals > 0]
        med = float(pos.mean()) if pos.numel() else 2.0  # all points equal -> sigma = 1
    return math.sqrt(med / 2.0)


def _kernel_tile(zi, zj, gammas, offset, diagonal: bool, inplace: bool):
    """Shifted Gaussian kernel tile ``mean_s exp(-g_s d^2) - offset`` [bi, bj]; diagonal zeroed."""
    d2 = _sq_dists(zi, zj)  # [bi, bj]
    if len(gammas) == 1:
        k = d2.mul_(-gammas[0]).exp_() if inplace else torch.exp(-gammas[0] * d2)
    else:
        k = sum(torch.exp(-g * d2) for g in gammas) / len(gammas)
    k = k.sub_(offset) if inplace else k - offset
    if diagonal:
        if inplace:
            k.fill_diagonal_(0.0)
        else:
            k = k * (1.0 - torch.eye(k.shape[0], dtype=k.dtype, device=k.device))
    return k


def _kernel_offset(z: torch.Tensor, gammas, seed: int = 0) -> float:
    """Mean off-diagonal kernel value on a small fixed-seed subsample.

    MMD^2_u is unchanged when a constant is subtracted from every off-diagonal kernel entry; doing
    so with this offset makes the entries small and centred, which keeps float32 sums accurate.
    """
    s = _subsample(z.detach(), _OFFSET_POINTS, seed + 1).to(torch.float64)
    k = _kernel_tile(s, s, gammas, 0.0, diagonal=True, inplace=True)
    n = s.shape[0]
    return float(k.sum() / (n * (n - 1)))


def _blocks(n: int, m: int, block_size: int):
    """Row blocks (start, stop, group) of the pooled [x; y]; a block never straddles x and y."""
    out = []
    for start in range(0, n, block_size):
        out.append((start, min(start + block_size, n), 0))
    for start in range(n, n + m, block_size):
        out.append((start, min(start + block_size, n + m), 1))
    return out


def _kernel_pass(z, n, gammas, offset, block_size, indicators=None):
    """One streamed pass over the symmetric tiles of the pooled kernel matrix.

    Returns float64 sums ``(s_xx, s_yy, s_xy)`` of the (shifted, diagonal-free) kernel and, when
    ``indicators`` [N, B] is given, ``(KA [N, B], r [N])`` with ``KA = K0 @ A`` and ``r = K0 @ 1``.
    Memory: O(block_size^2 + N * B).
    """
    N = z.shape[0]
    blocks = _blocks(n, N - n, block_size)
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
            k = _kernel_tile(zi, z[j0:j1], gammas, offset, diagonal=diag, inplace=inplace)  # [bi, bj]
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


def _mmd_from_sums(sums, n, m):
    s_xx, s_yy, s_xy = sums
    return s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2.0 * s_xy / (n * m)


def _prepare(x, y, sigma, median_pairs, median_max_points, seed):
    x, y = _check(x, y, names=["x", "y"])
    if sigma is None or (isinstance(sigma, str) and sigma == "median"):
        sig = [median_sigma(x, y, pairs=median_pairs, max_points=median_max_points, seed=seed)]
    elif isinstance(sigma, str):
        raise UsageError(f"sigma must be None, 'median', a float or a sequence of floats; got {sigma!r}")
    else:
        sig = _sigmas(sigma)
    z = torch.cat([x, y])  # [N, d]
    # translation invariance: centring reduces cancellation in |a|^2 + |b|^2 - 2 a.b
    z = z - z.mean(0, dtype=torch.float64).to(z.dtype)
    gammas = [1.0 / (2.0 * s * s) for s in sig]
    return x, y, z, sig, gammas


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
    x, y, z, _, gammas = _prepare(x, y, sigma, median_pairs, median_max_points, seed)
    offset = _kernel_offset(z, gammas, seed)
    sums, _, _ = _kernel_pass(z, x.shape[0], gammas, offset, block_size)
    return _mmd_from_sums(sums, x.shape[0], y.shape[0])


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


def _permutation_indicators(n: int, m: int, n_permutations: int, seed: int) -> torch.Tensor:
    """[n + m, B] bool; column b marks the rows that permutation b assigns to the x group."""
    g = _generator(seed)
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
        x, y, z, sig, gammas = _prepare(x, y, sigma, median_pairs, median_max_points, seed)
        n, m = x.shape[0], y.shape[0]
        offset = _kernel_offset(z, gammas, seed)
        ind = _permutation_indicators(n, m, n_permutations, seed).to(z.device)  # [N, B]
        sums, ka, r = _kernel_pass(z, n, gammas, offset, block_size, indicators=ind)
        stat = _mmd_from_sums(sums, n, m)
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


# ----------------------------------------------------------------------------- transport


def sinkhorn(x, y, blur: float = 0.05, p: int = 2, scaling: float = 0.9, *,
             max_points: int | None = SINKHORN_MAX_POINTS, seed: int = 0,
             backend: Literal["tensorized", "online", "multiscale"] = "tensorized") -> float:
    """Debiased Sinkhorn divergence (geomloss ``SamplesLoss("sinkhorn")``), uniform weights.

    Parameters
    ----------
    x, y : tensor [n, d], [m, d]
    blur, p, scaling
        Passed to geomloss. With p = 2 the ground cost is ``|a - b|^2 / 2``, so the value tends to
        ``W2^2 / 2`` as ``blur -> 0`` (and to half an energy-distance-like quantity as blur grows).
    max_points : int or None
        The dense ("tensorized") backend keeps three N x M cost matrices; on 2 CPU cores at
        d = 1024 it took 2.6 s (1000 points per side), 6.4 s (2000) and 44 s (4000). Each side
        above ``max_points`` is therefore replaced by a fixed-seed random subsample of
        ``max_points`` rows (each side uses ``min(n, max_points)`` rows). None disables subsampling (use with
        ``backend="online"`` when pykeops is installed, or on a GPU with enough memory).
    seed : int
        Seed of the subsample.
    backend : str
        geomloss backend. Default "tensorized" (explicit: "auto" switches to "online" for large
        inputs, which needs pykeops).

    Returns
    -------
    float
    """
    from geomloss import SamplesLoss

    x, y = _check(x, y, names=["x", "y"], min_rows=1)
    xs = _subsample(x, max_points, seed)
    ys = _subsample(y, max_points, seed + 1)
    loss = SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling, debias=True, backend=backend)
    with torch.no_grad():
        val = float(loss(xs.contiguous(), ys.contiguous()))
    if not math.isfinite(val):
        raise FloatingPointError(f"sinkhorn: geomloss returned {val} (blur={blur}, backend={backend})")
    return val


def _random_projections(d: int, n_projections: int, seed: int, dtype, device) -> torch.Tensor:
    p = torch.randn(d, n_projections, generator=_generator(seed), dtype=torch.float64)  # [d, P]
    p = p / p.norm(dim=0, keepdim=True)
    return p.to(dtype=dtype, device=device)


def _wasserstein_1d_pp(u: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """W_p^p between uniform empirical measures, column by column: u [n, P], v [m, P] -> [P].

    Quantile-function formula (as POT's ``wasserstein_1d``): with sorted columns and the merged
    grid of cumulative weights ``{i/n} U {j/m}``, ``W_p^p = sum_k dq_k |u_(i_k) - v_(j_k)|^p``.
    """
    n, m = u.shape[0], v.shape[0]
    us, _ = torch.sort(u, dim=0)
    vs, _ = torch.sort(v, dim=0)
    if n == m:
        return (us - vs).abs().pow(p).mean(0)
    dev = u.device
    cu = torch.arange(1, n + 1, dtype=torch.float64, device=dev) / n  # [n]
    cv = torch.arange(1, m + 1, dtype=torch.float64, device=dev) / m  # [m]
    qs, _ = torch.sort(torch.cat([cu, cv]))  # [n + m]
    dq = torch.diff(qs, prepend=qs.new_zeros(1))  # [n + m]
    iu = torch.searchsorted(cu, qs, side="left").clamp_(max=n - 1)  # [n + m]
    iv = torch.searchsorted(cv, qs, side="left").clamp_(max=m - 1)
    diff = (us[iu] - vs[iv]).abs().pow(p)  # [n + m, P]
    return (dq.to(diff.dtype)[:, None] * diff).sum(0)


def sliced_wasserstein(x, y, n_projections: int = 128, p: int = 2, seed: int = 0,
                       projections=None) -> float:
    """Sliced Wasserstein distance ``(mean over projections of W_p^p)^(1/p)`` (POT's convention).

    Parameters
    ----------
    x, y : tensor [n, d], [m, d]
        n != m is handled exactly (quantile functions of the uniform empirical measures).
    n_projections : int
        Number of random directions (standard normal, normalised to unit length, seeded).
    p : int
        Order.
    seed : int
        Seed of the projections (torch generator; POT's own seeding differs, so pass explicit
        ``projections`` to compare).
    projections : tensor or array [d, P], optional
        Explicit projection directions as columns (POT's layout); used as given (not normalised).

    Returns
    -------
    float
    """
    x, y = _check(x, y, names=["x", "y"], min_rows=1)
    if p < 1:
        raise UsageError(f"p must be >= 1, got {p}")
    d = x.shape[1]
    if projections is None:
        n_projections = check_count("n_projections", n_projections)
        proj = _random_projections(d, n_projections, seed, x.dtype, x.device)  # [d, P]
    else:
        (proj,) = _check(projections, names=["projections"], min_rows=1)
        if proj.shape[0] != d:
            raise UsageError(f"projections: expected shape [d={d}, P], got {tuple(proj.shape)}")
        proj = proj.to(dtype=x.dtype, device=x.device)
    with torch.no_grad():
        wpp = _wasserstein_1d_pp(x @ proj, y @ proj, p)  # [P]
        return float(wpp.mean().clamp(min=0.0) ** (1.0 / p))


# ----------------------------------------------------------------------------- thread-count invariance

_MKL_LOCAL = None                       # mkl_set_num_threads_local of torch's MKL (False: none found)
_SERIAL = threading.RLock()             # the fallback's process-wide BLAS limit, one holder at a time


def _mkl_set_num_threads_local():
    """``MKL_Set_Num_Threads_Local`` (the C interface of ``mkl_set_num_threads_local``) of the MKL
    inside torch's CPU library, or False (another BLAS)."""
    global _MKL_LOCAL
    if _MKL_LOCAL is None:
        _MKL_LOCAL = False
        try:
            import ctypes
            import glob
            import os

            if torch.backends.mkl.is_available():
                lib = os.path.join(os.path.dirname(torch.__file__), "lib")
                for name in sorted(glob.glob(os.path.join(lib, "*torch_cpu*"))):
                    try:
                        fn = ctypes.CDLL(name).MKL_Set_Num_Threads_Local     # the C interface (by value)
                    except (OSError, AttributeError):
                        continue
                    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                    _MKL_LOCAL = fn
                    break
        except (ImportError, OSError):
            pass
    return _MKL_LOCAL


@contextlib.contextmanager
def _one_blas_thread():
    """Run the enclosed BLAS / LAPACK calls on one thread, so their rounding does not depend on the
    process's thread count.

    LAPACK's eigensolvers and Cholesky (and BLAS products on some shapes) round differently with
    1 and 2 threads: a Dask worker (one thread) and the driver (all cores) gave MIR values 3e-6
    apart. With torch's MKL, the limit is MKL's per-thread setting (``mkl_set_num_threads_local``:
    nothing else in the process changes); with another BLAS, threadpoolctl's process-wide limit,
    held by one caller at a time. torch's own reductions (over a dim with several outputs) are
    already thread-count invariant.
    """
    fn = _mkl_set_num_threads_local()
    if fn:
        before = fn(1)
        try:
            yield
        finally:
            fn(before)
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                 # nothing to limit with: rounding may follow the thread count
        yield
        return
    with _SERIAL, threadpool_limits(limits=1, user_api="blas"):
        yield


def _ordered_mean(x: torch.Tensor) -> float:
    """Mean of a 1-D tensor in one summation order (numpy's pairwise sum; torch splits a long full
    reduction across threads)."""
    return float(np.mean(x.detach().cpu().numpy()))


def _ordered_std(x: torch.Tensor) -> float:
    """Unbiased standard deviation of a 1-D tensor in one summation order (see :func:`_ordered_mean`)."""
    return float(np.std(x.detach().cpu().numpy(), ddof=1))


def _mean_cov(a: torch.Tensor):
    """float64 mean [d] and unbiased covariance [d, d]."""
    a = a.detach().to(torch.float64)
    mu = a.mean(0)
    c = a - mu
    return mu, (c.T @ c) / (a.shape[0] - 1)


def _sqrtm_psd(c: torch.Tensor) -> torch.Tensor:
    """Exact symmetric square root of a symmetric PSD matrix (eigh; negative eigenvalues -> 0)."""
    w, v = torch.linalg.eigh((c + c.T) / 2)
    return (v * w.clamp(min=0.0).sqrt()) @ v.T


def _frechet(mu1, c1, mu2, c2) -> float:
    """|mu1 - mu2|^2 + tr(c1 + c2 - 2 (c1^1/2 c2 c1^1/2)^1/2), exact, float64."""
    s1 = _sqrtm_psd(c1)
    mid = s1 @ c2 @ s1
    ev = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp(min=0.0)
    fd = float((mu1 - mu2).pow(2).sum() + torch.trace(c1) + torch.trace(c2) - 2.0 * ev.sqrt().sum())
    return max(fd, 0.0)


def gaussian_w2(x, y, squared: bool = False) -> float:
    """Closed-form 2-Wasserstein distance between Gaussians fitted to x and y.

    ``W2^2 = |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2)`` with unbiased
    covariances; exact symmetric square roots by eigendecomposition in float64 (O(d^3)).

    Parameters
    ----------
    x, y : tensor [n, d], [m, d]  (n, m >= 2)
    squared : bool
        Return W2^2 instead of W2 (default W2, the distance).

    Returns
    -------
    float
    """
    x, y = _check(x, y, names=["x", "y"])
    with torch.no_grad(), _one_blas_thread():
        w2sq = _frechet(*_mean_cov(x), *_mean_cov(y))
    return w2sq if squared else math.sqrt(w2sq)


# ----------------------------------------------------------------------------- cross-modal


def _row_norms_nonzero(a: torch.Tensor, name: str) -> torch.Tensor:
    return _nonzero_norms(a.norm(dim=1), name)  # [n]


def _nonzero_norms(norms: torch.Tensor, name: str) -> torch.Tensor:
    """``norms`` [n], after raising on zero-norm rows (naming the first few)."""
    zero = (norms == 0).nonzero().flatten()
    if zero.numel():
        shown = ", ".join(str(int(i)) for i in zero[:5].tolist())
        raise UsageError(f"{name}: {zero.numel()} zero-norm row(s) (direction undefined), "
                         f"first at rows [{shown}]")
    return norms


def modality_gap(v, t) -> float:
    """Modality gap of Liang et al. (2022): ``|mean(normalize(v)) - mean(normalize(t))|_2``.

    Parameters
    ----------
    v : tensor [n, d]
        Visual tokens.
    t : tensor [m, d]
        Text tokens.

    Returns
    -------
    float
        The norm of :func:`modality_gap_vector`.
    """
    return float(modality_gap_vector(v, t).norm())


def modality_gap_vector(v, t) -> torch.Tensor:
    """The gap vector ``mean(normalize(v)) - mean(normalize(t))`` of visual tokens ``v`` ``[n, d]``
    and text tokens ``t`` ``[m, d]``: a float64 tensor ``[d]`` on the input's device."""
    v, t = _check(v, t, names=["v (visual)", "t (text)"], min_rows=1)
    with torch.no_grad():
        v64, t64 = v.to(torch.float64), t.to(torch.float64)
        vn = v64 / _row_norms_nonzero(v64, "v (visual)")[:, None]
        tn = t64 / _row_norms_nonzero(t64, "t (text)")[:, None]
        return vn.mean(0) - tn.mean(0)  # [d]


def _replace_outliers(a: torch.Tensor) -> torch.Tensor:
    """MIR's 3-sigma rule: rows whose L2 norm is more than 3 std (unbiased) from the (lower)
    median norm are replaced by the per-dimension (lower) median vector, as in
    shikiw/Modality-Integration-Rate ``replace_outliers_with_median_l2``."""
    norms = a.norm(dim=1)  # [n]
    out = (norms - norms.median()).abs() > 3.0 * _ordered_std(norms)
    if bool(out.any()):
        a = a.clone()
        a[out] = a.median(dim=0).values
    return a


def mir(v, t) -> float:
    """Per-layer Modality Integration Rate term (Huang et al., ICCV 2025).

    Both sets are scaled by 1 / (mean L2 norm of the text tokens); in each set, rows whose norm
    differs from the median norm by more than 3 std are replaced by the per-dimension median; the
    value is the Frechet distance between the two sets (means + unbiased covariances) with an
    exact matrix square root in float64 (their "accurate" mode; the "fast" mode's Newton-Schulz
    loop returns its input and overestimates FD).

    Parameters
    ----------
    v : tensor [n, d]
        Visual-token states at one layer (n >= 2).
    t : tensor [m, d]
        Text-token states at the same layer (m >= 2).

    Returns
    -------
    float
        FD (>= 0), the same to the last bit whatever the number of threads (BLAS and LAPACK run
        on one thread here, long sums in one order). Combine layers with :func:`mir_total`.
    """
    v, t = _check(v, t, names=["v (visual)", "t (text)"])
    with torch.no_grad(), _one_blas_thread():
        v64, t64 = v.to(torch.float64), t.to(torch.float64)
        scale = _ordered_mean(t64.norm(dim=1))
        if scale == 0.0:
            raise UsageError("t (text): all rows have zero norm; the text-centric scale is undefined")
        v64, t64 = _replace_outliers(v64 / scale), _replace_outliers(t64 / scale)
        return _frechet(*_mean_cov(v64), *_mean_cov(t64))


def mir_total(per_layer_values) -> float:
    """``log10(sum of per-layer MIR values)``; raises on an empty list or a non-positive sum."""
    vals = [float(x) for x in (per_layer_values.tolist() if hasattr(per_layer_values, "tolist")
                               else per_layer_values)]
    if not vals:
        raise UsageError("mir_total: no per-layer values")
    if not all(math.isfinite(x) for x in vals):
        raise UsageError(f"mir_total: non-finite per-layer values {vals}")
    s = sum(vals)
    if s <= 0:
        raise UsageError(f"mir_total: sum of per-layer values is {s}; log10 needs a positive sum")
    return math.log10(s)


# ----------------------------------------------------------------------------- paired shift


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
    a, b = _check(a, b, names=["a", "b"], min_rows=1, same_rows=True)
    with torch.no_grad():
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        na, nb = a64.norm(dim=1), b64.norm(dim=1)  # [n]
        denom = na * nb
        cos = torch.where(denom > 0, (a64 * b64).sum(1) / denom.clamp(min=1e-300),
                          torch.where((na == 0) & (nb == 0), 1.0, 0.0).to(a64))
        cosd = (1.0 - cos).clamp(min=0.0, max=2.0)  # [n]
        l2 = (a64 - b64).norm(dim=1)  # [n]
    return TokenShift(cosine=cosd, l2=l2)
