"""Per-cell computations of the drift report: pure functions of one block's tensors.

A *cell* is one (checkpoint, layer, site, modality) of the report. Each function here takes the
reference's and the checkpoint's token rows of one cell (already on the device, centred on the
reference's mean) with the cluster codes and the resampling draws, and returns the effect, its
interval and p-value -- no file, no global state, so the engine (:mod:`driftlens.engine`) can run
them in any process, in any order. Shapes: ``r``, ``c`` [n, d]; ``codes`` [n]; ``flips``,
``counts`` [K, B].
"""
from __future__ import annotations

import numpy as np

from driftlens import inference as I
from driftlens.errors import DriftError

# geomloss epsilon-scaling factor used by the report. Measured on 470 x 470 tokens, d=96, one
# CPU thread: blur 0.1 sigma with scaling 0.7 takes 0.065 s per call against 0.40 s for blur
# 0.05 sigma with scaling 0.9, and the value moves by 0.7%.
SINKHORN_SCALING = 0.7

class Rows:
    """One modality's rows of a (site, layer) and their clusters, on the device."""

    def __init__(self, rows: np.ndarray, labels: np.ndarray, dev):
        import torch

        codes, uniq = I.cluster_codes(labels[rows])
        self.rows = torch.as_tensor(rows, device=dev)
        self.codes = torch.as_tensor(codes, device=dev)
        self.k = len(uniq)
        self.by_cluster = [torch.as_tensor(ix, device=dev) for ix in I.rows_by_cluster(codes, self.k)]

    def resample(self, counts):
        """Row indices of one bootstrap draw (cluster a repeated counts[a] times)."""
        import torch

        parts = [self.by_cluster[a].repeat(int(n)) for a, n in enumerate(counts.tolist()) if n]
        return torch.cat(parts)

    def flip_mask(self, signs):
        """Row mask of the clusters a sign-flip column swaps."""
        return (signs[self.codes.cpu()] < 0).to(self.rows.device)


def mmd_cell(r, c, rows: Rows, sigma, cache, flips, counts, level, where: str):
    """Paired cluster MMD^2 of one cell with its sign-flip p-value and bootstrap interval.

    Returns ``(Inference, draws [B])``: the bootstrap draws, paired with every other cell's by ``counts``.
    """
    h = I.paired_mmd_matrix(r, c, rows.codes, rows.k, sigma, cache=cache)
    try:
        return I.u_statistic_draws(h.cpu(), flips, counts, level)
    except FloatingPointError as exc:
        raise DriftError(f"mmd at {where}: {exc} (sigma {sigma:.4g}); please report this with the store") from exc


def shift_cell(r, c, rows: Rows, counts, level):
    """Paired shift of one cell and its cluster-bootstrap interval: (effect, lo, hi, draws [B])."""
    est = I.shift_estimates(*I.paired_shift_terms(r, c, rows.codes, rows.k), counts)
    lo, hi = I.percentile_interval(est[1:], level)
    return float(est[0]), lo, hi, est[1:]


def transport_cell(f, r, c, rows: Rows, flips, counts, level):
    """A plug-in distance ``f(r, c)`` as an excess over its sign-flip null mean, with interval and p-value.

    Returns ``(Inference, draws [B])``.
    """
    import torch

    value = f(r, c)
    null = []
    for b in range(flips.shape[1]):
        m = rows.flip_mask(flips[:, b])[:, None]
        null.append(f(torch.where(m, c, r), torch.where(m, r, c)))
    null = np.asarray(null)
    base = float(null.mean())
    boot = []
    for b in range(counts.shape[1]):
        idx = rows.resample(counts[:, b])
        boot.append(f(r[idx], c[idx]) - base)
    boot = np.asarray(boot)
    lo, hi = I.percentile_interval(boot, level)
    return I.Inference(value - base, lo, hi, I.p_value(null, value), rows.k), boot


