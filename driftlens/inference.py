"""Inference on clustered tokens: the cluster, not the token, is the unit of independence.

Tokens of one image are strongly correlated, and so are the renders, crops and language twins of
one scene. A probe set therefore names, per probe, the *cluster* it belongs to (a scene, a source
photograph), and every resampling here draws whole clusters:

- **cluster sign flips** (paired permutation test): the same probes go through every checkpoint,
  so under "no change" the reference's and the checkpoint's tokens of one cluster are
  exchangeable; swapping them for a random subset of clusters draws from the null;
- **cluster bootstrap**: draw K clusters with replacement (multinomial counts per cluster).

Statistics that are *U-statistics over clusters* -- sums of a symmetric pair term ``H[a, b]``
over distinct clusters ``a != b`` -- get both resamplings as batched quadratic forms: a column
``w`` of signs or of bootstrap counts gives ``sum_{a != b} w_a w_b H[a, b] / sum_{a != b} w_a w_b``.
The paired cluster MMD (:func:`paired_mmd_matrix`) is one: with ``D_a`` the difference of the
kernel mean embeddings of cluster ``a`` at the reference and at the checkpoint,
``H[a, b] = <D_a, D_b>``, a sign flip of cluster ``a`` is ``D_a -> -D_a``, and
``E H[a, b] = MMD^2`` between the two token distributions for ``a != b`` whatever the number of
clusters or the correlation of tokens inside a cluster.

Everything here is a pure function of tensors or arrays; seeds make every draw reproducible and
the same for every cell of a report (so per-layer resamples can be summed across layers).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch

from driftlens.errors import UsageError, check_count

__all__ = [
    "Inference",
    "adjust_pvalues",
    "bootstrap_counts",
    "cluster_codes",
    "p_value",
    "paired_mmd",
    "paired_mmd_matrix",
    "paired_routing",
    "paired_shift",
    "quadratic_u",
    "rows_by_cluster",
    "sign_flips",
    "subset_u_draws",
    "u_statistic_draws",
    "u_statistic_inference",
]

MIN_CLUSTERS = 2


def cluster_codes(labels) -> tuple[np.ndarray, np.ndarray]:
    """Integer code per row (0..K-1, in order of first appearance) and the K distinct labels."""
    labels = np.asarray(labels)
    uniq, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")          # first-appearance order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)].astype(np.int64), uniq[order]


def rows_by_cluster(codes, k: int) -> list[np.ndarray]:
    """Row indices of each cluster (0..K-1), from per-row codes."""
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(k + 1))
    return [order[bounds[a]:bounds[a + 1]] for a in range(k)]


def sign_flips(n_clusters: int, n_draws: int, seed: int) -> torch.Tensor:
    """[K, B] float64 of +-1: column b swaps reference and checkpoint in the clusters marked -1."""
    n_draws = check_count("the number of sign flips (n_permutations)", n_draws)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n_clusters, n_draws), generator=g).to(torch.float64).mul_(2).sub_(1)


def bootstrap_counts(n_clusters: int, n_draws: int, seed: int) -> torch.Tensor:
    """[K, B] float64 multinomial counts: column b draws K clusters with replacement.

    A draw that holds one distinct cluster only (probability ``K^(1-K)``: a half at K = 2, under
    1e-4 from K = 7) is drawn again: a U-statistic over pairs of distinct clusters is undefined
    on it, so the bootstrap is conditional on at least two distinct clusters.
    """
    n_draws = check_count("the number of bootstrap draws (n_bootstrap)", n_draws)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n_clusters, (n_draws, n_clusters), generator=g)     # [B, K]
    while n_clusters > 1:
        single = (idx == idx[:, :1]).all(1)                                     # [B]
        if not bool(single.any()):
            break
        idx[single] = torch.randint(0, n_clusters, (int(single.sum()), n_clusters), generator=g)
    counts = torch.zeros(n_draws, n_clusters, dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return counts.T.contiguous()                                                # [K, B]


def quadratic_u(h: torch.Tensor, w: torch.Tensor, signs: bool = False) -> torch.Tensor:
    """Weighted U-statistic ``sum_{a != b} w_a w_b h[a, b] / N`` for every column of ``w``.

    Parameters
    ----------
    h : tensor [K, K]
        Symmetric pair term (its diagonal is ignored).
    w : tensor [K, B]
        Weights per cluster: all ones gives the U-statistic itself, counts a bootstrap draw
        (``N = sum_{a != b} w_a w_b``: pairs of copies of one cluster are excluded, as ties in a
        U-statistic), +-1 a sign flip (with ``signs=True``: ``N = K (K - 1)``, the pairs).

    Returns
    -------
    tensor [B] float64
    """
    h0 = h.to(torch.float64).clone()
    h0.fill_diagonal_(0.0)
    w = w.to(device=h0.device, dtype=torch.float64)
    num = (w * (h0 @ w)).sum(0)                                    # [B]
    if signs:
        k = h0.shape[0]
        return num / (k * (k - 1))
    den = w.sum(0) ** 2 - (w * w).sum(0)                            # [B]
    return num / den


def p_value(null: torch.Tensor | np.ndarray, observed: float, tol: float = 0.0) -> float:
    """``(1 + #{null >= observed - tol}) / (B + 1)``: never 0, valid for any B."""
    null = np.asarray(null.cpu() if isinstance(null, torch.Tensor) else null, dtype=np.float64)
    return float((1 + np.count_nonzero(null >= observed - tol)) / (null.size + 1))


class Inference(NamedTuple):
    """An effect with its cluster-bootstrap interval and cluster sign-flip p-value."""

    effect: float
    lo: float
    hi: float
    p: float
    n_clusters: int


def u_statistic_inference(h: torch.Tensor, flips: torch.Tensor, counts: torch.Tensor,
                          level: float = 0.95) -> Inference:
    """Effect, percentile interval and p-value of the cluster U-statistic with pair term ``h``.

    The sign-flip null is the one of a paired design (``h[a, b] -> s_a s_b h[a, b]``); the
    p-value is one-sided (large values are drift). ``flips`` and ``counts`` come from
    :func:`sign_flips` and :func:`bootstrap_counts` with ``K = h.shape[0]``.
    """
    return u_statistic_draws(h, flips, counts, level)[0]


def u_statistic_draws(h: torch.Tensor, flips: torch.Tensor, counts: torch.Tensor,
                      level: float = 0.95) -> tuple[Inference, np.ndarray]:
    """:func:`u_statistic_inference` and the bootstrap draws it read its interval from ([B] float64).

    The draws of two cells that share their clusters and ``counts`` are paired: draw ``b`` resamples the
    same clusters in both, so their difference is the bootstrap of the cells' difference
    (:mod:`driftlens.compare`).
    """
    k = h.shape[0]
    if k < MIN_CLUSTERS:
        raise UsageError(f"a cluster U-statistic needs at least {MIN_CLUSTERS} clusters, got {k}")
    if not bool(torch.isfinite(h).all()):
        raise FloatingPointError(f"the pair terms hold {int((~torch.isfinite(h)).sum())} non-finite value(s)")
    ones = torch.ones(k, 1, dtype=torch.float64, device=h.device)
    effect = float(quadratic_u(h, ones)[0])
    null = quadratic_u(h, flips, signs=True)
    boot = quadratic_u(h, counts)
    # rounding between the observed sum and the flipped sums must not create spurious small p
    scale = float(h.abs().mean()) if h.numel() else 0.0
    tol = 1e3 * torch.finfo(torch.float64).eps * scale
    lo, hi = percentile_interval(boot, level)
    return Inference(effect, lo, hi, p_value(null, effect, tol), k), boot.cpu().numpy()


def subset_u_draws(h: torch.Tensor, present: torch.Tensor, flips: torch.Tensor, counts: torch.Tensor,
                   level: float = 0.95) -> tuple[Inference, np.ndarray]:
    """:func:`u_statistic_draws` over the clusters marked ``present`` (the others hold no rows of the cell).

    ``h`` [K, K] is the pair term over all K clusters of the modality (rows and columns of absent
    clusters are ignored); ``flips`` and ``counts`` [K, B] are the report's draws over all K. The
    effect and the sign-flip null are the U-statistic over the present clusters; bootstrap draw
    ``b`` weights the present clusters by their counts in column ``b`` -- the same clusters every
    other cell of the report resamples in draw ``b``, so the draws stay paired with theirs. A draw
    holding fewer than two copies of present clusters has no pair of distinct clusters: NaN
    (its interval ignores it).
    """
    present = present.to(torch.bool).cpu()
    idx = torch.nonzero(present).reshape(-1)
    k = int(idx.numel())
    if k < MIN_CLUSTERS:
        raise UsageError(f"a cluster U-statistic needs at least {MIN_CLUSTERS} clusters with rows, got {k}")
    h = h.to(torch.float64).cpu()
    hp = h[idx][:, idx]
    if not bool(torch.isfinite(hp).all()):
        raise FloatingPointError(f"the pair terms hold {int((~torch.isfinite(hp)).sum())} non-finite value(s)")
    effect = float(quadratic_u(hp, torch.ones(k, 1, dtype=torch.float64))[0])
    null = quadratic_u(hp, flips.cpu()[idx], signs=True)
    h0 = h.clone()
    h0[~present] = 0.0
    h0[:, ~present] = 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = quadratic_u(h0, counts.cpu() * present[:, None].to(torch.float64)).numpy()
    boot = np.where(np.isfinite(boot), boot, np.nan)
    tol = 1e3 * torch.finfo(torch.float64).eps * float(hp.abs().mean())
    lo, hi = nan_percentile_interval(boot, level)
    return Inference(effect, lo, hi, p_value(null, effect, tol), k), boot


def nan_percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """:func:`percentile_interval` of the finite values (NaN, NaN when there are none)."""
    v = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return percentile_interval(v, level) if v.size else (float("nan"), float("nan"))


def percentile_interval(values: torch.Tensor | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Equal-tailed percentile interval of bootstrap values."""
    if not 0 < level < 1:
        raise UsageError(f"level must be in (0, 1), got {level}")
    v = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(v, [a, 1.0 - a])
    return float(lo), float(hi)


def adjust_pvalues(p, method: Literal["bh", "holm"] = "bh") -> np.ndarray:
    """Multiplicity-adjusted p-values (same shape; NaN entries are left out and stay NaN).

    ``"bh"``: Benjamini-Hochberg (false discovery rate); ``"holm"``: Holm (family-wise error).
    """
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    flat = p.reshape(-1)
    ok = np.flatnonzero(np.isfinite(flat))
    m = ok.size
    if m == 0:
        return out
    vals = flat[ok]
    order = np.argsort(vals, kind="stable")
    ranked = vals[order]
    if method == "bh":
        adj = ranked * m / np.arange(1, m + 1)
        adj = np.minimum.accumulate(adj[::-1])[::-1]
    elif method == "holm":
        adj = ranked * (m - np.arange(m))
        adj = np.maximum.accumulate(adj)
    else:
        raise UsageError(f"unknown correction {method!r}; choose 'bh' or 'holm'")
    res = np.empty(m)
    res[order] = np.minimum(adj, 1.0)
    flat_out = out.reshape(-1)
    flat_out[ok] = res
    return flat_out.reshape(p.shape)


# ----------------------------------------------------------------------------- kernel terms


# rows of an [n, d] block converted to float64 at a time: float64 copies of a whole 7B-sized block
# (50,000 x 4096) would be 1.6 GB each; a chunk is 32 MiB whatever the block
CHUNK_ELEMENTS = 2**22


def row_chunks(n: int, d: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of an [n, d] block, about :data:`CHUNK_ELEMENTS` elements each.

    Depends on ``n`` and ``d`` only, so sums over the chunks add in the same order on every device
    and in every process.
    """
    step = max(1, CHUNK_ELEMENTS // max(1, d))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def cluster_sums(x: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster sums of the rows of ``x`` [n, ...] -> [K, ...], in the same float rounding
    whatever the number of threads.

    On the CPU, ``index_add_`` adds the rows one after another (each row's add is elementwise);
    a one-hot matmul would hand the sum over rows to BLAS, whose float64 rounding depends on how
    many threads split it -- and a Dask worker runs with one thread while the driver has all. On
    a GPU, a one-hot matmul (a fixed order, unlike ``index_add_``'s atomics).
    """
    if x.device.type == "cpu":
        return torch.zeros(k, *x.shape[1:], dtype=x.dtype).index_add_(0, codes.to(x.device), x)
    oh = torch.zeros(codes.shape[0], k, dtype=x.dtype, device=x.device)
    oh[torch.arange(codes.shape[0], device=x.device), codes.to(x.device)] = 1.0
    return (oh.T @ x.reshape(x.shape[0], -1)).reshape(k, *x.shape[1:])


def gram_rows(a: torch.Tensor) -> torch.Tensor:
    """``a @ a.T`` [K, K] for a small ``a`` [K, d], as elementwise products summed over d (each
    entry's sum in one order whatever the number of threads, unlike BLAS's split of a long inner
    dimension); rows of the result a chunk at a time (about :data:`CHUNK_ELEMENTS` products)."""
    k, d = a.shape
    step = max(1, CHUNK_ELEMENTS // max(1, k * d))
    return torch.cat([(a[s:s + step, None, :] * a[None]).sum(-1) for s in range(0, k, step)]) if k else \
        a.new_zeros(0, 0)


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
    shifts are small (the four kernels summed from their log values elsewhere: :func:`_pair_terms`).
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
    from driftlens.metrics import _sq_dists

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
                krr = _sq_dists(ri, rj).mul_(-gamma).exp_()                             # k(r_i, r_j)
                if cache is not None:
                    cache[key] = krr
            a = (ri @ dj.T).mul_(2.0).sub_(dn[j0:j1][None, :]).mul_(gamma)       # -gamma (d2(r_i,c_j) - d2(r_i,r_j))
            b = (di @ rj.T).mul_(2.0).sub_(dn[i0:i1][:, None]).mul_(gamma)       # -gamma (d2(c_i,r_j) - d2(r_i,r_j))
            e = (di @ dj.T).mul_(2.0 * gamma)                                      # 2 gamma delta_i . delta_j
            t = _pair_terms(krr, a, b, e)
            rows[:, j0:j1] += torch.zeros(k, j1 - j0, dtype=t.dtype, device=t.device).index_add_(
                0, codes[i0:i1], t).to(torch.float64)
        out += torch.zeros(k, k, dtype=torch.float64, device=r.device).index_add_(1, codes, rows)
    counts = torch.bincount(codes, minlength=k).to(torch.float64)
    return out / (counts[:, None] * counts[None, :]).clamp(min=1.0)


def _pair_terms(krr: torch.Tensor, a: torch.Tensor, b: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
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
    from driftlens import metrics as M

    r, c = M._check(r, c, names=["r (reference)", "c (checkpoint)"], same_rows=True)
    codes_np, uniq = cluster_codes(clusters)
    if len(codes_np) != r.shape[0]:
        raise UsageError(f"clusters has {len(codes_np)} labels for {r.shape[0]} rows")
    check_clusters(len(uniq), "paired_shift")
    centre = r.mean(0, dtype=torch.float64).to(r.dtype)
    codes = torch.as_tensor(codes_np, device=r.device)
    est = shift_estimates(*paired_shift_terms(r - centre, c - centre, codes, len(uniq)),
                          bootstrap_counts(len(uniq), n_bootstrap, seed + 1))
    lo, hi = percentile_interval(est[1:], level)
    return float(est[0]), lo, hi


# ----------------------------------------------------------------------------- routing (mixture of experts)


def route_distributions(a: torch.Tensor) -> torch.Tensor:
    """Rows of routing probabilities [n, E] as float64 distributions (negatives from storage rounding
    clipped, rows renormalized to sum 1)."""
    a = a.to(torch.float64).clamp(min=0.0)
    return a / a.sum(1, keepdim=True).clamp(min=1e-300)


def js_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence in bits between distributions ``p``, ``q`` [n, E] -> [n] (0 log 0 = 0)."""
    m = (p + q) / 2

    def kl(a):
        ratio = torch.where(a > 0, a / m.clamp(min=1e-300), torch.ones_like(a))
        return (a * torch.log2(ratio)).sum(1)

    return ((kl(p) + kl(q)) / 2).clamp(min=0.0)


def routing_terms(r: torch.Tensor, c: torch.Tensor, codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster terms of the routing metrics from the same tokens' routing at the reference (``r``) and
    the checkpoint (``c``), [n, E] each.

    Returns
    -------
    js : tensor [K] float64
        Mean over the cluster's tokens of the per-token Jensen-Shannon divergence (bits).
    delta : tensor [K, E] float64
        Mean over the cluster's tokens of ``c_i - r_i`` (``D_a`` of ``route_load``).
    """
    p, q = route_distributions(r), route_distributions(c)
    codes = codes.to(p.device)
    n = cluster_sums(torch.ones(p.shape[0], dtype=torch.float64, device=p.device), codes, k).clamp(min=1.0)
    js = cluster_sums(js_bits(p, q), codes, k) / n
    delta = cluster_sums(q - p, codes, k) / n[:, None]
    return js.cpu(), delta.cpu()


def cluster_mean_draws(values: torch.Tensor, counts: torch.Tensor, level: float = 0.95) -> tuple[Inference, np.ndarray]:
    """The mean of per-cluster values [K] (clusters weighted equally) with its cluster-bootstrap interval.

    Returns ``(Inference, draws [B])`` with ``p`` NaN (no null: see ``route_js``); draw ``b`` is the
    count-weighted mean under column ``b`` of ``counts`` [K, B], paired with every other cell's draw ``b``.
    """
    v = values.to(torch.float64).cpu()
    w = counts.to(torch.float64).cpu()
    boot = ((w * v[:, None]).sum(0) / w.sum(0)).numpy()
    lo, hi = percentile_interval(boot, level)
    return Inference(float(v.mean()), lo, hi, float("nan"), int(v.shape[0])), boot


def paired_routing(r, c, clusters, n_permutations: int = 1000, n_bootstrap: int = 1000, level: float = 0.95,
                   seed: int = 0) -> dict[str, Inference]:
    """Routing drift between the same tokens' routing distributions at two checkpoints, with inference.

    Parameters
    ----------
    r, c : tensor [n, E]
        Per-token routing distributions over E experts (rows sum to 1) at the reference and the
        checkpoint, same token rows.
    clusters : sequence [n]
        Cluster label of each row (the unit of independence).
    n_permutations, n_bootstrap, level, seed
        As :func:`paired_mmd` (sign flips ``seed``, bootstrap draws ``seed + 1``).

    Returns
    -------
    dict
        ``route_js``: the mean per-token Jensen-Shannon divergence (bits; clusters weighted equally)
        with its cluster-bootstrap interval and ``p`` NaN -- JS is symmetric, so a sign flip leaves
        it unchanged and there is no paired null. ``route_load``: the paired cluster U-statistic
        ``mean over a != b of <D_a, D_b>``, ``D_a`` the cluster's mean of ``c_i - r_i``, unbiased
        for ``|E c - E r|^2`` (the squared shift of the expert load), with its interval and
        cluster sign-flip p-value.
    """
    r, c = torch.as_tensor(r), torch.as_tensor(c)
    if r.ndim != 2 or r.shape != c.shape:
        raise UsageError(f"r and c must be [n, experts] of one shape, got {tuple(r.shape)} and {tuple(c.shape)}")
    codes_np, uniq = cluster_codes(clusters)
    if len(codes_np) != r.shape[0]:
        raise UsageError(f"clusters has {len(codes_np)} labels for {r.shape[0]} rows")
    k = len(uniq)
    check_clusters(k, "paired_routing")
    js, delta = routing_terms(r, c, torch.as_tensor(codes_np), k)
    counts = bootstrap_counts(k, n_bootstrap, seed + 1)
    return {"route_js": cluster_mean_draws(js, counts, level)[0],
            "route_load": u_statistic_inference(gram_rows(delta), sign_flips(k, n_permutations, seed), counts, level)}


def check_clusters(k: int, what: str) -> None:
    """Raise when there are too few clusters for any interval or null."""
    if k < MIN_CLUSTERS:
        raise UsageError(f"{what}: {k} cluster(s); drift inference resamples clusters and needs at least "
                         f"{MIN_CLUSTERS} (a probe set's `cluster` names its independent units)")


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
    from driftlens import metrics as M

    r, c = M._check(r, c, names=["r (reference)", "c (checkpoint)"], same_rows=True)
    codes_np, uniq = cluster_codes(clusters)
    if len(codes_np) != r.shape[0]:
        raise UsageError(f"clusters has {len(codes_np)} labels for {r.shape[0]} rows")
    k = len(uniq)
    check_clusters(k, "paired_mmd")
    centre = r.mean(0, dtype=torch.float64).to(r.dtype)
    r, c = r - centre, c - centre
    sigma = M.median_sigma(r, pairs="reference", seed=seed) if sigma is None else float(sigma)
    h = paired_mmd_matrix(r, c, torch.as_tensor(codes_np, device=r.device), k, sigma).cpu()
    return u_statistic_inference(h, sign_flips(k, n_permutations, seed), bootstrap_counts(k, n_bootstrap, seed + 1),
                                 level)
