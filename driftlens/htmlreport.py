"""A drift report as one self-contained, interactive HTML page -- and the data behind the explorer.

:func:`write_html` (``driftlens report report.nc --html out.html``) writes a single file that opens
from disk in any browser with no server and no network: the report's values as inline JSON, the
viewer's JavaScript and CSS inline (no CDN, no fonts, no requests). The page shows, for the metric,
site and modality chosen in its controls:

- the checkpoint x layer **heatmap** (values at a precision fixed per metric; a cell's values on hover;
  a click selects it);
- the **per-layer curves**, the selected checkpoint highlighted with its interval band (the others
  thin, so ten trajectories stay readable), the selected layer marked;
- a **readout** of the selected cell: effect, interval (what it covers: probe sampling within a run,
  or runs then clusters across runs), p, adjusted q, the minimum-effect p when the report has one,
  the number of clusters; with a ``run`` dim the mean over runs, its across-run interval and
  standard deviation, and every run's own value and within-run interval;
- the **contrasts** of that metric when the report has ``{m}_contrast`` (``ko-5 - en-5`` ...): per layer
  with their across-run interval when the report has runs (else the within-run one), and their values
  at the selected layer;
- the report's **attributes** (how it was computed).

Controls that do not apply are disabled: the modality for ``gap`` and ``mir`` (they compare visual
with text tokens), the site for ``mir`` (always ``hidden``). The same viewer is the live part of
:func:`driftlens.explore` in Jupyter (an anywidget whose state Python and the page share).

Example::

    from driftlens.htmlreport import write_html
    write_html(dl.load_report("report.nc"), "report.html")
"""
from __future__ import annotations

import html
import json
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from driftlens.errors import UsageError
from driftlens.plot import decimals
from driftlens.registry import METRICS as _REGISTRY
from driftlens.select import reference_of

if TYPE_CHECKING:
    import xarray as xr

def viewable() -> tuple[str, ...]:
    """Report variables the viewer offers, in this order, where the report has them: the registry's
    metrics that have figures (:attr:`driftlens.registry.MetricSpec.figures`)."""
    return tuple(m for m, spec in _REGISTRY.items() if spec.figures)


#: the built-in :func:`viewable` metrics
METRICS = viewable()


def _labels(report, dim: str) -> list:
    return [v.item() if hasattr(v, "item") else v for v in report[dim].values] if dim in report.coords else []


def _clean(a) -> list:
    """A nested list of floats with NaN / inf as None (JSON has no NaN)."""
    arr = np.asarray(a, dtype=float)
    out = np.where(np.isfinite(arr), arr, np.nan).tolist()

    def fix(x):
        if isinstance(x, list):
            return [fix(y) for y in x]
        return None if x != x else round(float(x), 10)

    return fix(out)


def _cell_keys(da) -> list[tuple[str, dict]]:
    """``("hidden|visual", {"site": "hidden", "modality": "visual"})`` for every site / modality of ``da``."""
    sites = [str(s) for s in da["site"].values] if "site" in da.dims else [None]
    mods = [str(m) for m in da["modality"].values] if "modality" in da.dims else [None]
    out = []
    for s in sites:
        for m in mods:
            sel = {k: v for k, v in (("site", s), ("modality", m)) if v is not None}
            out.append(("|".join(v for v in (s, m) if v is not None), sel))
    return out


def _arrays(report, name: str, sel: dict, dims: tuple[str, ...]) -> dict:
    """The variables ``name``, ``name_lo`` ... at ``sel`` as cleaned nested lists, keyed by suffix."""
    out = {}
    for key, var in (("effect", name), ("lo", f"{name}_lo"), ("hi", f"{name}_hi"), ("p", f"{name}_p"),
                     ("q", f"{name}_q"), ("pmin", f"{name}_pmin"), ("sd", f"{name}_sd"),
                     ("needed", f"{name}_needed"), ("ratio", f"{name}_ratio")):
        if var in report.data_vars and set(dims) <= set(report[var].dims):
            da = report[var].sel({k: v for k, v in sel.items() if k in report[var].dims})
            out[key] = _clean(da.transpose(*dims).values)
    return out


def _n_draws(report, name: str) -> int | None:
    var = f"{name}_lo"
    if var in report.data_vars and "n_bootstrap" in report[var].attrs:
        return int(report[var].attrs["n_bootstrap"])
    return None


