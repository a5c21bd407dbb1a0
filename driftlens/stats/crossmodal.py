"""Visual against text tokens at one checkpoint: the modality gap and MIR, with their cells.

``gap`` (Liang et al. 2022) per (checkpoint, layer, site); ``mir`` (Huang et al. 2025) per
(checkpoint, layer) on site ``hidden``: the Frechet distance (:func:`driftlens.stats.transport.frechet`)
between the text-scaled visual and text tokens, with ``mir_total = log10(sum over layers)``.
"""
from __future__ import annotations

import math

import torch

from driftlens.errors import UsageError
from driftlens.stats.common import check_inputs, one_blas_thread, ordered_mean, ordered_std
from driftlens.stats.resampling import cluster_sums, draws, percentile_interval, row_chunks, rows_by_cluster
from driftlens.stats.settings import Settings
from driftlens.stats.transport import frechet, frechet_many, mean_cov


def row_norms_nonzero(a: torch.Tensor, name: str) -> torch.Tensor:
    """Row norms [n] of ``a`` [n, d]; zero-norm rows refused (see :func:`nonzero_norms`)."""
    return nonzero_norms(a.norm(dim=1), name)  # [n]


def nonzero_norms(norms: torch.Tensor, name: str) -> torch.Tensor:
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
    v, t = check_inputs(v, t, names=["v (visual)", "t (text)"], min_rows=1)
    with torch.no_grad():
        v64, t64 = v.to(torch.float64), t.to(torch.float64)
        vn = v64 / row_norms_nonzero(v64, "v (visual)")[:, None]
        tn = t64 / row_norms_nonzero(t64, "t (text)")[:, None]
        return vn.mean(0) - tn.mean(0)  # [d]


def replace_outliers(a: torch.Tensor) -> torch.Tensor:
    """MIR's 3-sigma rule: rows whose L2 norm is more than 3 std (unbiased) from the (lower)
    median norm are replaced by the per-dimension (lower) median vector, as in
    shikiw/Modality-Integration-Rate ``replace_outliers_with_median_l2``."""
    norms = a.norm(dim=1)  # [n]
    out = (norms - norms.median()).abs() > 3.0 * ordered_std(norms)
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
    v, t = check_inputs(v, t, names=["v (visual)", "t (text)"])
    with torch.no_grad(), one_blas_thread():
        v64, t64 = v.to(torch.float64), t.to(torch.float64)
        scale = ordered_mean(t64.norm(dim=1))
        if scale == 0.0:
            raise UsageError("t (text): all rows have zero norm; the text-centric scale is undefined")
        v64, t64 = replace_outliers(v64 / scale), replace_outliers(t64 / scale)
        return frechet(*mean_cov(v64), *mean_cov(t64))


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


def gap_terms(v, t, cv, ct, k):
    """Per-cluster sums of L2-normalized visual / text vectors [K, d] and counts [K]."""
    import torch

    def sums(a, codes, name):
        chunks = row_chunks(*a.shape)                   # float64, a chunk of rows at a time
        norms = nonzero_norms(torch.cat([a[s:e].to(torch.float64).norm(dim=1) for s, e in chunks]), name)
        s = torch.zeros(k, a.shape[1], dtype=torch.float64, device=a.device)
        for s0, e in chunks:
            s += cluster_sums(a[s0:e].to(torch.float64) / norms[s0:e, None], codes[s0:e], k)
        return s.cpu(), cluster_sums(torch.ones_like(norms), codes, k).cpu()

    return sums(v, cv, "visual tokens") + sums(t, ct, "text tokens")


def gap_cell(v, t, cv, ct, k, counts, level):
    """Modality gap of one checkpoint's (layer, site) and its cluster-bootstrap interval: (value, lo, hi, draws)."""
    import torch

    sv, nv, st, nt = gap_terms(v, t, cv, ct, k)
    w = torch.cat([torch.ones(k, 1, dtype=torch.float64), counts], 1).T          # [1 + B, K]
    gap = (w @ sv) / (w @ nv)[:, None] - (w @ st) / (w @ nt)[:, None]           # [1 + B, d]
    vals = gap.norm(dim=1)
    lo, hi = percentile_interval(vals[1:], level)
    return float(vals[0]), lo, hi, vals[1:].numpy()


