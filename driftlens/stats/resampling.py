"""Resampling inference on clustered tokens: the cluster, not the token, is the unit of independence.

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

import functools
from typing import Literal, NamedTuple

import numpy as np
import torch

from driftlens.errors import UsageError, check_count
from driftlens.stats.common import check_inputs

MIN_CLUSTERS = 2
# rows of an [n, d] block converted to float64 at a time: float64 copies of a whole 7B-sized block
# (50,000 x 4096) would be 1.6 GB each; a chunk is 32 MiB whatever the block
CHUNK_ELEMENTS = 2**22


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


def check_clusters(k: int, what: str) -> None:
    """Raise when there are too few clusters for any interval or null."""
    if k < MIN_CLUSTERS:
        raise UsageError(f"{what}: {k} cluster(s); drift inference resamples clusters and needs at least "
                         f"{MIN_CLUSTERS} (a probe set's `cluster` names its independent units)")


def paired_centred(r, c, clusters, what: str):
    """Checked paired inputs of a cluster-level function, centred on the reference's mean.

    ``r``, ``c`` [n, d] (the same rows at the reference and the checkpoint), ``clusters`` [n] labels;
    ``what`` names the function in errors. Returns ``(r - centre, c - centre)``.
    """
    r, c = check_inputs(r, c, names=["r (reference)", "c (checkpoint)"], same_rows=True)
    codes, uniq = cluster_codes(clusters)
    if len(codes) != r.shape[0]:
        raise UsageError(f"clusters has {len(codes)} labels for {r.shape[0]} rows")
    check_clusters(len(uniq), what)
    centre = r.mean(0, dtype=torch.float64).to(r.dtype)
    return r - centre, c - centre


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


@functools.lru_cache(maxsize=64)
def draws(kind: str, k: int, n: int, seed: int) -> torch.Tensor:
    """The report's resampling draws: ``"flips"`` (:func:`sign_flips` with ``seed``) or ``"counts"``
    (:func:`bootstrap_counts` with ``seed + 1``), a function of (K, B, seed) only -- the same in every
    process and every cell of a report."""
    return sign_flips(k, n, seed) if kind == "flips" else bootstrap_counts(k, n, seed + 1)


class Rows:
    """One modality's rows of a (site, layer) and their clusters, on the device."""

    def __init__(self, rows: np.ndarray, labels: np.ndarray, dev):
        import torch

        codes, uniq = cluster_codes(labels[rows])
        self.rows = torch.as_tensor(rows, device=dev)
        self.codes = torch.as_tensor(codes, device=dev)
        self.k = len(uniq)
        self.by_cluster = [torch.as_tensor(ix, device=dev) for ix in rows_by_cluster(codes, self.k)]

    def resample(self, counts):
        """Row indices of one bootstrap draw (cluster a repeated counts[a] times)."""
        import torch

        parts = [self.by_cluster[a].repeat(int(n)) for a, n in enumerate(counts.tolist()) if n]
        return torch.cat(parts)

    def flip_mask(self, signs):
        """Row mask of the clusters a sign-flip column swaps."""
        return (signs[self.codes.cpu()] < 0).to(self.rows.device)


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
