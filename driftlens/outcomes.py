"""Drift and outcomes cluster by cluster: how far each cluster's tokens moved, and whether that goes
with what happened to the cluster's outcome.

A drift report says how far a checkpoint's tokens moved *on average*; whether drift costs a model
anything is a question about units: do the scenes whose visual tokens moved most lose the most
grounding? Two functions answer it:

- :func:`cluster_displacement` -- per cluster (scene), the paired token displacement between a
  reference and a checkpoint read from an activation store, in the units of the report's
  ``paired_shift`` (the RMS displacement of a token over the RMS distance between tokens of
  different clusters at the reference), from the report's own per-cluster terms
  (:func:`driftlens.inference.paired_shift_terms`): the mean of the squared per-cluster values
  is the square of the report's ``paired_shift``;
- :func:`association` -- the across-cluster association of two per-cluster quantities (Spearman
  or Pearson), with a cluster-bootstrap interval and a permutation p-value. The cluster is the
  unit: per-row values (several images of a scene) are averaged per cluster first, because rows
  of one cluster are not independent (treating them as units rejects "no association" far too
  often; tested by simulation).

The interval and p-value cover the sampling of clusters within one run. Over several training runs
(seeds) the run is the unit: compute the association per run and compare runs.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal, NamedTuple

import numpy as np

from driftlens.errors import SelectionError, UsageError
from driftlens.select import checkpoint_labels, cluster_unit, pick_layers, pick_site

__all__ = ["Association", "association", "cluster_displacement"]

MIN_CLUSTERS = 3


class Association(NamedTuple):
    """An across-cluster association with its cluster-bootstrap interval and permutation p-value.

    Attributes
    ----------
    effect : float
        The correlation (Spearman: of the average ranks; Pearson: of the values).
    lo, hi : float
        Percentile interval of the correlation over cluster-bootstrap draws.
    p : float
        Two-sided permutation p-value of "no association" (``(1 + #|null| >= |effect|) / (B + 1)``).
    n_clusters : int
    method : str
    """

    effect: float
    lo: float
    hi: float
    p: float
    n_clusters: int
    method: str


def cluster_displacement(ds, reference: str, checkpoint: str, *, site: str = "hidden",
                         modality: Literal["visual", "text"] = "visual", layers=None):
    """Per-cluster paired displacement of tokens between two checkpoints of a store.

    For cluster ``a`` at one layer: ``sqrt(mean_{i in a} |c_i - r_i|^2 / U)``, where ``r_i``, ``c_i``
    are the token's states at ``reference`` and ``checkpoint`` and ``U`` is the mean over pairs of
    distinct clusters of the mean squared distance between their tokens at the reference (the
    report's ``paired_shift`` denominator). 0: the cluster's tokens did not move; 1: they moved as
    far as one cluster is from another. ``sqrt(mean over clusters of value^2)`` is the report's
    ``paired_shift`` of the cell.

    Parameters
    ----------
    ds : xarray.Dataset or path
        An activation store (:func:`driftlens.open_store`; a path is opened with ``verify="fast"``).
    reference, checkpoint : str
        Checkpoint labels.
    site : str
        ``hidden``, ``key``, ``embed`` or ``final``.
    modality : {"visual", "text"}
        Which token rows.
    layers : sequence of int, optional
        Default every layer of the store (``embed`` / ``final``: none).

    Returns
    -------
    xarray.DataArray
        Dims ``(layer, cluster)`` (``(cluster,)`` for a site without layers), float64; clusters in
        order of first appearance in the store; attributes say what it is.
    """
    import torch
    import xarray as xr

    from driftlens import inference as I

    ds = _open(ds)
    labels = checkpoint_labels(ds)
    for name, value in (("reference", reference), ("checkpoint", checkpoint)):
        if value not in labels:
            raise SelectionError(f"{name} {value!r} is not a checkpoint of the store; it has {labels}")
    pick_site(ds, site)
    rows = np.flatnonzero(np.asarray(ds["modality"].values) == modality)
    if rows.size == 0:
        raise UsageError(f"the store has no {modality!r} tokens")
    coord = cluster_unit(ds)
    codes_np, uniq = I.cluster_codes(np.asarray(ds[coord].values)[rows])
    k = len(uniq)
    if k < 2:
        raise UsageError(f"cluster_displacement: {k} cluster(s) among the {modality} tokens; at least 2 are needed")
    codes = torch.as_tensor(codes_np)
    var = ds[site]
    has_layers = "layer" in var.dims
    if not has_layers and layers is not None:
        raise UsageError(f"site {site!r} has no layers; leave layers out")
    todo = pick_layers(ds, layers, where="the store") if has_layers else [None]
    out = np.empty((len(todo), k))
    ones = torch.ones(k, 1, dtype=torch.float64)
    for i, layer in enumerate(todo):
        sel = {"layer": layer} if layer is not None else {}
        r = torch.as_tensor(np.asarray(var.sel(checkpoint=reference, **sel).values)[rows])     # [n, d]
        c = torch.as_tensor(np.asarray(var.sel(checkpoint=checkpoint, **sel).values)[rows])    # [n, d]
        centre = r.mean(0, dtype=torch.float64).to(r.dtype)
        disp, pair = I.paired_shift_terms(r - centre, c - centre, codes, k)       # [K], [K, K]
        between = float(I.quadratic_u(pair, ones)[0])
        if not between > 0:
            raise UsageError(f"the {modality} tokens of different clusters coincide at the reference "
                             f"(site {site!r}, layer {layer}); the displacement has no scale")
        out[i] = np.sqrt(np.clip(disp.numpy(), 0.0, None) / between)
    attrs = {"long_name": "per-cluster paired displacement", "units": "dimensionless (distance between clusters)",
             "definition": "sqrt(mean over the cluster's tokens of |c_i - r_i|^2 / mean over pairs of distinct "
                           "clusters of the mean squared distance between their tokens at the reference)",
             "reference": reference, "checkpoint": checkpoint, "site": site, "modality": modality,
             "cluster_coordinate": coord}
    clusters = [str(u) for u in uniq]
    if has_layers:
        return xr.DataArray(out, dims=("layer", "cluster"), coords={"layer": todo, "cluster": clusters}, attrs=attrs)
    return xr.DataArray(out[0], dims=("cluster",), coords={"cluster": clusters}, attrs=attrs)


def _open(ds):
    if isinstance(ds, (str, os.PathLike)):
        from driftlens.store import open_store

        return open_store(ds)
    return ds


def association(x, y, clusters=None, *, method: Literal["spearman", "pearson"] = "spearman",
                n_bootstrap: int = 1000, n_permutations: int = 1000, level: float = 0.95,
                seed: int = 0) -> Association:
    """Across-cluster association of ``x`` and ``y``, with a cluster-bootstrap interval and a permutation p.

    Parameters
    ----------
    x, y : array-like, mapping or xarray.DataArray
        One value per row (arrays of equal length, rows in the same order), or per cluster:
        mappings ``{cluster: value}`` or DataArrays with a ``cluster`` dimension, matched by
        cluster label (the label sets must be equal).
    clusters : array-like, optional
        With arrays: the cluster of each row. Rows of one cluster are averaged first: the cluster
        is the unit of the interval and the test. Without it every row is its own cluster.
    method : {"spearman", "pearson"}
        Spearman's rank correlation (average ranks for ties) or Pearson's.
    n_bootstrap, n_permutations : int
        Cluster-bootstrap draws (clusters with replacement, :func:`driftlens.inference.bootstrap_counts`
        with ``seed + 1``) and permutations of ``y`` against ``x`` (``numpy`` generator ``seed``).
    level : float
        Interval coverage.
    seed : int

    Returns
    -------
    Association(effect, lo, hi, p, n_clusters, method)
        The p-value is two-sided. Bootstrap draws where either side is constant are left out.
    """
    from driftlens import inference as I

    if method not in ("spearman", "pearson"):
        raise UsageError(f"method must be 'spearman' or 'pearson', got {method!r}")
    for name, value in (("n_bootstrap", n_bootstrap), ("n_permutations", n_permutations)):
        if int(value) < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if not 0 < level < 1:
        raise UsageError(f"level must be in (0, 1), got {level}")
    xs, ys = _per_cluster(x, y, clusters)
    k = xs.size
    if k < MIN_CLUSTERS:
        raise UsageError(f"association: {k} cluster(s); at least {MIN_CLUSTERS} are needed")
    for name, v in (("x", xs), ("y", ys)):
        if not np.isfinite(v).all():
            raise UsageError(f"association: {name} holds {int((~np.isfinite(v)).sum())} non-finite value(s)")
        if np.ptp(v) == 0:
            raise UsageError(f"association: {name} is constant over the clusters; it has no correlation")
    rank = method == "spearman"
    a, b = (_ranks(xs), _ranks(ys)) if rank else (xs, ys)
    effect = float(_rowcorr(a[None], b[None])[0])
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(np.arange(k), (int(n_permutations), 1)), axis=1)       # [P, K]
    null = _rowcorr(np.broadcast_to(a, perms.shape), b[perms])
    tol = 1e3 * np.finfo(np.float64).eps
    p = float((1 + np.count_nonzero(np.abs(null) >= abs(effect) - tol)) / (null.size + 1))
    counts = I.bootstrap_counts(k, int(n_bootstrap), seed + 1).numpy().astype(np.int64)  # [K, B]
    idx = np.stack([np.repeat(np.arange(k), counts[:, j]) for j in range(counts.shape[1])])  # [B, K]
    bx, by = xs[idx], ys[idx]
    if rank:
        bx, by = _ranks(bx), _ranks(by)
    boot = _rowcorr(bx, by)
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        raise UsageError("association: every bootstrap draw was constant on one side; give more clusters")
    lo, hi = I.percentile_interval(boot, level)
    return Association(effect, lo, hi, p, int(k), method)


def _per_cluster(x, y, clusters) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as float64 arrays with one entry per cluster, in the same cluster order."""
    mx, my = _as_mapping(x), _as_mapping(y)
    if (mx is None) != (my is None):
        raise UsageError("association: give x and y both per cluster (mappings or DataArrays with a 'cluster' "
                         "dimension) or both per row (arrays)")
    if mx is not None:
        if clusters is not None:
            raise UsageError("association: clusters= is for per-row arrays; x and y are already per cluster")
        if set(mx) != set(my):
            only_x, only_y = sorted(set(mx) - set(my), key=str), sorted(set(my) - set(mx), key=str)
            raise UsageError(f"association: x and y name different clusters (only in x: {only_x[:5]}, only in y: "
                             f"{only_y[:5]})")
        keys = list(mx)
        return (np.asarray([mx[c] for c in keys], dtype=np.float64),
                np.asarray([my[c] for c in keys], dtype=np.float64))
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or ys.shape != xs.shape:
        raise UsageError(f"association: x and y must be 1-D of the same length, got shapes {xs.shape} and {ys.shape}")
    if clusters is None:
        return xs, ys
    from driftlens.inference import cluster_codes

    labels = np.asarray(clusters)
    if labels.shape != xs.shape:
        raise UsageError(f"association: clusters has {labels.size} labels for {xs.size} rows")
    codes, uniq = cluster_codes(labels)
    n = np.bincount(codes, minlength=len(uniq)).astype(np.float64)
    return np.bincount(codes, xs, len(uniq)) / n, np.bincount(codes, ys, len(uniq)) / n


def _as_mapping(v) -> dict | None:
    if isinstance(v, Mapping):
        return dict(v)
    dims = getattr(v, "dims", None)
    if dims is not None and tuple(dims) == ("cluster",):
        return {str(c): float(val) for c, val in zip(v["cluster"].values, np.asarray(v.values))}
    if dims is not None and "cluster" in dims:
        raise UsageError(f"association: a DataArray must have the single dimension 'cluster', got {tuple(dims)} "
                         "(select one layer first)")
    return None


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (1..K, ties share their mean rank) along the last axis."""
    a = np.asarray(a, dtype=np.float64)
    k = a.shape[-1]
    order = np.argsort(a, axis=-1, kind="stable")
    s = np.take_along_axis(a, order, -1)
    pos = np.broadcast_to(np.arange(k), a.shape)
    start = np.concatenate([np.ones(a.shape[:-1] + (1,), bool), s[..., 1:] != s[..., :-1]], -1)
    end = np.concatenate([s[..., 1:] != s[..., :-1], np.ones(a.shape[:-1] + (1,), bool)], -1)
    first = np.maximum.accumulate(np.where(start, pos, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(end, pos, k), -1), axis=-1), -1)
    out = np.empty_like(a)
    np.put_along_axis(out, order, (first + last) / 2.0 + 1.0, -1)
    return out


def _rowcorr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` [..., K] -> [...] (NaN if constant)."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / den, np.nan)