def _metric_data(report, m: str, runs: bool) -> dict:
    da = report[m]
    dims = ("checkpoint", "layer")
    cells = {}
    for key, sel in _cell_keys(da):
        if runs and "run" in da.dims and f"{m}_runs" in report.data_vars:
            cell = _arrays(report, f"{m}_runs", sel, dims)
            per = _arrays(report, m, sel, ("run", *dims))
            cell["per_run"] = {k: v for k, v in per.items() if k in ("effect", "lo", "hi", "p", "q")}
            if f"{m}_runs_pmin" in report.data_vars:
                cell["pmin"] = _arrays(report, f"{m}_runs_pmin", sel, dims)["effect"]
        else:
            cell = _arrays(report, m, sel, dims)
        cells[key] = cell
    shown = report[f"{m}_runs"] if runs and f"{m}_runs" in report.data_vars else da
    min_effect = next((report[v].attrs.get("min_effect") for v in (f"{m}_pmin", f"{m}_runs_pmin")
                       if v in report.data_vars), None)
    spec = _REGISTRY[m]
    out = {"label": spec.html_label or spec.label or m, "long_name": str(da.attrs.get("long_name", m)),
           "units": str(da.attrs.get("units", "")), "has_site": "site" in da.dims,
           "has_modality": "modality" in da.dims, "vs_reference": _REGISTRY[m].vs_reference,
           "decimals": decimals(shown.values), "n_draws": _n_draws(report, m),
           "n_permutations": (int(report[f"{m}_p"].attrs["n_permutations"]) if f"{m}_p" in report.data_vars
                              and "n_permutations" in report[f"{m}_p"].attrs else None),
           "min_effect": None if min_effect is None else float(min_effect), "cells": cells}
    if m == "mir":
        total = "mir_total_runs" if runs and "mir_total_runs" in report.data_vars else "mir_total"
        if total in report.data_vars:
            out["total"] = _arrays(report, total, {}, ("checkpoint",))
            out["total_decimals"] = decimals(report[total].values)
    return out


def _contrast_data(report, m: str, runs: bool) -> dict | None:
    name = f"{m}_contrast"
    if name not in report.data_vars or "contrast" not in report[name].dims or "layer" not in report[name].dims:
        return None
    da = report[name]
    dims = ("contrast", "layer")
    cells = {}
    for key, sel in _cell_keys(da):
        within = _arrays(report, name, sel, ("run", *dims) if "run" in da.dims else dims)
        cell = {"within": within}
        if runs and f"{name}_runs" in report.data_vars:
            cell["runs"] = _arrays(report, f"{name}_runs", sel, dims)
        cells[key] = cell
    shown = report[f"{name}_runs"] if runs and f"{name}_runs" in report.data_vars else da
    pairs = [[str(a), str(b)] for a, b in zip(report["checkpoint_a"].values, report["checkpoint_b"].values)] \
        if "checkpoint_a" in report.coords else []
    return {"labels": [str(c) for c in da["contrast"].values], "pairs": pairs, "decimals": decimals(shown.values),
            "cells": cells}


def _colors(checkpoints: list[str], reference: str | None) -> dict[str, str]:
    """The checkpoint colours of every driftlens figure (:func:`driftlens.plot.checkpoint_styles`)."""
    from matplotlib.colors import to_hex

    from driftlens.plot import checkpoint_styles

    return {ck: to_hex(st["color"]) for ck, st in checkpoint_styles(checkpoints, reference).items()}


def _attr_text(v) -> str:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    return str(v)


def page_data(report: xr.Dataset, title: str | None = None) -> dict:
    """Everything the viewer shows, as plain JSON-ready data (NaN as None).

    Parameters
    ----------
    report : xarray.Dataset
        A drift report (:func:`driftlens.drift`), with or without a ``run`` dim and contrasts.
    title : str, optional
        The page's heading; default from the report's probe set and reference.

    Returns
    -------
    dict
        ``checkpoints``, ``layers``, ``sites``, ``modalities``, ``runs``, ``reference``, ``level``,
        ``colors`` (per checkpoint, as in the figures), ``metrics`` (per metric: labels, units,
        the precision ``decimals``, and per site / modality cell the arrays ``effect``, ``lo``, ``hi``,
        ``p``, ``q``, ``pmin`` [checkpoint][layer], with runs ``sd`` and ``per_run``), ``contrasts``,
        ``n_clusters`` (per modality) and ``attrs`` (the report's attributes as text).

    Raises
    ------
    driftlens.errors.UsageError
        The report has none of :data:`METRICS`, or no checkpoint or layer.
    """
    metrics = [m for m in viewable() if m in report.data_vars and {"checkpoint", "layer"} <= set(report[m].dims)]
    if not metrics:
        raise UsageError(f"the report has none of {viewable()} by checkpoint and layer: nothing to show")
    checkpoints = [str(c) for c in _labels(report, "checkpoint")]
    layers = [int(v) for v in _labels(report, "layer")]
    if not checkpoints or not layers:
        raise UsageError("the report has no checkpoint or no layer: nothing to show")
    runs = "run" in report.dims and report.sizes["run"] > 1
    reference = reference_of(report)
    attrs = {str(k): _attr_text(v) for k, v in report.attrs.items()}
    n_clusters = {"visual": report.attrs.get("n_clusters_visual", report.attrs.get("n_clusters")),
                  "text": report.attrs.get("n_clusters_text", report.attrs.get("n_clusters")),
                  "": report.attrs.get("n_clusters")}
    contrasts = {m: c for m in metrics if (c := _contrast_data(report, m, runs)) is not None}
    if title is None:
        title = "drift report" + (f": {report.attrs['probe_set']}" if report.attrs.get("probe_set") else "") + \
            (f", {report.attrs['model_type']}" if report.attrs.get("model_type") else "")
    return {"version": 1, "title": title, "reference": reference, "checkpoints": checkpoints, "layers": layers,
            "sites": [str(s) for s in _labels(report, "site")],
            "modalities": [str(m) for m in _labels(report, "modality")],
            "runs": [str(r) for r in _labels(report, "run")] if runs else [],
            "level": float(report.attrs.get("level", 0.95)), "colors": _colors(checkpoints, reference),
            "metrics": {m: _metric_data(report, m, runs) for m in metrics}, "contrasts": contrasts,
            "n_clusters": {k: (None if v is None else int(v)) for k, v in n_clusters.items()},
            "intervals_cover": attrs.get("intervals_cover", ""), "attrs": attrs,
            "driftlens_version": _version()}


