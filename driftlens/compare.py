"""Comparative drift: contrasts between cells of a report, and training runs as the unit of replication.

A drift report answers "how far did this checkpoint move from the reference, given the probe set?".
For a deterministic model evaluated on the same images, any weight change moves the activations,
so that point null is false by construction and its p-values sit at their floor. The questions a
user brings are comparisons, and this module answers them from the report itself (plain data in,
plain data out; nothing is recomputed from activations):

**Contrasts** (:func:`contrasts`). The same metric at two cells that share the reference: checkpoint
vs checkpoint (``ko-5`` vs ``en-5``), trajectory vs trajectory step by step
(:func:`trajectory_pairs`: ``ko-k`` vs ``en-k``), layer vs layer. Every cell of a report keeps its
cluster-bootstrap draws (``{m}_boot``), and draw ``b`` resamples the *same* clusters in every cell
(the draws are a function of the seed and the number of clusters only), so the paired difference of
two cells' draws is the bootstrap of their difference -- for the pair-term metrics (paired MMD^2,
paired shift, gap, MIR) exactly the difference of the two pair-term matrices under one draw.

**Two levels of uncertainty**, named in every variable's attributes so nobody confuses them:

- *within a run* (``{m}_contrast_lo`` / ``_hi`` / ``_p``): probe sampling only -- "would this run's
  models still differ this way on other scenes?". Percentile interval of the paired draws; the
  p-value is two-sided, from the same draws (the interval's inversion: ``p <= 1 - level`` exactly
  when the interval excludes 0, up to the draws' granularity);
- *across runs* (``{m}_contrast_runs`` / ``_runs_lo`` / ``_runs_hi`` / ``_runs_p`` /
  ``_runs_needed``): several training runs (seeds, data orders) of the same design, stacked on a
  ``run`` dim (:func:`combine_runs`), are the replication unit. The interval is hierarchical --
  runs, then clusters within runs: ``mean +- t_{R-1} * se`` with
  ``se^2 = s^2 / R + v_probe``, ``s`` the standard deviation of the per-run values and ``v_probe``
  the variance of the run-mean under the common cluster draws (the runs share one probe set, so its
  sampling error does not average out over runs; counting it again is conservative). The test is
  Student's t over the runs (df ``R - 1``), not an exact sign flip over runs: the smallest two-sided
  sign-flip p-value with R runs is ``2^(1-R)`` (0.25 at 3 runs, 0.0625 at 5), so it could never say
  "yes" at 0.05 below 6 runs; the t-test assumes roughly normal run effects, and its calibration is
  checked by simulation with heavy-tailed run effects too (``tests/unit/test_calibration_runs.py``).
  ``_runs_needed`` is the number of runs at which the observed mean effect would reach 80% power in
  that test (noncentral t; ``inf`` when no number of runs would, because the probe set's own
  sampling error is larger).

**A minimum effect of interest** (``min_effect``) turns "is it different from zero?" into a question
that can come out "no": ``{var}_pmin`` is a one-sided p-value of "the effect exceeds ``min_effect``"
(within a run: the share of draws at or below it; across runs: one-sided t). For a contrast it reads
"the first cell exceeds the second by at least ``min_effect``" -- e.g. Korean drift exceeds the
English control's by a margin.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from driftlens.errors import DataError, UsageError
from driftlens.registry import METRICS

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["ACROSS", "CONTRAST_DIMS", "WITHIN", "across_runs", "bootstrap_pvalue", "cell_pmin", "combine_runs",
           "contrast_label", "contrasts", "run_stats", "runs_needed", "trajectory_pairs"]

#: The dim a contrast replaces -> the dim its contrasts lie along (coordinate values "a - b").
CONTRAST_DIMS = {"checkpoint": "contrast", "layer": "layer_contrast"}
WITHIN = "probe sampling only (clusters of one run's probe set, resampled); the training run's own variation is not " \
         "covered"
ACROSS = "training runs (hierarchical: runs, then clusters within runs); Student t over runs, df = runs - 1"
#: what must agree between the runs of one combined report (attrs; the draws are paired only then)
_SAME_ATTRS = ("reference", "probe_set", "probe_fingerprint", "token_selection", "seed", "n_bootstrap",
               "mir_bootstrap", "transport_resamples", "level", "model_type", "cluster_coord")


# ----------------------------------------------------------------------------- naming the pairs


def contrast_label(a, b) -> str:
    """The coordinate value of the contrast ``a`` minus ``b``: ``"a - b"``."""
    return f"{a} - {b}"


def trajectory_pairs(labels: Sequence[str], first: str, second: str) -> list[tuple[str, str]]:
    """Pair two trajectories step by step: ``first + s`` with ``second + s`` for every common suffix ``s``.

    ``trajectory_pairs(["base", "ko-1", "ko-2", "en-1", "en-2"], "ko-", "en-")`` gives
    ``[("ko-1", "en-1"), ("ko-2", "en-2")]``, in the order of ``first``'s checkpoints.
    """
    labels = [str(c) for c in labels]
    a = {c[len(first):]: c for c in labels if c.startswith(first)}
    b = {c[len(second):]: c for c in labels if c.startswith(second)}
    pairs = [(a[s], b[s]) for s in a if s in b]
    if not pairs:
        raise UsageError(f"no checkpoint pairs {first!r}* / {second!r}* with a common step among {labels}")
    return pairs


def _pairs(values, pairs, dim: str) -> list[tuple]:
    """Validate ``pairs`` of coordinate values along ``dim`` (``"a:b"`` strings accepted)."""
    have = [v.item() if hasattr(v, "item") else v for v in values]
    conv = (lambda v: int(v)) if dim == "layer" else str
    out = []
    for p in pairs:
        if isinstance(p, str):
            parts = p.split(":")
            if len(parts) != 2 or not all(parts):
                raise UsageError(f"contrast {p!r} is not of the form A:B (e.g. 'ko-5:en-5')")
            p = tuple(parts)
        try:
            a, b = (conv(x) for x in p)
        except (TypeError, ValueError):
            raise UsageError(f"contrast {p!r} is not a pair of {dim} values") from None
        missing = [x for x in (a, b) if x not in have]
        if missing:
            raise UsageError(f"contrast {a} - {b}: {dim} {missing} not in the report; it has {have}")
        if a == b:
            raise UsageError(f"contrast {a} - {b} compares a {dim} with itself")
        out.append((a, b))
    if not out:
        raise UsageError(f"no {dim} contrast given")
    return out


# ----------------------------------------------------------------------------- within a run


def bootstrap_pvalue(draws: np.ndarray, threshold: float | np.ndarray = 0.0, side: str = "two-sided") -> np.ndarray:
    """p-values from paired bootstrap draws along the last axis (NaN draws ignored).

    ``side="two-sided"``: ``min(1, 2 min(1 + #{d <= t}, 1 + #{d >= t}) / (1 + B))``, the inversion of
    the percentile interval; ``"greater"``: ``(1 + #{d <= t}) / (1 + B)``, the evidence that the effect
    exceeds ``t``. Never 0. NaN where a cell has no draws.
    """
    d = np.asarray(draws, dtype=np.float64)
    t = np.asarray(threshold, dtype=np.float64)[..., None]
    valid = np.isfinite(d)
    n = valid.sum(-1)
    below = ((d <= t) & valid).sum(-1)
    above = ((d >= t) & valid).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if side == "greater":
            p = (1.0 + below) / (1.0 + n)
        elif side == "two-sided":
            p = np.minimum(1.0, 2.0 * np.minimum(1.0 + below, 1.0 + above) / (1.0 + n))
        else:
            raise UsageError(f"side must be 'two-sided' or 'greater', got {side!r}")
    return np.where(n > 0, p, np.nan)


def _quantiles(draws: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    a = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)      # all-NaN cells stay NaN
            lo, hi = np.nanquantile(draws, [a, 1.0 - a], axis=-1)
    return lo, hi


def _metrics_with_draws(report, metrics, need_dim: str | None = None) -> list[str]:
    names = [m for m in list(METRICS) + ["mir_total"] if f"{m}_boot" in report.data_vars and m in report.data_vars]
    if metrics is not None:
        unknown = [m for m in metrics if m not in names]
        if unknown:
            raise UsageError(f"metric(s) {unknown} have no bootstrap draws in the report (`{{metric}}_boot`); "
                             f"it has draws for {names} (reports written before driftlens kept draws: recompute)")
        names = [m for m in names if m in metrics]
    if need_dim is not None:
        names = [m for m in names if need_dim in report[m].dims]
    return names


def contrasts(report: xr.Dataset, pairs, *, along: str = "checkpoint", metrics: Sequence[str] | None = None,
              level: float | None = None, min_effect: float | Mapping[str, float] | None = None) -> xr.Dataset:
    """Contrasts of the same metric between cells of a report that share its reference, within each run.

    Parameters
    ----------
    report : xarray.Dataset
        A drift report with bootstrap draws (``{m}_boot``), of one run or of several (``run`` dim).
    pairs : sequence of (a, b) or "a:b"
        Coordinate values along ``along``: checkpoint labels, or layers. The contrast is ``a - b``.
    along : {"checkpoint", "layer"}
        The dim the pairs lie on; the contrasts lie along ``contrast`` (checkpoints) or
        ``layer_contrast`` (layers), with coordinates ``{dim}_a`` and ``{dim}_b``.
    metrics : sequence of str, optional
        Default: every metric with draws.
    level : float, optional
        Interval coverage (default the report's ``level``).
    min_effect : float or mapping metric -> float, optional
        Adds ``{var}_pmin``: one-sided p-value of "a exceeds b by more than min_effect".

    Returns
    -------
    xarray.Dataset
        Per metric ``m`` and ``K`` = ``contrast`` or ``layer_contrast``: ``{m}_{K}`` (a - b),
        ``{m}_{K}_lo`` / ``_hi`` (within-run percentile interval of the paired draws), ``{m}_{K}_p``
        (two-sided), ``{m}_{K}_ratio`` (a / b), ``{m}_{K}_boot`` (the paired draws' differences);
        ``{m}_{K}_pmin`` with ``min_effect``. Merge it into the report with ``report.merge(...)``.
    """
    import xarray as xr

    if along not in CONTRAST_DIMS:
        raise UsageError(f"contrasts lie along 'checkpoint' or 'layer', got {along!r}")
    if along not in report.dims:
        raise UsageError(f"the report has no {along!r} dim")
    kind = CONTRAST_DIMS[along]
    pairs = _pairs(report[along].values, pairs, along)
    level = float(report.attrs.get("level", 0.95) if level is None else level)
    if not 0 < level < 1:
        raise UsageError(f"level must be in (0, 1), got {level}")
    names = _metrics_with_draws(report, metrics, need_dim=along)
    idx = xr.Variable(kind, [contrast_label(a, b) for a, b in pairs])
    coords = {kind: idx, f"{along}_a": (kind, [a for a, _ in pairs]), f"{along}_b": (kind, [b for _, b in pairs])}
    out = {}
    for m in names:
        eff, boot = report[m], report[f"{m}_boot"]
        a_sel = {along: xr.DataArray([a for a, _ in pairs], dims=kind)}
        b_sel = {along: xr.DataArray([b for _, b in pairs], dims=kind)}
        diff = (eff.sel(a_sel) - eff.sel(b_sel)).drop_vars(along, errors="ignore")
        dboot = (boot.sel(a_sel) - boot.sel(b_sel)).drop_vars(along, errors="ignore").transpose(..., "draw")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (eff.sel(a_sel) / eff.sel(b_sel)).drop_vars(along, errors="ignore")
        lo, hi = _quantiles(dboot.values, level)
        dims = dboot.dims[:-1]
        units = METRICS[m].units if m in METRICS else "1"
        base = f"{m}_{kind}"
        what = f"{m} at the first {along} minus {m} at the second (coordinates {along}_a, {along}_b)"
        out[base] = diff.assign_attrs(long_name=f"{m} contrast", units=units, definition=what)
        out[f"{base}_lo"] = (dims, lo, _within_attrs(m, level, "low"))
        out[f"{base}_hi"] = (dims, hi, _within_attrs(m, level, "high"))
        out[f"{base}_p"] = (dims, bootstrap_pvalue(dboot.values), {
            "long_name": f"{m} contrast, within-run p-value", "units": "1", "covers": WITHIN,
            "definition": "two-sided, from the paired cluster-bootstrap draws of the difference: "
                          "min(1, 2 min(1 + #{d <= 0}, 1 + #{d >= 0}) / (1 + B))"})
        out[f"{base}_ratio"] = ratio.assign_attrs(long_name=f"{m} ratio", units="1",
                                                  definition=f"{m} at the first {along} / {m} at the second")
        out[f"{base}_boot"] = dboot.assign_attrs(long_name=f"{m} contrast, paired cluster-bootstrap draws",
                                                 units=units, covers=WITHIN)
        threshold = _threshold(min_effect, m)
        if threshold is not None:
            out[f"{base}_pmin"] = (dims, bootstrap_pvalue(dboot.values, threshold, "greater"), {
                "long_name": f"{m} contrast exceeds {threshold:g}, within-run p-value", "units": "1",
                "min_effect": threshold, "covers": WITHIN,
                "definition": f"one-sided: (1 + #{{draws <= {threshold:g}}}) / (1 + B)"})
    ds = xr.Dataset(out).assign_coords(coords)
    ds.attrs["contrast_level_within_run"] = WITHIN
    return ds


def cell_pmin(report: xr.Dataset, min_effect: float | Mapping[str, float],
              metrics: Sequence[str] | None = None) -> xr.Dataset:
    """``{m}_pmin`` for every cell: one-sided within-run p-value of "the effect exceeds ``min_effect``".

    ``(1 + #{draws <= min_effect}) / (1 + B)`` from the cell's cluster-bootstrap draws (probe sampling
    only). A minimum effect of interest is a null that can be true for a deterministic model (unlike
    "no change"), so this p can come out large.
    """
    import xarray as xr

    out = {}
    for m in _metrics_with_draws(report, metrics):
        threshold = _threshold(min_effect, m)
        if threshold is None:
            continue
        boot = report[f"{m}_boot"].transpose(..., "draw")
        out[f"{m}_pmin"] = (boot.dims[:-1], bootstrap_pvalue(boot.values, threshold, "greater"), {
            "long_name": f"{m} exceeds {threshold:g}, within-run p-value", "units": "1", "min_effect": threshold,
            "covers": WITHIN, "definition": f"one-sided: (1 + #{{draws <= {threshold:g}}}) / (1 + B), the cell's "
                                            f"cluster-bootstrap draws"})
    return xr.Dataset(out)


def _within_attrs(m: str, level: float, end: str) -> dict:
    return {"long_name": f"{m} contrast, {level:.0%} within-run interval {end} end",
            "units": METRICS[m].units if m in METRICS else "1", "level": level, "covers": WITHIN,
            "definition": "percentile interval of the paired cluster-bootstrap draws of the difference (the same "
                          "clusters resampled in both cells)"}


def _threshold(min_effect, m: str) -> float | None:
    if min_effect is None:
        return None
    if isinstance(min_effect, Mapping):
        return None if m not in min_effect else _finite(min_effect[m], f"min_effect[{m!r}]")
    return _finite(min_effect, "min_effect")


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- runs


def combine_runs(reports: Mapping[str, xr.Dataset]) -> xr.Dataset:
    """Stack the reports of several training runs of one design on a ``run`` dim.

    Parameters
    ----------
    reports : mapping run label -> drift report (or a path to one)
        Reports of the same probe set, checkpoint labels, reference, layers, sites and draw settings
        (so draw ``b`` resamples the same clusters in every run). Refused otherwise, naming what differs.

    Returns
    -------
    xarray.Dataset
        The reports along a new leading ``run`` dim; attrs ``runs`` (the labels) and, per run, the
        warnings of each report prefixed with its run.
    """
    import xarray as xr

    from driftlens.report import load_report

    if not isinstance(reports, Mapping) or len(reports) < 1:
        raise UsageError("runs: give a mapping run label -> report with at least one run")
    labels = [str(k) for k in reports]
    if len(set(labels)) != len(labels):
        raise UsageError(f"run labels repeat: {labels}")
    reps = [load_report(r) if not hasattr(r, "data_vars") else r for r in reports.values()]
    first = reps[0]
    for label, rep in zip(labels[1:], reps[1:]):
        _same_design(labels[0], first, label, rep)
    warnings_text = "\n".join(f"{lab}: {w}" for lab, rep in zip(labels, reps)
                              for w in str(rep.attrs.get("warnings", "")).split("\n") if w)
    stacked = xr.concat([r.drop_attrs() if hasattr(r, "drop_attrs") else _no_attrs(r) for r in reps],
                        dim=xr.Variable("run", labels), data_vars="all", coords="minimal", compat="equals",
                        join="exact")
    stacked = stacked.assign_coords(run=labels)
    for v in stacked.data_vars:
        stacked[v].attrs = dict(first[v].attrs)
    stacked.attrs = {k: v for k, v in first.attrs.items() if all(r.attrs.get(k) == v for r in reps)}
    stacked.attrs.update({"runs": labels, "warnings": warnings_text})
    return stacked


def _no_attrs(ds):
    ds = ds.copy()
    ds.attrs = {}
    return ds


def _same_design(name0: str, a, name: str, b) -> None:
    """Refuse two runs whose cells or draws cannot be paired, naming what differs."""
    for dim in ("checkpoint", "layer", "site", "modality", "draw"):
        va = [x.item() if hasattr(x, "item") else x for x in a[dim].values] if dim in a.coords else a.sizes.get(dim)
        vb = [x.item() if hasattr(x, "item") else x for x in b[dim].values] if dim in b.coords else b.sizes.get(dim)
        if va != vb:
            raise DataError(f"runs {name0!r} and {name!r} differ in {dim}: {va} vs {vb}; runs of one design share "
                            f"checkpoint labels, layers, sites, modalities and draw settings")
    for key in _SAME_ATTRS:
        if a.attrs.get(key) != b.attrs.get(key):
            raise DataError(f"runs {name0!r} and {name!r} differ in {key}: {a.attrs.get(key)!r} vs "
                            f"{b.attrs.get(key)!r}; combine reports of one probe set and one set of drift "
                            f"options (the cluster draws are paired only then)")
    if set(a.data_vars) != set(b.data_vars):
        raise DataError(f"runs {name0!r} and {name!r} hold different variables: "
                        f"{sorted(set(a.data_vars) ^ set(b.data_vars))}")


def _run_variables(report) -> list[str]:
    """Effect variables that have draws (cells and contrasts) and a ``run`` dim."""
    out = []
    for v in report.data_vars:
        v = str(v)
        if v.endswith("_boot") and "run" in report[v].dims:
            name = v[:-len("_boot")]
            if name in report.data_vars:
                out.append(name)
    return out


def across_runs(report: xr.Dataset, *, level: float | None = None,
                min_effect: float | Mapping[str, float] | None = None, power: float = 0.8,
                alpha: float = 0.05) -> xr.Dataset:
    """Across-run inference for every cell and contrast of a report with a ``run`` dim.

    Parameters
    ----------
    report : xarray.Dataset
        A combined report (:func:`combine_runs`), with contrasts merged in if wanted (:func:`contrasts`).
    level : float, optional
        Interval coverage (default the report's ``level``).
    min_effect : float or mapping metric -> float, optional
        Adds ``{var}_runs_pmin``: one-sided t-test of "the mean over runs exceeds min_effect".
    power, alpha : float
        Target power and two-sided level of ``_runs_needed``.

    Returns
    -------
    xarray.Dataset
        For every variable ``v`` with draws: ``{v}_runs`` (mean over runs), ``{v}_runs_lo`` /
        ``_runs_hi`` (hierarchical interval), ``{v}_runs_sd`` (standard deviation over runs). For
        contrasts also ``{v}_runs_p`` (two-sided t over runs) and ``{v}_runs_needed``.
    """
    import xarray as xr

    if "run" not in report.dims:
        raise UsageError("across-run inference needs a report with a `run` dim (driftlens.compare.combine_runs)")
    n_runs = int(report.sizes["run"])
    if n_runs < 2:
        raise UsageError(f"across-run inference needs at least 2 runs, the report has {n_runs}")
    level = float(report.attrs.get("level", 0.95) if level is None else level)
    out = {}
    for name in _run_variables(report):
        eff = report[name].transpose("run", ...)
        boot = report[f"{name}_boot"].transpose("run", ..., "draw")
        dims = eff.dims[1:]
        m = _metric_of(name)
        contrast = any(d in eff.dims for d in CONTRAST_DIMS.values())
        threshold = _threshold(min_effect, m) if m is not None else None
        st = run_stats(eff.values, boot.values, level=level, min_effect=threshold, tests=contrast, power=power,
                       alpha=alpha)
        common = {"units": report[name].attrs.get("units", "1"), "covers": ACROSS, "n_runs": n_runs}
        out[f"{name}_runs"] = (dims, st["mean"], {**common, "long_name": f"{name}, mean over runs",
                                                  "definition": f"mean of {name} over the {n_runs} runs"})
        out[f"{name}_runs_sd"] = (dims, st["sd"], {**common, "long_name": f"{name}, standard deviation over runs",
                                                   "definition": "sample standard deviation (ddof=1) of the per-run "
                                                                 "values"})
        for end in ("lo", "hi"):
            out[f"{name}_runs_{end}"] = (dims, st[end], {
                **common, "level": level, "long_name": f"{name}, {level:.0%} across-run interval, {end}",
                "definition": "mean +- t_{R-1} * sqrt(sd^2 / R + v_probe), v_probe the variance of the run-mean under "
                              "the common cluster-bootstrap draws"})
        if contrast:
            out[f"{name}_runs_p"] = (dims, st["p"], {
                **common, "units": "1", "long_name": f"{name}, across-run p-value",
                "definition": "two-sided Student t over runs of the per-run contrasts, se as in the interval"})
            out[f"{name}_runs_needed"] = (dims, st["needed"], {
                **common, "units": "runs", "long_name": f"{name}, runs needed for {power:.0%} power",
                "definition": f"smallest number of runs at which a two-sided t-test at {alpha:g} over runs has power "
                              f">= {power:g} if the true mean were the observed one and the run spread the observed "
                              f"one (inf: never, the probe set's own sampling error dominates or the mean is 0)"})
        if threshold is not None:
            out[f"{name}_runs_pmin"] = (dims, st["pmin"], {
                **common, "units": "1", "min_effect": threshold,
                "long_name": f"{name} exceeds {threshold:g}, across-run p-value",
                "definition": "one-sided Student t over runs of (mean - min_effect) / se"})
    coords = {k: v for k, v in report.coords.items() if "run" not in v.dims and "draw" not in v.dims}
    return xr.Dataset(out, coords=coords)


def run_stats(values: np.ndarray, draws: np.ndarray, *, level: float = 0.95, min_effect: float | None = None,
              tests: bool = True, needed: bool = True, power: float = 0.8,
              alpha: float = 0.05) -> dict[str, np.ndarray]:
    """The across-run statistics of one variable, over plain arrays (what :func:`across_runs` computes).

    Parameters
    ----------
    values : array [R, ...]
        Per-run effects (R >= 2 runs).
    draws : array [R, ..., B]
        Per-run cluster-bootstrap draws, draw ``b`` the same clusters in every run (NaN draws ignored).
    level : float
        Interval coverage.
    min_effect : float, optional
        Adds ``pmin``: one-sided t-test of "the mean exceeds min_effect".
    tests : bool
        Also ``p`` (two-sided t-test of mean 0) and, with ``needed``, the runs needed for ``power``.
    needed : bool
        Compute ``needed`` (a search over noncentral t distributions per cell: the slow part).

    Returns
    -------
    dict of arrays [...]
        ``mean``, ``sd``, ``v_probe``, ``se``, ``lo``, ``hi`` and, as asked, ``p``, ``needed``, ``pmin``.
    """
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    n_runs = values.shape[0]
    if n_runs < 2:
        raise UsageError(f"across-run inference needs at least 2 runs, got {n_runs}")
    mean, sd = values.mean(0), values.std(0, ddof=1)                  # [...]
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # all-NaN draws (the reference's cells)
        run_mean = np.nanmean(np.asarray(draws, dtype=np.float64), axis=0)   # [..., B]: the run-mean per draw
        v_probe = np.nan_to_num(np.nanvar(run_mean, axis=-1, ddof=1), nan=0.0)
    se = np.sqrt(sd ** 2 / n_runs + v_probe)
    tq = stats.t.ppf((1 + level) / 2, n_runs - 1)
    out = {"mean": mean, "sd": sd, "v_probe": v_probe, "se": se, "lo": mean - tq * se, "hi": mean + tq * se}

    def t_of(delta):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(se > 0, delta / se, np.where(delta == 0, 0.0, np.sign(delta) * np.inf))

    if tests:
        p = 2 * stats.t.sf(np.abs(t_of(mean)), n_runs - 1)
        out["p"] = np.where(np.isfinite(mean), p, np.nan)
        if needed:
            out["needed"] = runs_needed(mean, sd, v_probe, power=power, alpha=alpha)
    if min_effect is not None:
        out["pmin"] = stats.t.sf(t_of(mean - min_effect), n_runs - 1)
    return out


def _metric_of(name: str) -> str | None:
    for m in sorted(list(METRICS) + ["mir_total"], key=len, reverse=True):
        if name == m or re.match(rf"^{m}_(contrast|layer_contrast)$", name):
            return m
    return None


def runs_needed(mean, sd, v_probe=0.0, *, power: float = 0.8, alpha: float = 0.05, max_runs: int = 10_000):
    """Smallest number of runs at which a two-sided one-sample t-test reaches ``power`` (elementwise).

    The test statistic's noncentrality with ``n`` runs is ``mean / sqrt(sd^2 / n + v_probe)``, df
    ``n - 1``. ``inf`` where no ``n <= max_runs`` reaches the power (a mean of 0, or a probe-sampling
    variance ``v_probe`` too large for any number of runs); NaN where the inputs are.
    """
    from scipy import stats

    mean, sd, v_probe = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (mean, sd, v_probe)))
    out = np.full(mean.shape, np.inf)

    def pw(i, n):
        se = math.sqrt(sd[i] ** 2 / n + v_probe[i])
        if se == 0:
            return 1.0 if mean[i] != 0 else 0.0
        ncp, crit = abs(mean[i]) / se, stats.t.ppf(1 - alpha / 2, n - 1)
        far = float(stats.nct.cdf(-crit, n - 1, ncp))          # the wrong-sign tail: scipy gives NaN where it
        return float(stats.nct.sf(crit, n - 1, ncp)) + (far if math.isfinite(far) else 0.0)   # underflows

    for i in np.ndindex(mean.shape):
        if not (np.isfinite(mean[i]) and np.isfinite(sd[i]) and np.isfinite(v_probe[i])):
            out[i] = np.nan
            continue
        if mean[i] == 0 or pw(i, max_runs) < power:
            continue
        lo, hi = 2, max_runs                       # power grows with n: the smallest n with pw >= power
        while lo < hi:
            mid = (lo + hi) // 2
            if pw(i, mid) >= power:
                hi = mid
            else:
                lo = mid + 1
        out[i] = lo
    return out