def mir_cell(v, t, cv, ct, k, counts, level):
    """MIR term with its cluster-bootstrap draws.

    Outlier replacement is decided once on the full sample (the 3-std rule is scale-free); each
    draw recomputes the text-norm scale, the means and the unbiased covariances from per-cluster
    sums (float64), and the Frechet distance (Cholesky in float64, symmetric eigenvalues in
    float32). The value itself is :func:`mir`, exact in float64. Every product
    and decomposition runs on one BLAS thread, so a Dask worker's one thread and the driver's
    several give the same bits.
    """
    with one_blas_thread():
        return _mir_cell_one_thread(v, t, cv, ct, k, counts, level)


def _mir_cell_one_thread(v, t, cv, ct, k, counts, level):
    import torch

    value = mir(v, t)              # the exact float64 value
    v64 = replace_outliers(v.to(torch.float64))
    t_raw = t.to(torch.float64)
    t64 = replace_outliers(t_raw)

    def stats(a, codes):   # per cluster: count [K], sum [K, d], sum of outer products [K, d, d]
        cpu = codes.cpu()
        a = a.cpu()
        n = torch.bincount(cpu, minlength=k).to(torch.float64)
        s = torch.zeros(k, a.shape[1], dtype=torch.float64).index_add_(0, cpu, a)
        outer = torch.stack([a[ix].T @ a[ix] for ix in map(torch.as_tensor, rows_by_cluster(cpu, k))])
        return n, s, outer

    nv, sv, ov = stats(v64, cv)
    nt, st, ot = stats(t64, ct)
    tn = torch.zeros(k, dtype=torch.float64).index_add_(0, ct.cpu(), t_raw.norm(dim=1).cpu())
    boot = frechet_batch(counts.T, nv, sv, ov, nt, st, ot, tn)
    lo, hi = percentile_interval(boot, level)
    return value, lo, hi, boot


def frechet_batch(w, nv, sv, ov, nt, st, ot, tn, chunk: int = 128):
    """MIR term of every weighting row of ``w`` [B, K] from per-cluster sufficient statistics."""
    import torch

    out = []
    for b0 in range(0, w.shape[0], chunk):
        wb = w[b0:b0 + chunk]                                               # [b, K]

        def moments(n, s, o, wb=wb):
            nn = wb @ n                                                     # [b]
            mu = (wb @ s) / nn[:, None]                                     # [b, d]
            sec = (wb @ o.reshape(o.shape[0], -1)).reshape(-1, *o.shape[1:])  # [b, d, d]
            cov = (sec - nn[:, None, None] * mu[:, :, None] * mu[:, None, :]) / (nn - 1)[:, None, None]
            return mu, cov

        mv, cvv = moments(nv, sv, ov)
        mt, ctt = moments(nt, st, ot)
        scale = (wb @ tn) / (wb @ nt)                                       # [b] mean text norm
        # moments and Cholesky factors in float64 (sums of squares cancel); the eigenvalues in
        # float32 (2x faster; their rounding is far below the spread an interval describes)
        out.append(frechet_many(mv, cvv, mt, ctt, eig_dtype=torch.float32) / scale ** 2)
    return torch.cat(out).numpy()


#: cross-modal metric -> its cell function ``(v, t, cv, ct, k, counts, level) -> (value, lo, hi, draws [B])``
CELLS = {"gap": gap_cell, "mir": mir_cell}


def cell(name: str, v, t, cv, ct, k: int, n_draws: int, s: Settings):
    """The report's cross-modal cell ``name`` at one checkpoint's (layer, site): visual rows ``v`` and
    text rows ``t`` with their cluster codes ``cv``, ``ct`` (of ``k`` clusters) and ``n_draws``
    cluster-bootstrap draws. Returns ``(value, lo, hi, draws [B])``."""
    return CELLS[name](v, t, cv, ct, k, draws("counts", k, n_draws, s.seed), s.level)