def _version() -> str:
    from driftlens._version import __version__

    return __version__


def asset(name: str) -> str:
    """The text of a viewer asset shipped in ``driftlens/web`` (``explorer.js``, ``explorer.css``)."""
    return resources.files("driftlens").joinpath("web", name).read_text(encoding="utf-8")


def _script_json(data: dict) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>``, no HTML comment openers)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def initial_state(data: dict, **state) -> dict:
    """The viewer's starting state: ``mmd`` (else the first metric), first site and modality, the last
    checkpoint, the first layer -- each overridden by ``state``."""
    unknown = sorted(set(state) - {"metric", "site", "modality", "checkpoint", "layer"})
    if unknown:
        raise UsageError(f"unknown setting(s) {unknown}; use metric, site, modality, checkpoint, layer")
    metric = state.get("metric") or ("mmd" if "mmd" in data["metrics"] else next(iter(data["metrics"])))
    out = {"metric": metric, "site": state.get("site") or (data["sites"] or [""])[0],
           "modality": state.get("modality") or (data["modalities"] or [""])[0],
           "checkpoint": state.get("checkpoint") or data["checkpoints"][-1],
           "layer": state["layer"] if state.get("layer") is not None else data["layers"][0]}
    allowed = {"metric": list(data["metrics"]), "site": data["sites"] or [""],
               "modality": data["modalities"] or [""], "checkpoint": data["checkpoints"], "layer": data["layers"]}
    for name, value in out.items():
        if value not in allowed[name]:
            raise UsageError(f"{name} {value!r} is not in the report; choose from {allowed[name]}")
    return out


def report_html(report: xr.Dataset, title: str | None = None, **state) -> str:
    """The self-contained HTML page of ``report`` (see the module docstring).

    Parameters
    ----------
    report : xarray.Dataset
        A drift report.
    title : str, optional
        The page's heading.
    **state
        The initial selection: ``metric``, ``site``, ``modality``, ``checkpoint``, ``layer``.

    Returns
    -------
    str
        The page: one HTML document with its data, script and style inline.
    """
    data = page_data(report, title)
    start = initial_state(data, **state)
    return _PAGE.format(title=html.escape(data["title"]), css=asset("explorer.css"), data=_script_json(data),
                        state=_script_json(start), js=asset("explorer.js"))


def write_html(report: xr.Dataset, path: str | os.PathLike, title: str | None = None, **state) -> Path:
    """Write :func:`report_html` of ``report`` to ``path``, atomically, never inside an input.

    Parameters
    ----------
    report : xarray.Dataset
        A drift report (``report.encoding["source"]``, its file, and ``attrs["store_path"]``, its
        store, are inputs the page may not replace or lie inside).
    path : str or path-like
        The ``.html`` file to write.
    title : str, optional
        The page's heading.
    **state
        The initial selection (see :func:`report_html`).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    driftlens.errors.UsageError
        ``path`` is the report file or lies inside its store, or is a URL.
    driftlens.errors.EnvironmentProblem
        The file cannot be written (a full disk names it; a previous page stays intact).
    """
    from driftlens.outputs import atomic_write, check_output, local

    target = local(path, "--html")
    check_output(target, [("drift report", report.encoding.get("source")),
                          ("activation store", report.attrs.get("store_path"))], flag="--html")
    text = report_html(report, title, **state)
    atomic_write(target, text.encode("utf-8"))
    return target


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<title>{title}</title>
<style>
{css}
</style>
</head>
<body>
<div id="driftlens-app"></div>
<script type="application/json" id="driftlens-data">{data}</script>
<script type="application/json" id="driftlens-state">{state}</script>
<script type="module">
{js}
const read = (id) => JSON.parse(document.getElementById(id).textContent);
render({{model: staticModel(read("driftlens-data"), read("driftlens-state")),
         el: document.getElementById("driftlens-app")}});
</script>
</body>
</html>
"""

__all__ = ["METRICS", "asset", "decimals", "initial_state", "page_data", "report_html", "write_html"]