def routing_cell(r, c, rows: Rows, flips, counts, level, metrics) -> dict:
    """The routing metrics of one (checkpoint, sparse layer, modality) cell.

    ``r``, ``c`` [n, E]: the same tokens' routing distributions at the reference and the checkpoint.
    Returns metric -> ``(Inference, draws [B])`` for the requested ones among ``route_js`` and
    ``route_load`` (:func:`driftlens.inference.paired_routing`).
    """
    js, delta = I.routing_terms(r, c, rows.codes, rows.k)
    out = {}
    if "route_js" in metrics:
        out["route_js"] = I.cluster_mean_draws(js, counts, level)
    if "route_load" in metrics:
        out["route_load"] = I.u_statistic_draws(I.gram_rows(delta), flips, counts, level)
    return out


def top_k_members(route_ref, k: int):
    """[n, E] bool: row i is routed to expert e at the reference (e among its ``k`` most probable experts)."""
    import torch

    top = torch.topk(route_ref, min(int(k), route_ref.shape[1]), dim=1).indices                # [n, k]
    return torch.zeros(route_ref.shape, dtype=torch.bool, device=route_ref.device).scatter_(1, top, True)


def expert_cell(r, c, rows: Rows, member, sigma, flips, counts, level, where: str):
    """Paired cluster MMD^2 of one cell restricted to the rows in ``member`` [n] (the tokens routed to one
    expert at the reference): ``(Inference, draws [B])``, the draws paired with every other cell's
    (:func:`driftlens.inference.subset_u_draws`)."""
    import torch

    codes = rows.codes[member]
    present = torch.bincount(codes.cpu(), minlength=rows.k) > 0
    h = I.paired_mmd_matrix(r[member], c[member], codes, rows.k, sigma)
    try:
        return I.subset_u_draws(h.cpu(), present, flips, counts, level)
    except FloatingPointError as exc:
        raise DriftError(f"expert_mmd at {where}: {exc} (sigma {sigma:.4g}); please report this with the "
                         f"store") from exc


def _gap_terms(v, t, cv, ct, k):
    """Per-cluster sums of L2-normalized visual / text vectors [K, d] and counts [K]."""
    import torch

    def sums(a, codes, name):
        from driftlens.metrics import _nonzero_norms

        chunks = I.row_chunks(*a.shape)                   # float64, a chunk of rows at a time
        norms = _nonzero_norms(torch.cat([a[s:e].to(torch.float64).norm(dim=1) for s, e in chunks]), name)
        s = torch.zeros(k, a.shape[1], dtype=torch.float64, device=a.device)
        for s0, e in chunks:
            s += I.cluster_sums(a[s0:e].to(torch.float64) / norms[s0:e, None], codes[s0:e], k)
        return s.cpu(), I.cluster_sums(torch.ones_like(norms), codes, k).cpu()

    return sums(v, cv, "visual tokens") + sums(t, ct, "text tokens")


def gap_cell(v, t, cv, ct, k, counts, level):
    """Modality gap of one checkpoint's (layer, site) and its cluster-bootstrap interval: (value, lo, hi, draws)."""
    import torch

    sv, nv, st, nt = _gap_terms(v, t, cv, ct, k)
    w = torch.cat([torch.ones(k, 1, dtype=torch.float64), counts], 1).T          # [1 + B, K]
    gap = (w @ sv) / (w @ nv)[:, None] - (w @ st) / (w @ nt)[:, None]           # [1 + B, d]
    vals = gap.norm(dim=1)
    lo, hi = I.percentile_interval(vals[1:], level)
    return float(vals[0]), lo, hi, vals[1:].numpy()


def mir_cell(v, t, cv, ct, k, counts, level):
    """MIR term with its cluster-bootstrap draws.

    Outlier replacement is decided once on the full sample (the 3-std rule is scale-free); each
    draw recomputes the text-norm scale, the means and the unbiased covariances from per-cluster
    sums (float64), and the Frechet distance (Cholesky in float64, symmetric eigenvalues in
    float32). The value itself is :func:`driftlens.metrics.mir`, exact in float64. Every product
    and decomposition runs on one BLAS thread, so a Dask worker's one thread and the driver's
    several give the same bits.
    """
    from driftlens import metrics as M

    with M._one_blas_thread():
        return _mir_cell(v, t, cv, ct, k, counts, level)


