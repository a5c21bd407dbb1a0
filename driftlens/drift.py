"""The drift report: every metric of a checkpoint against a reference, with calibrated inference.

The same probes go through every checkpoint, so the design is *paired*, and tokens are not
independent: the tokens of one image, and the images (renders, crops, language twins) of one
scene, are strongly correlated. The store's ``cluster`` coordinate names the independent unit;
every interval and null here resamples whole clusters (:mod:`driftlens.inference`).

Per (checkpoint, layer, site, modality) cell and distributional metric ``m`` the report holds

- ``{m}``: the effect size, in the metric's units, whose expectation does not depend on the
  number of probe clusters;
- ``{m}_lo`` / ``{m}_hi``: its cluster-bootstrap interval (percentile, ``level``);
- ``{m}_p``: a cluster sign-flip permutation p-value (swap the reference's and the checkpoint's
  tokens of whole clusters), one-sided, ``(1 + k) / (1 + B)``;
- ``{m}_q``: the p-value adjusted over every non-reference cell of the metric (``correction``).

Effect sizes:

``mmd``
    The paired cluster MMD^2: ``mean over cluster pairs a != b of <D_a, D_b>``, ``D_a`` the
    difference between the kernel mean embeddings of cluster ``a``'s tokens at the reference and
    at the checkpoint. A U-statistic over clusters, unbiased for the MMD^2 between the two token
    distributions (each cluster weighted equally) whatever the number of clusters and the
    correlation inside one; it can be slightly negative. Kernel ``exp(-|x-y|^2 / (2 sigma^2))``,
    ``sigma`` the reference tokens' median heuristic (variable ``sigma``), the same for every
    checkpoint and resample. Sign flips and bootstrap draws are batched quadratic forms of one
    K x K matrix, so 1000 of each cost next to nothing.
``sinkhorn``, ``sliced_w``, ``gauss_w2``
    Plug-in estimates are biased upward by an amount that shrinks with the sample size; the
    effect is the excess of the value over the mean of its sign-flip null (which carries the
    same finite-sample bias), so it is near 0 without drift for any number of clusters. Each
    resample recomputes the metric, so these use ``transport_resamples`` draws (default 200).
``paired_shift``
    ``sqrt(E|c_i - r_i|^2 / E|r_i - r_j|^2)``: root-mean-square displacement of a token between
    the reference and the checkpoint, relative to the root-mean-square distance between tokens
    of *different* clusters at the reference (pairs over clusters a != b). 0 = no movement, 1 =
    tokens moved as far as one scene is from another. Interval by cluster bootstrap; no p-value:
    a deterministic model's displacement has no sampling null (any non-zero value is a change).

Cross-modal values per checkpoint, with cluster-bootstrap intervals: ``gap`` (Liang et al.
2022; per layer and site) and ``mir`` (Huang et al. 2025; ``hidden`` only, visual tokens vs the
text tokens after the image; the last layer on the post-final-norm state, site ``final``, as the
paper's ``hidden_states[-1]``), and ``mir_total = log10(sum over layers)``.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from driftlens import inference as I
from driftlens.errors import UsageError, raise_if_interrupted
from driftlens.schema import CLUSTER_COORDS, MODALITIES, REPORT_DIMS, Modality, Site
from driftlens.store import Verify, check_report_path, save_report

if TYPE_CHECKING:
    import torch
    import xarray as xr

Metric = Literal["mmd", "sinkhorn", "sliced_w", "gauss_w2", "paired_shift", "shift", "gap", "mir"]
Correction = Literal["bh", "holm"] | None
DISTRIBUTIONAL = ("mmd", "sinkhorn", "sliced_w", "gauss_w2")
TRANSPORT = ("sinkhorn", "sliced_w", "gauss_w2")
PAIRED = ("paired_shift",)
CROSS_MODAL = ("gap", "mir")
ALL_METRICS = DISTRIBUTIONAL + PAIRED + CROSS_MODAL
ALIASES = {"shift": "paired_shift"}
DEFAULT_METRICS = ("mmd", "paired_shift", "gap", "mir")
CORRECTIONS = ("bh", "holm", None)
# geomloss epsilon-scaling factor used by the report. Measured on 470 x 470 tokens, d=96, one
# CPU thread: blur 0.1 sigma with scaling 0.7 takes 0.065 s per call against 0.40 s for blur
# 0.05 sigma with scaling 0.9, and the value moves by 0.7%.
SINKHORN_SCALING = 0.7
FEW_CLUSTERS = 10   # below this, percentile intervals are rough; said in the report's warnings

DEFINITIONS = {
    "mmd": ("squared maximum mean discrepancy (paired cluster estimate)",
            "mean over pairs of distinct clusters a != b of <D_a, D_b>, D_a the difference between the mean "
            "kernel embeddings of cluster a's tokens at the reference and at the checkpoint; Gaussian kernel "
            "exp(-|x-y|^2/(2 sigma^2)), sigma = the reference tokens' median heuristic (variable `sigma`). "
            "Unbiased for MMD^2 between the two token distributions, clusters weighted equally", "1"),
    "sinkhorn": ("debiased Sinkhorn divergence, excess over the no-change null",
                 "geomloss SamplesLoss('sinkhorn', p=2) (cost |x-y|^2/2, blur = attrs sinkhorn_blur x sigma) "
                 "between the reference's and the checkpoint's tokens, minus the mean of the same under "
                 "cluster sign flips", "model units^2"),
    "sliced_w": ("sliced Wasserstein-2 distance, excess over the no-change null",
                 "(mean over random unit projections of W_2^2)^(1/2) between the reference's and the "
                 "checkpoint's tokens, minus the mean of the same under cluster sign flips", "model units"),
    "gauss_w2": ("Gaussian Wasserstein-2 distance, excess over the no-change null",
                 "closed-form W2 between Gaussians fitted to the reference's and the checkpoint's tokens "
                 "(unbiased covariances, exact square roots), minus the mean of the same under cluster sign "
                 "flips", "model units"),
    "paired_shift": ("paired token displacement, relative to the spread between clusters",
                     "sqrt(mean over clusters of mean |c_i - r_i|^2 / mean over token pairs of distinct "
                     "clusters of |r_i - r_j|^2): same token rows at the checkpoint (c) and the reference (r)",
                     "1"),
    "gap": ("modality gap", "|mean(normalize(visual)) - mean(normalize(text))| over the tokens of the "
            "checkpoint (Liang et al. 2022); text = the text tokens after the image", "1"),
    "mir": ("modality integration rate, per-layer term",
            "Frechet distance between visual tokens and the text tokens after the image, both scaled by "
            "1/mean text-token norm, 3-std norm outliers replaced by the per-dimension median, unbiased "
            "covariances, exact square root (Huang et al. 2025); the last layer after the model's final norm", "1"),
}


class DriftError(UsageError):
    """The report cannot be computed from this input; the message names the store, cell or value."""


# ----------------------------------------------------------------------------- input


def _cluster_labels(ds) -> tuple[np.ndarray, str, list[str]]:
    """Per-token cluster labels, the coordinate they came from, and warnings."""
    for name in CLUSTER_COORDS:
        if name in ds.coords:
            notes = [] if name == "cluster" else [
                f"the store has no `cluster` coordinate (captured before clusters existed); resampling "
                f"units are its `{name}` values, which treats renders or twins of one scene as independent; "
                f"recapture with a probe set that declares clusters"]
            return np.asarray(ds[name].values).astype(str), name, notes
    raise DriftError("the dataset has no per-token `cluster`, `group` or `sample` coordinate")


def _text_after_image(ds) -> np.ndarray:
    """Rows that are text tokens placed after the last image token of their probe."""
    sample = ds["sample"].values.astype(str)
    pos = ds["position"].values
    vis = ds["modality"].values.astype(str) == "visual"
    last: dict[str, int] = {}
    for s, p, v in zip(sample, pos, vis):
        if v:
            last[s] = max(last.get(s, -1), int(p))
    return np.array([(not v) and p > last.get(s, -1) for s, p, v in zip(sample, pos, vis)])


def _normalize_metrics(metrics) -> list[str]:
    out = []
    for m in metrics:
        m = ALIASES.get(m, m)
        if m not in ALL_METRICS:
            raise DriftError(f"unknown metric {m!r}; choose from {ALL_METRICS} ('shift' = 'paired_shift')")
        if m not in out:
            out.append(m)
    return out


# ----------------------------------------------------------------------------- cells


class _Rows:
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


def _mmd_cell(r, c, rows: _Rows, sigma, cache, flips, counts, level, where: str):
    h = I.paired_mmd_matrix(r, c, rows.codes, rows.k, sigma, cache=cache)
    try:
        return I.u_statistic_inference(h.cpu(), flips, counts, level)
    except FloatingPointError as exc:
        raise DriftError(f"mmd at {where}: {exc} (sigma {sigma:.4g}); please report this with the store") from exc


def _shift_cell(r, c, rows: _Rows, counts, level):
    est = I.shift_estimates(*I.paired_shift_terms(r, c, rows.codes, rows.k), counts)
    lo, hi = I.percentile_interval(est[1:], level)
    return float(est[0]), lo, hi


def _transport_cell(f, r, c, rows: _Rows, flips, counts, level):
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
    lo, hi = I.percentile_interval(np.asarray(boot), level)
    return I.Inference(value - base, lo, hi, I.p_value(null, value), rows.k)


def _gap_terms(v, t, cv, ct, k):
    """Per-cluster sums of L2-normalized visual / text vectors [K, d] and counts [K]."""
    import torch

    def sums(a, codes, name):
        from driftlens.metrics import _row_norms_nonzero

        a64 = a.to(torch.float64)
        a64 = a64 / _row_norms_nonzero(a64, name)[:, None]
        s = torch.zeros(k, a.shape[1], dtype=torch.float64, device=a.device).index_add_(0, codes, a64)
        n = torch.zeros(k, dtype=torch.float64, device=a.device).index_add_(0, codes, torch.ones_like(a64[:, 0]))
        return s.cpu(), n.cpu()

    return sums(v, cv, "visual tokens") + sums(t, ct, "text tokens")


def _gap_cell(v, t, cv, ct, k, counts, level):
    import torch

    sv, nv, st, nt = _gap_terms(v, t, cv, ct, k)
    w = torch.cat([torch.ones(k, 1, dtype=torch.float64), counts], 1).T          # [1 + B, K]
    gap = (w @ sv) / (w @ nv)[:, None] - (w @ st) / (w @ nt)[:, None]           # [1 + B, d]
    vals = gap.norm(dim=1)
    lo, hi = I.percentile_interval(vals[1:], level)
    return float(vals[0]), lo, hi


def _mir_cell(v, t, cv, ct, k, counts, level):
    """MIR term with its cluster-bootstrap draws.

    Outlier replacement is decided once on the full sample (the 3-std rule is scale-free); each
    draw recomputes the text-norm scale, the means and the unbiased covariances from per-cluster
    sums (float64), and the Frechet distance (Cholesky in float64, symmetric eigenvalues in
    float32). The value itself is :func:`driftlens.metrics.mir`, exact in float64.
    """
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


# ----------------------------------------------------------------------------- the report


def _check_opened_store(ds) -> None:
    """Full integrity check of the store a Dataset was opened from, when every checkpoint is its own.

    A Dataset assembled from several stores (``xr.concat``) keeps the first one's attrs; its
    checkpoints are then not all in that store, and the check is left to each store's own open.
    """
    from driftlens.store import check_store, completed_labels

    path = Path(ds.attrs["store_path"])
    labels = [str(c) for c in ds.checkpoint.values.astype(str)]
    if path.is_dir() and set(labels) <= set(completed_labels(path)):
        check_store(path, "full", labels)


def _as_drift_error(fn):
    """Numeric refusals of the metric functions (plain ``ValueError``) reach the user as :class:`DriftError`."""
    import functools

    from driftlens.errors import DriftlensError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FloatingPointError) as exc:
            if isinstance(exc, DriftlensError):
                raise
            raise DriftError(f"the report cannot be computed from this store: {exc}") from exc

    return wrapper


@_as_drift_error
def drift(ds: xr.Dataset | str | os.PathLike, reference: str | None = None,
          metrics: Sequence[Metric] = DEFAULT_METRICS, sites: Sequence[Site] | None = None,
          modalities: Sequence[Modality] = MODALITIES, n_permutations: int = 1000, n_bootstrap: int = 1000,
          level: float = 0.95, correction: Correction = "bh", transport_resamples: int = 200,
          mir_bootstrap: int | None = None, seed: int = 0, device: str | torch.device = "auto",
          blur: float = 0.1, n_projections: int = 128, progress: bool = True,
          out: str | os.PathLike | None = None, verify: Verify = "full") -> xr.Dataset:
    """Drift of every captured (checkpoint, layer, site, modality) against a reference.

    Parameters
    ----------
    ds : xarray.Dataset or path
        An activation store (:func:`driftlens.open_store`) or a Dataset laid out like one (dims
        checkpoint, layer, token, ``*_dim``; per-token coords sample, cluster, position, lang,
        modality). Without ``cluster`` the ``group`` (then ``sample``) coordinate is the
        resampling unit, and the report's ``warnings`` attribute says so.
    reference : str, optional
        Reference checkpoint label (default: the first).
    metrics : sequence of str
        Any of ``mmd``, ``sinkhorn``, ``sliced_w``, ``gauss_w2``, ``paired_shift`` (or
        ``shift``), ``gap``, ``mir``.
    sites : sequence of str, optional
        Layered sites (default: those in the store among ``hidden``, ``key``, ``query``).
    modalities : sequence of str
        Token modalities for the distributional and paired metrics.
    n_permutations : int
        Cluster sign flips for the p-values (>= 1).
    n_bootstrap : int
        Cluster-bootstrap draws for the intervals (>= 1).
    level : float
        Interval coverage (default 0.95).
    correction : {"bh", "holm", None}
        Multiple-testing adjustment of the p-values over every non-reference cell of a metric
        (``{m}_q``; attrs ``n_tests``): Benjamini-Hochberg (default) or Holm.
    transport_resamples : int
        Cap on sign flips and bootstrap draws for ``sinkhorn``, ``sliced_w`` and ``gauss_w2``
        (each draw recomputes the metric).
    mir_bootstrap : int, optional
        Bootstrap draws for the ``mir`` intervals (default ``n_bootstrap``): each draw costs a
        batched eigendecomposition of a hidden-size square matrix.
    seed : int
        Seeds every draw; the same draws serve every cell.
    device : str
        ``"auto"`` uses CUDA when present.
    blur : float
        Sinkhorn blur as a fraction of the cell's reference sigma (``report.sigma``).
    n_projections : int
        Sliced Wasserstein projections.
    progress : bool
        tqdm bar over the grid.
    out : str or Path, optional
        Also save the report as netCDF here (checked writable before anything is computed).
    verify : {"full", "fast", "none"}
        Integrity check of the store before any metric is computed (see
        :func:`driftlens.store.verify_store`): ``full`` (default) compares every chunk's CRC32
        with the one recorded at capture; ``fast`` checks presence and sizes only.

    Returns
    -------
    xarray.Dataset
        Dims ``checkpoint``, ``layer``, ``site``, ``modality``. Variables ``{m}``, ``{m}_lo``,
        ``{m}_hi``, ``{m}_p``, ``{m}_q`` for the distributional metrics; ``paired_shift`` (+
        ``_lo``, ``_hi``); ``gap`` (+ interval; checkpoint, layer, site); ``mir`` (+ interval;
        checkpoint, layer) and ``mir_total`` (+ interval; checkpoint); ``sigma``.
    """
    import torch
    import xarray as xr
    from tqdm.auto import tqdm

    from driftlens import metrics as M
    from driftlens._version import __version__
    from driftlens.devices import resolve_device
    from driftlens.store import VERIFY_LEVELS, open_store

    if verify not in VERIFY_LEVELS:
        raise DriftError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    if out is not None:
        out = check_report_path(out)
    if not hasattr(ds, "data_vars"):
        ds = open_store(ds, verify=verify)
    elif ds.attrs.get("store_path") and verify == "full" != ds.attrs.get("store_verified"):
        _check_opened_store(ds)
    metrics = _normalize_metrics(metrics)
    for name, val in (("n_permutations", n_permutations), ("n_bootstrap", n_bootstrap),
                      ("transport_resamples", transport_resamples), ("n_projections", n_projections),
                      ("mir_bootstrap", n_bootstrap if mir_bootstrap is None else mir_bootstrap)):
        if int(val) < 1:
            raise DriftError(f"{name} must be >= 1, got {val}")
    if not 0 < level < 1:
        raise DriftError(f"level must be in (0, 1), got {level}")
    if correction not in CORRECTIONS:
        raise DriftError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    if not blur > 0:
        raise DriftError(f"blur must be > 0, got {blur}")
    labels = [str(c) for c in ds.checkpoint.values.astype(str)]
    if not labels:
        raise DriftError("the store holds no completed checkpoint")
    reference = labels[0] if reference is None else reference
    if reference not in labels:
        raise DriftError(f"reference {reference!r} is not a checkpoint of the store; it has {labels}")
    if sites is None:
        sites = [s for s in ("hidden", "key", "query") if s in ds.data_vars]
    missing = [s for s in sites if s not in ds.data_vars]
    if missing or not sites:
        raise DriftError(f"site(s) {missing or list(sites)} not in the store; it has {list(ds.data_vars)}")
    dev = resolve_device(device)
    layers = [int(v) for v in ds.layer.values]
    modality = ds["modality"].values.astype(str)
    cluster, cluster_coord, notes = _cluster_labels(ds)
    unfinished = [c for c in ds.attrs.get("checkpoints", [])
                  if c not in ds.attrs.get("completed", [c]) and c not in labels]   # not opened with include_incomplete
    if unfinished:
        notes.append(f"checkpoint(s) {unfinished} were started but their capture did not finish; the report "
                     f"leaves them out (rerun the capture to complete them)")
    if len(labels) < 2:
        notes.append(f"the store holds only the reference checkpoint {labels}: there is no drift to report")
    after = _text_after_image(ds)
    vis = torch.as_tensor(modality == "visual", device=dev)      # cross-modal rows: visual tokens ...
    txt = torch.as_tensor(after, device=dev)                      # ... and the text after the image

    mod_rows = {}
    for mod in modalities:
        rows = np.flatnonzero(modality == mod)
        if rows.size:
            mod_rows[mod] = _Rows(rows, cluster, dev)
            try:
                I.check_clusters(mod_rows[mod].k, f"{mod} tokens")
            except ValueError as exc:
                raise DriftError(f"{exc} (the store's `{cluster_coord}` coordinate; add probes of more "
                                 f"scenes / source images)") from None
            if mod_rows[mod].k < FEW_CLUSTERS:
                notes.append(f"{mod} tokens come from {mod_rows[mod].k} clusters (< {FEW_CLUSTERS}): "
                             f"intervals and p-values are rough")
    all_codes_np, all_uniq = I.cluster_codes(cluster)
    k_all = len(all_uniq)
    all_codes = torch.as_tensor(all_codes_np, device=dev)
    draws = {}

    def flips_for(k, n):
        return draws.setdefault(("f", k, n), I.sign_flips(k, n, seed))

    def counts_for(k, n):
        return draws.setdefault(("b", k, n), I.bootstrap_counts(k, n, seed + 1))

    dist = [m for m in metrics if m in DISTRIBUTIONAL]
    fns = _transport_fns([m for m in dist if m in TRANSPORT], blur, n_projections, seed)
    n_tr = min(transport_resamples, n_permutations), min(transport_resamples, n_bootstrap)

    C, L, S, Mo = len(labels), len(layers), len(sites), len(modalities)
    res = {}
    for m in dist:
        for suf in ("", "_lo", "_hi", "_p"):
            res[m + suf] = np.full((C, L, S, Mo), np.nan)
    if "paired_shift" in metrics:
        for suf in ("", "_lo", "_hi"):
            res["paired_shift" + suf] = np.full((C, L, S, Mo), np.nan)
    gap = {s: np.full((C, L, S), np.nan) for s in ("", "_lo", "_hi")} if "gap" in metrics else None
    do_mir = "mir" in metrics and "hidden" in ds.data_vars
    mir = {s: np.full((C, L), np.nan) for s in ("", "_lo", "_hi")} if do_mir else None
    n_mir = n_bootstrap if mir_bootstrap is None else int(mir_bootstrap)
    mir_boot = np.zeros((C, n_mir)) if do_mir else None
    sigmas = np.full((L, S, Mo), np.nan)
    if "mir" in metrics and not do_mir:
        notes.append("mir needs the `hidden` site, which the store does not have; mir was skipped")
    last_layer = int(ds.attrs.get("n_layers", max(layers) + 1)) - 1
    final_state = do_mir and last_layer in layers and "final" in ds.data_vars
    if do_mir and last_layer in layers and not final_state:
        notes.append(f"mir at the last layer ({last_layer}) uses the block output before the model's final "
                     f"norm: the store has no `final` site (Huang et al. use the post-norm state); recapture "
                     f"with sites including 'final'")

    def load(label, site, layer):  # [T, d] float32 on device
        da = ds[site].sel(checkpoint=label)
        arr = np.asarray((da.sel(layer=layer) if layer is not None else da).values, dtype=np.float32)
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            where = f"checkpoint {label!r}, site {site!r}" + (f", layer {layer}" if layer is not None else "")
            raise DriftError(f"{where}: {int(bad.sum())} token row(s) hold NaN/Inf (first at row "
                             f"{int(np.flatnonzero(bad)[0])}); the store is damaged or the model overflowed "
                             f"(recapture that checkpoint)")
        return torch.as_tensor(arr, device=dev)

    grid = [(si, site, li, layer) for si, site in enumerate(sites) for li, layer in enumerate(layers)]
    mir_grid = [(li, layer) for li, layer in enumerate(layers)] if do_mir else []
    bar = tqdm(total=(len(grid) + len(mir_grid)) * C, desc="drift", disable=not progress, unit="cell")
    for si, site, li, layer in grid:
        raise_if_interrupted()
        ref_raw = load(reference, site, layer)                # [T, d]
        centre = ref_raw.mean(0, dtype=torch.float64).to(ref_raw.dtype)
        ref = ref_raw - centre          # kernels and distances are translation-invariant; centring keeps float32 exact
        per_mod = {}
        for mi, mod in enumerate(modalities):
            if mod not in mod_rows:
                continue
            rows = mod_rows[mod]
            r = ref[rows.rows]
            sigma = M.median_sigma(r, pairs="reference", seed=seed)
            sigmas[li, si, mi] = sigma
            per_mod[mod] = {"r": r, "sigma": sigma}
            if "mmd" in dist and r.shape[0] <= 4096:     # the reference's kernel: one tile, kept for the cell
                per_mod[mod]["cache"] = {}
        for ci, label in enumerate(labels):
            cur_raw = ref_raw if label == reference else load(label, site, layer)
            cur = cur_raw - centre
            for mi, mod in enumerate(modalities):
                if mod not in per_mod:
                    continue
                if label == reference:        # not tested: effect 0 by definition, no p-value
                    for m in dist + [m for m in PAIRED if m in metrics]:
                        for suf in ("", "_lo", "_hi"):
                            res[m + suf][ci, li, si, mi] = 0.0
                    continue
                rows, pm = mod_rows[mod], per_mod[mod]
                r, c = pm["r"], cur[rows.rows]
                if "mmd" in dist:
                    inf = _mmd_cell(r, c, rows, pm["sigma"], pm.get("cache"),
                                    flips_for(rows.k, n_permutations), counts_for(rows.k, n_bootstrap), level,
                                    f"checkpoint {label!r}, site {site!r}, layer {layer}, {mod} tokens")
                    _put(res, "mmd", (ci, li, si, mi), inf)
                for m, f in fns.items():
                    inf = _transport_cell(lambda a, b, f=f, s=pm["sigma"]: f(a, b, s), r, c, rows,
                                          flips_for(rows.k, n_tr[0]), counts_for(rows.k, n_tr[1]), level)
                    _put(res, m, (ci, li, si, mi), inf)
                if "paired_shift" in metrics:
                    vals = _shift_cell(r, c, rows, counts_for(rows.k, n_bootstrap), level)
                    for suf, v in zip(("", "_lo", "_hi"), vals):
                        res["paired_shift" + suf][ci, li, si, mi] = v
            if gap is not None:
                vals = _gap_cell(cur_raw[vis], cur_raw[txt], all_codes[vis], all_codes[txt], k_all,
                                 counts_for(k_all, n_bootstrap), level)
                for suf, v in zip(("", "_lo", "_hi"), vals):
                    gap[suf][ci, li, si] = v
            bar.update(1)
    for li, layer in mir_grid:
        use_final = final_state and layer == last_layer
        for ci, label in enumerate(labels):
            cur = load(label, "final", None) if use_final else load(label, "hidden", layer)
            value, lo, hi, boot = _mir_cell(cur[vis], cur[txt], all_codes[vis], all_codes[txt], k_all,
                                            counts_for(k_all, n_mir), level)
            if not np.isfinite(value):
                raise DriftError(f"mir is not finite at checkpoint {label!r}, layer {layer}")
            mir[""][ci, li], mir["_lo"][ci, li], mir["_hi"][ci, li] = value, lo, hi
            mir_boot[ci] += boot
            bar.update(1)
    bar.close()

    coords = {"checkpoint": labels, "layer": layers, "site": list(sites), "modality": list(modalities)}
    dims4 = REPORT_DIMS
    data = {name: (dims4, arr, _attrs(name, level, n_permutations, n_bootstrap, n_tr)) for name, arr in res.items()}
    n_tests = {}
    if correction is not None:
        not_ref = np.array([lab != reference for lab in labels])
        for m in dist:
            p = np.where(not_ref[:, None, None, None], res[m + "_p"], np.nan)
            q = I.adjust_pvalues(p, correction)
            n_tests[m] = int(np.isfinite(p).sum())
            data[m + "_q"] = (dims4, q, {
                "long_name": f"{DEFINITIONS[m][0]}, adjusted p-value", "units": "1", "correction": correction,
                "n_tests": n_tests[m],
                "definition": f"{'Benjamini-Hochberg' if correction == 'bh' else 'Holm'} adjustment of "
                              f"{m}_p over the {n_tests[m]} cells that are not the reference"})
    if gap is not None:
        for suf, arr in gap.items():
            data["gap" + suf] = (("checkpoint", "layer", "site"), arr, _attrs("gap" + suf, level, n_permutations,
                                                                              n_bootstrap, n_tr))
    if do_mir:
        for suf, arr in mir.items():
            data["mir" + suf] = (("checkpoint", "layer"), arr, {
                **_attrs("mir" + suf, level, n_permutations, n_mir, n_tr), "site": "hidden",
                "last_layer_state": "post-final-norm (site `final`)" if final_state else "block output, pre-norm"})
        total = np.log10(mir[""].sum(axis=1))
        tlo, thi = (np.log10(np.quantile(mir_boot, q, axis=1)) for q in ((1 - level) / 2, (1 + level) / 2))
        tot_attrs = {"long_name": "modality integration rate", "units": "log10",
                     "definition": f"log10 of the sum over layers {layers} of the per-layer MIR term (site hidden; "
                                   + ("the last layer's term from site `final`, post-final-norm)" if final_state
                                      else "the last layer's term from the pre-norm block output)")}
        data["mir_total"] = (("checkpoint",), total, tot_attrs)
        data["mir_total_lo"] = (("checkpoint",), tlo, {**tot_attrs, "long_name": "mir_total, interval low"})
        data["mir_total_hi"] = (("checkpoint",), thi, {**tot_attrs, "long_name": "mir_total, interval high"})
    data["sigma"] = (("layer", "site", "modality"), sigmas,
                     {"long_name": "kernel bandwidth", "units": "model units",
                      "definition": "median-heuristic sigma of the reference's tokens (unique pairs); the MMD "
                                    "bandwidth for every checkpoint and resample, and the unit of the Sinkhorn blur"})
    report = xr.Dataset(data, coords=coords)
    for w in notes:
        warnings.warn(w, stacklevel=3)   # the caller of drift(), past its error wrapper
    report.attrs.update({
        "reference": reference,
        "model_type": str(ds.attrs.get("model_type", "")),
        "family": str(ds.attrs.get("family", "")),
        "n_layers": int(ds.attrs.get("n_layers", len(layers))),
        "probe_set": str(ds.attrs.get("probe_set", "")),
        "cluster_coord": cluster_coord,
        "n_clusters": int(k_all),
        **{f"n_clusters_{mod}": int(r.k) for mod, r in mod_rows.items()},
        "n_permutations": int(n_permutations),
        "n_bootstrap": int(n_bootstrap),
        "transport_resamples": int(transport_resamples),
        "mir_bootstrap": int(n_mir) if do_mir else 0,
        "level": float(level),
        "correction": str(correction),
        "n_tests": int(sum(n_tests.values())),
        "sinkhorn_blur": float(blur),
        "sinkhorn_scaling": SINKHORN_SCALING,
        "seed": int(seed),
        "inference": "paired design; units of resampling are clusters: p-values from cluster sign flips "
                     "(swap reference and checkpoint tokens of whole clusters), intervals from a cluster "
                     "bootstrap (percentile)",
        "warnings": "\n".join(notes),
        "driftlens_version": __version__,
    })
    if out is not None:
        save_report(report, out)
    return report


def _put(res, m, idx, inf: I.Inference) -> None:
    res[m][idx], res[m + "_lo"][idx], res[m + "_hi"][idx], res[m + "_p"][idx] = inf.effect, inf.lo, inf.hi, inf.p


def _transport_fns(names, blur, n_projections, seed):
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


def _attrs(name: str, level, n_perm, n_boot, n_tr) -> dict:
    for base in sorted(DEFINITIONS, key=len, reverse=True):
        if name == base or name.startswith(base + "_"):
            break
    suffix = name[len(base) + 1:]
    long_name, definition, units = DEFINITIONS[base]
    boot = n_tr[1] if base in TRANSPORT else n_boot
    if suffix in ("lo", "hi"):
        return {"long_name": f"{long_name}, {level:.0%} interval {'low' if suffix == 'lo' else 'high'} end",
                "units": units, "level": level, "n_bootstrap": boot,
                "definition": f"percentile interval over {boot} cluster-bootstrap draws (clusters drawn with "
                              f"replacement)"}
    if suffix == "p":
        perm = n_tr[0] if base in TRANSPORT else n_perm
        return {"long_name": f"{long_name}, permutation p-value", "units": "1", "n_permutations": perm,
                "definition": f"(1 + k) / (1 + {perm}), k cluster sign flips (reference and checkpoint tokens of "
                              f"whole clusters swapped) whose statistic is >= the observed one; one-sided"}
    return {"long_name": long_name, "units": units, "definition": definition}