def _mir_cell(v, t, cv, ct, k, counts, level):
    import torch

    from driftlens import metrics as M

    value = M.mir(v, t)              # the exact float64 value
    v64 = M._replace_outliers(v.to(torch.float64))
    t_raw = t.to(torch.float64)
    t64 = M._replace_outliers(t_raw)

    def stats(a, codes):   # per cluster: count [K], sum [K, d], sum of outer products [K, d, d]
        cpu = codes.cpu()
        a = a.cpu()
        n = torch.bincount(cpu, minlength=k).to(torch.float64)
        s = torch.zeros(k, a.shape[1], dtype=torch.float64).index_add_(0, cpu, a)
        outer = torch.stack([a[ix].T @ a[ix] for ix in map(torch.as_tensor, I.rows_by_cluster(cpu, k))])
        return n, s, outer

    nv, sv, ov = stats(v64, cv)
    nt, st, ot = stats(t64, ct)
    tn = torch.zeros(k, dtype=torch.float64).index_add_(0, ct.cpu(), t_raw.norm(dim=1).cpu())
    boot = _frechet_batch(counts.T, nv, sv, ov, nt, st, ot, tn)
    lo, hi = I.percentile_interval(boot, level)
    return value, lo, hi, boot


def _frechet_batch(w, nv, sv, ov, nt, st, ot, tn, chunk: int = 128):
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
        out.append(_frechet_many(mv, cvv, mt, ctt, eig_dtype=torch.float32) / scale ** 2)
    return torch.cat(out).numpy()


def _frechet_many(m1, c1, m2, c2, eig_dtype=None):
    """Batched exact Frechet distance: ``|m1-m2|^2 + tr c1 + tr c2 - 2 sum sqrt eig(L^T c2 L)``,
    ``c1 = L L^T`` (Cholesky; an exact symmetric square root where ``c1`` is not positive
    definite). ``eig_dtype`` (e.g. float32) computes the symmetric eigenvalues in that dtype."""
    import torch

    lo, info = torch.linalg.cholesky_ex(c1)
    bad = info != 0
    if bool(bad.any()):                         # singular covariance: exact symmetric square root
        w_, q = torch.linalg.eigh(c1[bad])
        lo = lo.clone()
        lo[bad] = q * w_.clamp(min=0).sqrt()[:, None, :]
    mid = lo.transpose(-1, -2) @ c2 @ lo
    mid = (mid + mid.transpose(-1, -2)) / 2
    ev = torch.linalg.eigvalsh(mid if eig_dtype is None else mid.to(eig_dtype)).to(c1.dtype).clamp(min=0)
    tr = c1.diagonal(dim1=-2, dim2=-1).sum(-1) + c2.diagonal(dim1=-2, dim2=-1).sum(-1)
    fd = (m1 - m2).pow(2).sum(-1) + tr - 2.0 * ev.sqrt().sum(-1)
    return fd.clamp(min=0)


def transport_fns(names, blur, n_projections, seed):
    """name -> f(x, y, sigma) -> float over torch tensors."""
    from driftlens import metrics as M

    fns = {}
    if "sinkhorn" in names:
        fns["sinkhorn"] = lambda x, y, s: float(M.sinkhorn(x, y, blur=blur * s, scaling=SINKHORN_SCALING, seed=seed))
    if "sliced_w" in names:
        fns["sliced_w"] = lambda x, y, s: float(M.sliced_wasserstein(x, y, n_projections=n_projections, seed=seed))
    if "gauss_w2" in names:
        fns["gauss_w2"] = lambda x, y, s: float(M.gaussian_w2(x, y))
    return fns
