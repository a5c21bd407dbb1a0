"""Figures of drift reports, rank schedules and probe results: every driftlens figure lives here.

Conventions
-----------
- **matplotlib's object API.** Each function draws into ``ax`` when given one and returns that
  ``Axes``; without ``ax`` it makes a new figure and returns its (main) ``Axes``, whose figure is
  ``ax.figure``. Nothing here calls ``matplotlib.use`` or changes ``rcParams``.
- **New figures.** Outside IPython a new figure is a bare :class:`matplotlib.figure.Figure`: no
  pyplot, no backend, no global figure registry, so drawing works headless, in threads and in
  servers, and never leaks figures (a figure is freed with its last reference; :func:`save` needs
  nothing closed). Inside IPython (a notebook, an IPython console) a new figure is made through
  ``pyplot.figure``, under whatever backend the session chose, because that is what makes it show
  up inline the way every other library's figures do; a bare ``Figure`` would display nothing
  when a function returns its ``Axes``. ``pyplot`` is imported then and only then.
- **Layout.** New figures use the constrained layout engine (colorbars and outside legends are
  given room); :func:`save` leaves the layout of a figure you made yourself alone unless it has no
  layout engine, then it applies ``tight_layout`` once.
- **Colours.** Categories use the Okabe-Ito palette and heatmaps ``cividis``, both readable with
  the common colour-vision deficiencies and in greyscale. Checkpoints are grouped by their label
  without a trailing step number (``ko-1`` ... ``ko-5`` is one trajectory): a group gets one hue
  and one marker, its steps go from light to full colour, the report's reference is black. Colour
  is never the only cue: groups differ by marker, transfer and control series by line style.
- **Labels.** Axis and colorbar labels carry the variable's ``units`` attribute (``1`` is written
  *dimensionless*); titles name the site, modality and what the bands or marks mean.
- **Intervals.** Wherever the report has ``{var}_lo`` / ``{var}_hi`` the interval is drawn as a band
  (``fill_between``); nowhere else. Titles say what a band covers: probe sampling (one run), or runs
  then clusters (a report with a ``run`` dim, drawn as the mean over runs with one dot per run and the
  across-run interval -- never the mean of each run's own bounds).
- **Marks.** A ``*`` on a heatmap comes from a test that can come out "no" (the minimum effect of
  interest, ``{var}_pmin``), not from "anything changed", which any weight change passes.
- **Errors.** A variable, site or modality the report does not have is a
  :class:`driftlens.errors.UsageError` naming what it has.

Functions: :func:`drift_heatmap`, :func:`drift_by_layer`, :func:`metrics_by_layer`, :func:`contrast_by_layer`,
:func:`drift_vs_alpha` (merge sweeps), :func:`modality_gap_by_layer`,
:func:`mir_by_layer`, :func:`rank_schedule`, :func:`grounding_vs_drift`, :func:`seeds_by_layer`,
:func:`probe_accuracy`, :func:`save`, :func:`plot_report`. Importing this module imports neither
matplotlib nor pyplot; each function imports what it needs.
"""
from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from driftlens.errors import SelectionError, UsageError
from driftlens.registry import METRICS as _METRICS
from driftlens.select import pick_checkpoints, reference_of

if TYPE_CHECKING:
    import xarray as xr
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from driftlens.schedule import RankSchedule
    from driftlens.schema import Modality, Site

__all__ = ["OKABE_ITO", "band_note", "checkpoint_styles", "contrast_by_layer", "decimals", "drift_by_layer",
           "drift_heatmap", "drift_vs_alpha", "grounding_vs_drift", "metrics_by_layer", "mir_by_layer",
           "modality_gap_by_layer", "token_map", "plot_report", "probe_accuracy", "rank_schedule", "save",
           "seeds_by_layer"]

#: Okabe & Ito (2008) colour-blind-safe palette, in the order categories take them (black, kept
#: for the reference, and yellow, too pale on white for lines, come last)
OKABE_ITO: tuple[str, ...] = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
_GROUP_COLORS = OKABE_ITO[:6]
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
_REFERENCE_COLOR = "#000000"
_GREY = "#7f7f7f"
_HEATMAP_CMAP = "cividis"
#: report variables measured against the reference checkpoint (its own row is 0 by construction)
#: short labels of the report's variables that are not metrics (the metrics' are the registry's ``label``)
_SHORT = {"mir_total": "MIR total", "sigma": "kernel bandwidth"}

OKABE_ITO_NAMES = {"orange": "#E69F00", "skyblue": "#56B4E9", "sky blue": "#56B4E9", "green": "#009E73",
                   "bluish green": "#009E73", "yellow": "#F0E442", "blue": "#0072B2", "red": "#D55E00",
                   "vermillion": "#D55E00", "purple": "#CC79A7", "reddish purple": "#CC79A7", "pink": "#CC79A7",
                   "black": "#000000"}
MODALITY_COLORS = {"visual": "#0072B2", "text": "#E69F00"}
MAX_LEGEND = 12
_CORRECTIONS = {"bh": "Benjamini-Hochberg", "holm": "Holm"}

Annotate = Literal["all", "ends", "none"]


# ----------------------------------------------------------------------------- helpers


def _in_ipython() -> bool:
    """Whether an IPython shell is running (checked without importing IPython)."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    return get is not None and get() is not None


def _new_figure(size: tuple[float, float]) -> Figure:
    """A new constrained-layout figure: pyplot's under IPython (so it shows inline), else a bare
    ``Figure`` (no pyplot, no backend touched; see the module docstring)."""
    if _in_ipython():
        import matplotlib.pyplot as plt

        return plt.figure(figsize=size, layout="constrained")
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _new_axes(size: tuple[float, float]) -> Axes:
    """A fresh Axes on a new figure (:func:`_new_figure`)."""
    return _new_figure(size).add_subplot()


def _units_text(units) -> str:
    units = str(units or "").strip()
    if units in ("", "1"):
        return "dimensionless"
    units = units.replace("log10", "log$_{10}$")
    return re.sub(r"\^(\d+)", r"$^\1$", units)


def _short(var: str) -> str:
    spec = _METRICS.get(var)
    return (spec.label or var) if spec is not None else _SHORT.get(var, var)


def _vs_reference(var: str) -> bool:
    """Whether ``var`` is a metric the registry draws as a change from the reference."""
    return var in _METRICS and _METRICS[var].vs_reference


def _with_figure(figure: str) -> list[str]:
    """The registry's metrics that :func:`plot_report` draws as ``figure`` (their ``figures``), in registry order."""
    return [m for m, spec in _METRICS.items() if figure in spec.figures]


def _axis_label(var: str, attrs: Mapping, prefix: str = "") -> str:
    """``"visual MMD$^2$ (dimensionless)"``: short name and units of a report variable."""
    return f"{prefix}{_short(var)} ({_units_text(attrs.get('units'))})"


def _reference(report) -> str | None:
    """The report's reference (:func:`driftlens.select.reference_of`); None for data without checkpoints."""
    try:
        return reference_of(report)
    except SelectionError:
        return None


def _have(da, dim: str) -> list[str]:
    return [str(v) for v in da[dim].values]


def _select(report, var: str, *, site=None, modality=None, dims: Sequence[str] = ("checkpoint", "layer"),
            need_values: bool = True):
    """``report[var]`` at ``site`` / ``modality`` (where it has those dims), left with ``dims`` only.

    Returns the DataArray and the selection made (``{dim: value}``); raises UsageError naming
    what the report has.
    """
    if var not in report.data_vars:
        raise UsageError(f"{var!r} is not in the report; it has {sorted(map(str, report.data_vars))}")
    da = report[var]
    missing = [d for d in dims if d not in da.dims]
    if missing:
        fit = sorted(str(k) for k, v in report.data_vars.items() if set(dims) <= set(v.dims))
        raise UsageError(f"{var!r} has dims {tuple(da.dims)}, not {tuple(dims)}: it cannot be drawn here; "
                         f"variables that can: {fit}")
    sel = {}
    for dim, value in (("site", site), ("modality", modality)):
        if dim in da.dims and dim not in dims and value is not None:
            if str(value) not in _have(da, dim):
                raise UsageError(f"{dim} {value!r} is not in the report; it has {_have(da, dim)}")
            sel[dim] = str(value)
    for dim in dims:
        if da.sizes[dim] == 0:
            raise UsageError(f"the report has no {dim}: nothing to draw")
    out = da.sel(sel) if sel else da
    extra = [d for d in out.dims if d not in dims]
    if extra:
        raise UsageError(f"{var!r} still has dims {extra} after selecting {sel or 'nothing'}: name the "
                         f"{' and '.join(extra)}")
    out = out.transpose(*dims)
    if need_values and not np.isfinite(out.values).any():
        where = ", ".join(sel.values())
        raise UsageError(f"{var}{f' ({where})' if where else ''} holds no finite value: nothing to draw")
    return out, sel


def _band(report, var: str, sel: Mapping, dims: Sequence[str]):
    """``({var}_lo, {var}_hi)`` at the same selection, or None when the report has no interval."""
    if not all(f"{var}_{s}" in report.data_vars for s in ("lo", "hi")):
        return None
    return tuple(report[f"{var}_{s}"].sel(dict(sel)).transpose(*dims) for s in ("lo", "hi"))


def _level(report) -> str:
    level = report.attrs.get("level") if hasattr(report, "attrs") else None
    try:
        return f"{float(level):.0%} " if level is not None else ""
    except (TypeError, ValueError):
        return ""


def decimals(values, digits: int = 3) -> int:
    """Decimal places that show the largest magnitude in ``values`` with ``digits`` significant digits.

    One precision for every number of a metric in a figure (heatmap cells, readouts): ``0.100``
    beside ``0.058``, never ``0.1`` beside ``0.0577``. Between 0 and 6 places.
    """
    import math

    arr = np.asarray(values, dtype=float)
    arr = np.abs(arr[np.isfinite(arr)])
    top = float(arr.max()) if arr.size else 0.0
    if top == 0.0:
        return digits - 1
    return int(min(6, max(0, digits - 1 - math.floor(math.log10(top)))))


#: fewer cluster-bootstrap draws than this and a percentile band is not called a "95%" interval
MIN_DRAWS_FOR_LEVEL = 100


def band_note(report, var: str) -> str:
    """What the bands of ``var`` are, for a title: ``"bands: 95% interval (probe sampling, 1000 cluster
    resamples)"``; with fewer than :data:`MIN_DRAWS_FOR_LEVEL` draws a "rough interval from N resamples"
    (a 2.5% tail of 10 draws is not a 95% interval); with runs, the across-run interval."""
    if _runs(report, var):
        return f"bands: {_level(report)}across-run interval (runs, then clusters)"
    lo = report[f"{var}_lo"] if f"{var}_lo" in report.data_vars else None
    n = lo.attrs.get("n_bootstrap") if lo is not None else None
    if n is not None and int(n) < MIN_DRAWS_FOR_LEVEL:
        return (f"bands: rough interval from only {int(n)} cluster resamples (probe sampling; too few for "
                f"{_level(report)}coverage)")
    return f"bands: {_level(report)}interval (probe sampling" + (f", {int(n)} cluster resamples)" if n else ")")


_STEP = re.compile(r"[\s_.:/-]*\d+$")


def _group(label: str) -> str:
    """A checkpoint's trajectory: its label without a trailing step number (``ko-3`` -> ``ko``)."""
    return _STEP.sub("", label) or label


def _mix(color, t: float) -> tuple[float, float, float]:
    """``color`` blended with white: ``t = 1`` is the colour, ``t = 0`` white."""
    from matplotlib.colors import to_rgb

    return tuple(1.0 - t * (1.0 - c) for c in to_rgb(color))


def checkpoint_styles(labels: Sequence[str], reference: str | None = None) -> dict[str, dict]:
    """``{label: {"color", "marker"}}``: the reference black, a hue and marker per trajectory,
    steps from light to full colour."""
    groups: dict[str, list[str]] = {}
    for lab in labels:
        if lab != reference:
            groups.setdefault(_group(lab), []).append(lab)
    styles = {}
    if reference in labels:
        styles[reference] = {"color": _REFERENCE_COLOR, "marker": "o"}
    if len(groups) > len(_GROUP_COLORS):        # no trajectory structure to show: one ordered colour scale
        from matplotlib import colormaps

        cmap = colormaps["viridis"]
        rest = [lab for lab in labels if lab != reference]
        for i, lab in enumerate(rest):
            styles[lab] = {"color": cmap(0.9 * i / max(1, len(rest) - 1)), "marker": _MARKERS[i % len(_MARKERS)]}
        return styles
    for g, (_, labs) in enumerate(groups.items()):
        n = len(labs)
        for k, lab in enumerate(labs):
            t = 1.0 if n == 1 else 0.4 + 0.6 * k / (n - 1)
            styles[lab] = {"color": _mix(_GROUP_COLORS[g], t), "marker": _MARKERS[(g + 1) % len(_MARKERS)]}
    return styles


def _layer_ticks(ax, layers) -> None:
    layers = np.asarray(layers)
    if layers.size <= 24 and np.issubdtype(layers.dtype, np.number):
        ax.set_xticks(layers)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_outside(ax, **kw):
    """Legend right of the axes (never over the data)."""
    kw = {"fontsize": "small", "frameon": False, **kw}
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kw)


def _pick_checkpoints(da, checkpoints, reference, drop_zero_reference: bool) -> list[str]:

    have = _have(da, "checkpoint")
    if checkpoints is None:
        chosen = list(have)
        if drop_zero_reference and reference in chosen:
            ref = np.asarray(da.sel(checkpoint=reference).values, dtype=float)
            if not np.any(np.isfinite(ref) & (ref != 0)):      # a metric of the reference against itself
                chosen.remove(reference)
        return chosen
    if isinstance(checkpoints, str):
        checkpoints = [checkpoints]
    chosen = [str(c) for c in checkpoints]
    unknown = [c for c in chosen if c not in have]
    if unknown:
        raise UsageError(f"checkpoints {unknown} are not in the report; it has {have}")
    if not chosen:
        raise UsageError("no checkpoint chosen: nothing to draw")
    return chosen


def _runs(report, var: str) -> bool:
    """Whether ``var`` is drawn over training runs: the report has a ``run`` dim and ``{var}_runs``.

    A report with runs is drawn as its mean over runs (``{var}_runs``), the across-run interval
    (``{var}_runs_lo`` / ``_hi``: runs, then clusters) and one dot per run -- never the mean of the
    runs' own bootstrap bounds, which leaves out the variation between runs.
    """
    if not (hasattr(report, "dims") and "run" in report.dims and var in report.data_vars
            and "run" in report[var].dims):
        return False
    if f"{var}_runs" not in report.data_vars:
        from driftlens.errors import UsageError

        raise UsageError(f"{var!r} has a run dim but the report has no across-run statistics ({var}_runs): "
                         f"select one run (report.sel(run=...)) or combine at least 2 runs")
    return True


def _run_dots(ax, report, var: str, sel: Mapping, ck: str, layers, color, marker) -> None:
    """One dot per run at each layer, slightly spread so that they do not hide each other."""
    per_run = report[var].sel({**dict(sel), "checkpoint": ck}).transpose("run", "layer").values   # [runs, layers]
    n = per_run.shape[0]
    for i, row in enumerate(per_run):
        ax.scatter(np.asarray(layers, dtype=float) + 0.06 * (i - (n - 1) / 2), row, s=11, color=color,
                   marker=marker, alpha=0.6, lw=0, zorder=2)


#: more lines than this in one panel, and only the highlighted ones get bands (see :func:`drift_by_layer`)
MAX_BANDED_LINES = 6


def _highlighted(chosen: list[str], highlight, reference) -> list[str]:
    """The checkpoints drawn in full with their band: ``highlight`` (one label or several), or with
    ``"auto"`` every line when there are at most :data:`MAX_BANDED_LINES`, else the reference (when
    drawn: gap, MIR) and the last step of each trajectory."""
    if highlight == "auto":
        if len(chosen) <= MAX_BANDED_LINES:
            return list(chosen)
        last: dict[str, str] = {}
        for ck in chosen:
            if ck != reference:
                last[_group(ck)] = ck
        return ([reference] if reference in chosen else []) + list(last.values())
    if highlight is None:
        return list(chosen)
    picked = [str(highlight)] if isinstance(highlight, str) else [str(h) for h in highlight]
    unknown = [h for h in picked if h not in chosen and h != reference]
    if unknown:
        raise UsageError(f"highlight {unknown}: not among the drawn checkpoints {chosen}")
    return [h for h in picked if h in chosen]      # the reference's all-zero row is not drawn: nothing to highlight


def _lines_by_layer(report, var: str, *, site, modality, checkpoints, ax, labels: Mapping[str, str] | None = None,
                    legend_title: str | None = None, title: str | None = None, ylabel: str | None = None,
                    highlight="auto", note: bool = True):
    """The per-layer line plot behind drift_by_layer, modality_gap_by_layer and mir_by_layer."""
    dims = ("checkpoint", "layer")
    runs = _runs(report, var)
    shown = f"{var}_runs" if runs else var
    da, sel = _select(report, shown, site=site, modality=modality, dims=dims)
    band = _band(report, shown, sel, dims)
    reference = _reference(report)
    vs_ref = _vs_reference(var)
    chosen = _pick_checkpoints(da, checkpoints, reference, drop_zero_reference=vs_ref)
    strong = _highlighted(chosen, highlight, reference)
    styles = checkpoint_styles(_have(da, "checkpoint"), reference)
    ax = ax if ax is not None else _new_axes((7.2, 4.2))
    layers = da["layer"].values
    for ck in sorted(chosen, key=lambda c: c in strong):          # the highlighted ones on top
        st, full = styles[ck], ck in strong
        ax.plot(layers, da.sel(checkpoint=ck).values, color=st["color"], marker=st["marker"],
                ms=4.5 if full else 3.0, lw=1.8 if full else 0.9, alpha=1.0 if full else 0.55,
                label=(labels or {}).get(ck, ck), zorder=3 if full else 2)
        if band is not None and full:
            ax.fill_between(layers, band[0].sel(checkpoint=ck).values, band[1].sel(checkpoint=ck).values,
                            color=st["color"], alpha=0.14, lw=0, zorder=1)
        if runs and full:
            _run_dots(ax, report, var, sel, ck, layers, st["color"], st["marker"])
    handles, names = ax.get_legend_handles_labels()            # legend in trajectory order
    order = {(labels or {}).get(ck, ck): i for i, ck in enumerate(chosen)}
    pairs = sorted(zip(handles, names), key=lambda hn: order.get(hn[1], len(order)))
    if vs_ref:
        ax.axhline(0.0, color=_GREY, lw=0.8, zorder=0)
    _layer_ticks(ax, layers)
    ax.set_xlabel("decoder layer")
    where = ", ".join(sel.values())
    ax.set_ylabel(ylabel or _axis_label(var, da.attrs, prefix=f"{sel['modality']} " if "modality" in sel else ""))
    if title is None:
        title = str(da.attrs.get("long_name", var))
        second = [where] if where else []
        if vs_ref and reference is not None:
            second.append(f"vs {reference}")
        if note and runs:
            second.append(f"lines: mean of {report.sizes['run']} runs, dots: one run, " + band_note(report, var))
        elif note and band is not None:
            second.append(band_note(report, var))
        if band is not None and len(strong) < len(chosen):
            second.append("bands" + (" and dots" if runs else "") + f" only on {', '.join(strong)}")
        if second:
            title += "\n" + "; ".join(second)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", color="#e6e6e6", lw=0.6, zorder=0)
    ax.set_axisbelow(True)
    _legend_outside(ax, handles=[h for h, _ in pairs], labels=[n for _, n in pairs],
                    title=legend_title or "checkpoint", title_fontsize="small")
    return ax


# ----------------------------------------------------------------------------- report figures


def drift_heatmap(report: xr.Dataset, var: str = "mmd", site: Site | str = "hidden",
                  modality: Modality | None = "visual", *, ax: Axes | None = None, alpha: float = 0.05,
                  annotate: bool = True, marks: Literal["auto", "min_effect", "against_zero", "none"] = "auto") -> Axes:
    """Checkpoint x layer heatmap of one report variable, cells that pass a test that can fail marked.

    Parameters
    ----------
    report : xarray.Dataset
        A drift report (:func:`driftlens.drift`).
    var : str
        A variable with ``checkpoint`` and ``layer`` dims (default the MMD^2 effect).
    site, modality : str
        Selected where ``var`` has that dim (``modality`` is ignored for ``gap``, both for ``mir``).
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new figure sized to the grid. A colorbar is added beside it.
    alpha : float
        Cells whose marking p-value is at most ``alpha`` get a ``*``.
    annotate : bool
        Write each cell's value in it, every cell at one precision (3 significant digits of the
        largest: :func:`decimals`); the ``*`` marks are drawn either way.
    marks : {"auto", "min_effect", "against_zero", "none"}
        Which test marks a cell. ``min_effect``: ``{var}_pmin``, "the effect exceeds the minimum effect
        of interest" (``driftlens drift --min-effect``), a test that can come out "no". ``against_zero``:
        the adjusted ``{var}_q`` (else ``{var}_p``) of "anything changed" -- for a deterministic model
        any weight change is a change, so on real checkpoints every such cell is marked and the marks
        say nothing. ``auto`` (default): ``min_effect`` when the report has ``{var}_pmin``, else no
        marks. A report with several runs shows the mean over runs and is not marked.

    Returns
    -------
    matplotlib.axes.Axes
        The heatmap's Axes (``ax`` when given).

    Raises
    ------
    driftlens.errors.UsageError
        ``var``, ``site`` or ``modality`` not in the report, or nothing finite to draw.
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    dims = ("checkpoint", "layer")
    runs = _runs(report, var)
    da, sel = _select(report, f"{var}_runs" if runs else var, site=site, modality=modality, dims=dims)
    if marks not in ("auto", "min_effect", "against_zero", "none"):
        from driftlens.errors import UsageError

        raise UsageError(f"marks must be 'auto', 'min_effect', 'against_zero' or 'none', got {marks!r}")
    candidates = {"auto": (f"{var}_pmin",), "min_effect": (f"{var}_pmin",), "none": (),
                  "against_zero": (f"{var}_q", f"{var}_p")}[marks]
    sig_var = None if runs else next((v for v in candidates if v in report.data_vars), None)
    if marks == "min_effect" and sig_var is None and not runs:
        from driftlens.errors import UsageError

        raise UsageError(f"marks='min_effect' needs {var}_pmin in the report (driftlens drift --min-effect X)")
    sig = _select(report, sig_var, site=site, modality=modality, dims=dims, need_values=False)[0].values \
        if sig_var else None
    n_c, n_l = da.sizes["checkpoint"], da.sizes["layer"]
    if ax is None:
        ax = _new_axes((min(16.0, max(4.8, 2.4 + 0.75 * n_l)), min(12.0, max(3.0, 1.4 + 0.42 * n_c))))
    vals = np.asarray(da.values, dtype=float)
    finite = vals[np.isfinite(vals)]
    norm = Normalize(float(finite.min()), float(finite.max()) if np.ptp(finite) > 0 else float(finite.min()) + 1)
    cmap = colormaps[_HEATMAP_CMAP].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(vals), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks(range(n_l), [str(v) for v in da["layer"].values])
    ax.set_yticks(range(n_c), _have(da, "checkpoint"))
    ax.tick_params(length=0)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("checkpoint")
    for spine in ax.spines.values():
        spine.set_visible(False)
    fs = 7 if n_l <= 12 else 6
    places = decimals(vals)                      # one precision for every cell of this metric
    for (i, j), v in np.ndenumerate(vals):
        star = sig is not None and np.isfinite(sig[i, j]) and sig[i, j] <= alpha
        if not np.isfinite(v) or not (annotate or star):
            continue
        r, g, b, _ = cmap(norm(v))
        text = (f"{v:.{places}f}" if annotate else "") + ("*" if star else "")
        ax.text(j, i, text, ha="center", va="center", fontsize=fs if annotate else 2 * fs,
                color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    where = ", ".join(sel.values())
    reference = _reference(report)
    title = _short(var) + (f" vs {reference}" if _vs_reference(var) and reference else "") + \
        (f" ({where})" if where else "")
    if runs:
        title += f"\nmean of {report.sizes['run']} runs"
    if sig_var:
        kind = sig_var.rsplit("_", 1)[1]
        if kind == "pmin":
            title += f"\n* effect > {report[sig_var].attrs.get('min_effect', '?'):g} (one-sided p $\\leq$ {alpha:g})"
        else:
            corr = str(report[sig_var].attrs.get("correction", report.attrs.get("correction", "")))
            how = (_CORRECTIONS.get(corr, corr) + "-adjusted" if corr else "adjusted") if kind == "q" \
                else "unadjusted"
            title += f"\n* {kind} $\\leq$ {alpha:g} ({how} p-value of any change)"
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, label=_axis_label(var, da.attrs), fraction=0.08, pad=0.03)
    return ax


def drift_by_layer(report: xr.Dataset, var: str = "mmd", site: Site | str = "hidden",
                   modality: Modality | None = "visual", checkpoints: Sequence[str] | None = None, *,
                   ax: Axes | None = None, highlight: str | Sequence[str] | None = "auto", note: bool = True) -> Axes:
    """One line per checkpoint of a per-layer report variable, with its interval band.

    Ten banded lines in one panel are spaghetti: beyond :data:`MAX_BANDED_LINES` lines only the
    highlighted checkpoints are drawn in full with their band (and, with runs, their dots), the
    others thin and pale for context.

    Parameters
    ----------
    report : xarray.Dataset
        A drift report.
    var : str
        Any variable with ``checkpoint`` and ``layer`` dims: ``mmd`` (default), ``sinkhorn``,
        ``paired_shift``, ``gap``, ``mir`` ...
    site, modality : str
        Selected where ``var`` has that dim.
    checkpoints : sequence of str, optional
        Which checkpoints, in this order. Default all; for a metric against the reference
        (``mmd``, ``sinkhorn``, ``sliced_w``, ``gauss_w2``, ``paired_shift``) the reference itself is
        left out when its row is all 0 (the grey line at 0 stands for it).
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new figure.
    highlight : str, sequence of str, "auto" or None
        The checkpoint(s) drawn in full with their band. ``"auto"`` (default): every line when there
        are at most :data:`MAX_BANDED_LINES`, else the reference when it has a line (gap, MIR) and the
        last step of each trajectory (``ko-5``, ``en-5``); ``None``: every line in full.
    note : bool
        Say in the title what the bands are (:func:`band_note`); off for panels that share one note
        (:func:`metrics_by_layer`).

    Returns
    -------
    matplotlib.axes.Axes
        The Axes drawn into (``ax`` when given). The band of each line is the report's
        ``{var}_lo`` .. ``{var}_hi`` interval, drawn only where the report has both.

    Raises
    ------
    driftlens.errors.UsageError
        Unknown variable, site, modality or checkpoint, or a variable without a ``layer`` dim.
    """
    return _lines_by_layer(report, var, site=site, modality=modality, checkpoints=checkpoints, ax=ax,
                           highlight=highlight, note=note)


def metrics_by_layer(report: xr.Dataset, metrics: Sequence[str] = ("mmd", "sinkhorn", "sliced_w", "gauss_w2"),
                     site: Site | str = "hidden", modality: Modality | None = "visual",
                     checkpoints: Sequence[str] | None = None, *, highlight: str | Sequence[str] | None = "auto",
                     axes=None) -> np.ndarray:
    """Several metrics per layer side by side, one panel each, the band note said once.

    Each panel is :func:`drift_by_layer` with its own y units; the figure's title says once what
    the bands of each metric are -- the metrics may have different numbers of resamples (transport
    metrics: ``transport_resamples``), and a band of 10 resamples is a rough interval, not a 95% one.

    Parameters
    ----------
    report : xarray.Dataset
        A drift report.
    metrics : sequence of str
        Report variables, one panel each (default the four distributional metrics).
    site, modality, checkpoints, highlight
        As :func:`drift_by_layer`.
    axes : sequence of matplotlib.axes.Axes, optional
        One per metric; default a new figure with one row of panels.

    Returns
    -------
    numpy.ndarray of matplotlib.axes.Axes
        One Axes per metric; the legend is on the last.
    """
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise UsageError("no metric given: nothing to draw")
    if axes is None:
        fig = _new_figure((3.3 * len(metrics) + 1.6, 3.4))
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    axes = np.atleast_1d(np.asarray(axes, dtype=object))
    if len(axes) != len(metrics):
        raise UsageError(f"{len(metrics)} metrics need {len(metrics)} axes, got {len(axes)}")
    notes = {}
    for ax, m in zip(axes, metrics):
        drift_by_layer(report, m, site=site, modality=modality, checkpoints=checkpoints, ax=ax, highlight=highlight,
                       note=False)
        ax.set_title(_short(m) + (f" vs {_reference(report)}" if _vs_reference(m) and _reference(report) else ""),
                     fontsize=9)
        if f"{m}_lo" in report.data_vars or f"{m}_runs_lo" in report.data_vars:
            notes.setdefault(band_note(report, m).removeprefix("bands: "), []).append(_short(m))
        if ax is not axes[-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    where = ", ".join(str(v) for v in (site, modality) if v is not None)
    lines = [f"{', '.join(names) if len(notes) > 1 else 'bands'}: {what}" for what, names in notes.items()]
    axes[0].figure.suptitle((f"{where}: " if where else "") + "; ".join(lines), fontsize=9)
    return axes


_ALPHA = re.compile(r"[\s_:/=-]*[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$")


def _sweep_name(label: str) -> str:
    """A merged checkpoint's sweep: its label without the trailing alpha (``ko-merge-0.25`` -> ``ko-merge``)."""
    return _ALPHA.sub("", label) or label


def drift_vs_alpha(report: xr.Dataset, var: str = "mmd", site: Site | str = "hidden",
                   modality: Modality | None = "visual", layers: Sequence[int] | None = None, *,
                   alphas: Mapping[str, float] | None = None, sweeps: Mapping[str, Sequence[str]] | None = None,
                   ax: Axes | None = None) -> Axes:
    """Drift against the merge coefficient: one line per (sweep, layer), with its interval band.

    A merge sweep (:func:`driftlens.merges.sweep`) is a trajectory whose points are merges
    ``base + alpha * (adapted - base)``; this draws ``var`` at each merged checkpoint against its
    alpha, layers in colour, sweeps (e.g. the Korean model's and the English control's) in line style.

    Parameters
    ----------
    report : xarray.Dataset
        A drift report whose merged checkpoints have a ``merge_alpha`` coordinate (``driftlens.drift``
        adds it from the store's records), or any report with ``alphas`` given.
    var : str
        A variable with ``checkpoint`` and ``layer`` dims (``mmd``, ``paired_shift``, ``route_js`` ...).
    site, modality : str
        Selected where ``var`` has that dim.
    layers : sequence of int, optional
        Which layers (default all).
    alphas : mapping label -> float, optional
        The alpha of each merged checkpoint (default the report's ``merge_alpha``; NaN: not a merge).
    sweeps : mapping name -> sequence of labels, optional
        Which checkpoints form each sweep (default: grouped by their label without the alpha).
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new figure.

    Returns
    -------
    matplotlib.axes.Axes

    Raises
    ------
    driftlens.errors.UsageError
        No alpha known for any checkpoint, or an unknown variable, site, modality, layer or label.
    """
    runs = _runs(report, var)
    da, sel = _select(report, f"{var}_runs" if runs else var, site=site, modality=modality)
    have = _have(da, "checkpoint")
    if alphas is None:
        if "merge_alpha" not in report.coords:
            raise UsageError("the report has no merge_alpha coordinate (no checkpoint of its store is a merge, or the "
                             "report came from a Dataset without a store): pass alphas={label: alpha}")
        alphas = {c: float(a) for c, a in zip(_have(report, "checkpoint"), report["merge_alpha"].values)}
    alphas = {str(c): float(a) for c, a in alphas.items() if np.isfinite(a)}
    unknown = [c for c in alphas if c not in have]
    if unknown or not alphas:
        raise UsageError(f"merge alphas for {unknown or 'no checkpoint'}; the report has {have}")
    if sweeps is None:
        sweeps = {}
        for c in have:
            if c in alphas:
                sweeps.setdefault(_sweep_name(c), []).append(c)
    bad = [c for labs in sweeps.values() for c in labs if c not in alphas]
    if bad:
        raise UsageError(f"checkpoints {bad} have no merge alpha")
    all_layers = [int(v) for v in da.layer.values]
    layers = all_layers if layers is None else [int(v) for v in layers]
    if [v for v in layers if v not in all_layers]:
        raise UsageError(f"layers {[v for v in layers if v not in all_layers]} are not in the report: {all_layers}")
    band = _band(report, f"{var}_runs" if runs else var, sel, ("checkpoint", "layer"))
    ax = _new_axes((6.4, 4.0)) if ax is None else ax
    from matplotlib import colormaps

    colors = (list(_GROUP_COLORS) if len(layers) <= len(_GROUP_COLORS) else
              [colormaps["viridis"](0.9 * i / max(1, len(layers) - 1)) for i in range(len(layers))])
    styles = ("-", "--", ":", "-.")
    for si, (name, labs) in enumerate(sweeps.items()):
        labs = sorted(labs, key=lambda c: alphas[c])
        x = np.array([alphas[c] for c in labs])
        for li, layer in enumerate(layers):
            y = da.sel(checkpoint=labs, layer=layer).values
            color = colors[li]
            ax.plot(x, y, linestyle=styles[si % len(styles)], marker=_MARKERS[si % len(_MARKERS)], ms=4,
                    color=color, label=f"{name}, layer {layer}" if len(sweeps) > 1 else f"layer {layer}")
            if band is not None:
                lo, hi = (b.sel(checkpoint=labs, layer=layer).values for b in band)
                ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
    ax.axhline(0.0, color=_GREY, lw=0.8, zorder=0)
    ax.set_xlabel("merge coefficient alpha (0 = base, 1 = adapted)")
    where = ", ".join(str(v) for v in sel.values())
    ax.set_ylabel(_axis_label(var, report[var].attrs, prefix=f"{modality} " if "modality" in sel else ""))
    covers = "runs, then clusters" if runs else "probe sampling"
    ax.set_title(f"{_short(var)} vs merge alpha{f' ({where})' if where else ''}"
                 + (f"\nbands: {_level(report)}interval ({covers})" if band is not None else ""), fontsize="medium")
    _legend_outside(ax)
    return ax


def contrast_by_layer(report: xr.Dataset, var: str = "mmd", contrasts: Sequence[str] | None = None,
                      site: Site | str = "hidden", modality: Modality | None = "visual", *,
                      ax: Axes | None = None) -> Axes:
    """Excess drift per layer: a contrast ``a - b`` of one metric (e.g. Korean minus the English control).

    With several runs: the mean over runs, its across-run interval (runs, then clusters) as a band and
    one dot per run. With one run: the contrast and its within-run interval (probe sampling only; the
    title says so). The line at 0 is "no excess".

    Parameters
    ----------
    report : xarray.Dataset
        A report with contrasts (``driftlens drift --contrast A:B`` / ``--trajectories``).
    var : str
        The metric (default ``mmd``); draws ``{var}_contrast``.
    contrasts : sequence of str, optional
        Contrast labels (``"ko-5 - en-5"``); default all.
    site, modality : str
        Selected where the variable has that dim.
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new figure.

    Returns
    -------
    matplotlib.axes.Axes
    """
    name = f"{var}_contrast"
    if name not in report.data_vars:
        raise UsageError(f"the report has no {name!r}: compute contrasts (driftlens drift --contrast A:B, or "
                         f"--trajectories PREFIX_A,PREFIX_B)")
    runs = _runs(report, name)
    shown = f"{name}_runs" if runs else name
    dims = ("contrast", "layer")
    da, sel = _select(report, shown, site=site, modality=modality, dims=dims)
    band = _band(report, shown, sel, dims)
    have = _have(da, "contrast")
    chosen = have if contrasts is None else [str(c) for c in ([contrasts] if isinstance(contrasts, str)
                                                               else contrasts)]
    unknown = [c for c in chosen if c not in have]
    if unknown or not chosen:
        raise UsageError(f"contrasts {unknown or chosen} are not in the report; it has {have}")
    ax = ax if ax is not None else _new_axes((7.2, 4.2))
    layers = da["layer"].values
    n = len(chosen)
    for i, con in enumerate(chosen):
        color, marker = _GROUP_COLORS[i % len(_GROUP_COLORS)], _MARKERS[(i + 1) % len(_MARKERS)]
        if n > 1:                            # later contrasts (later steps) in fuller colour
            color = _mix(color, 0.45 + 0.55 * i / (n - 1)) if len(set(map(_group, chosen))) == 1 else color
        ax.plot(layers, da.sel(contrast=con).values, color=color, marker=marker, ms=4.5, lw=1.6, label=con, zorder=3)
        if band is not None:
            ax.fill_between(layers, band[0].sel(contrast=con).values, band[1].sel(contrast=con).values,
                            color=color, alpha=0.14, lw=0, zorder=1)
        if runs:
            per_run = report[name].sel({**sel, "contrast": con}).transpose("run", "layer").values
            for j, row in enumerate(per_run):
                ax.scatter(layers + 0.06 * (j - (len(per_run) - 1) / 2), row, s=11, color=color, marker=marker,
                           alpha=0.6, lw=0, zorder=2)
    ax.axhline(0.0, color=_GREY, lw=0.8, zorder=0)
    _layer_ticks(ax, layers)
    ax.set_xlabel("decoder layer")
    prefix = f"{sel['modality']} " if "modality" in sel else ""
    ax.set_ylabel(f"excess {prefix}{_short(var)}, a - b ({_units_text(report[name].attrs.get('units'))})")
    where = ", ".join(sel.values())
    how = (f"mean of {report.sizes['run']} runs, dots: one run, bands: {_level(report)}across-run interval "
           f"(runs, then clusters)") if runs else \
        f"one run; bands: {_level(report)}within-run interval (probe sampling only, not run-to-run variation)"
    ax.set_title(f"{_short(var)} contrast by layer" + (f" ({where})" if where else "") + f"\n{how}", fontsize=9)
    ax.grid(axis="y", color="#e6e6e6", lw=0.6, zorder=0)
    ax.set_axisbelow(True)
    _legend_outside(ax, title="contrast a - b", title_fontsize="small")
    return ax


def modality_gap_by_layer(report: xr.Dataset, site: Site | str = "hidden",
                          checkpoints: Sequence[str] | None = None, *, ax: Axes | None = None,
                          highlight: str | Sequence[str] | None = "auto") -> Axes:
    """The modality gap (``gap``) per layer, one line per checkpoint with its interval band.

    Parameters
    ----------
    report : xarray.Dataset
        A drift report with ``gap`` (``driftlens.drift(..., metrics=[..., "gap"])``).
    site : str
        Where the tokens were read.
    checkpoints : sequence of str, optional
        Default all (the reference included: its gap is a value, not 0).
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new figure.
    highlight : str, sequence of str, "auto" or None
        The checkpoint(s) drawn in full with their band (see :func:`drift_by_layer`).

    Returns
    -------
    matplotlib.axes.Axes
        The Axes drawn into (``ax`` when given).

    Raises
    ------
    driftlens.errors.UsageError
        No ``gap`` in the report, or an unknown site or checkpoint.
    """
    return _lines_by_layer(report, "gap", site=site, modality=None, checkpoints=checkpoints, ax=ax, highlight=highlight,
                           ylabel=_axis_label("gap", report["gap"].attrs if "gap" in report.data_vars else {},
                                              prefix="visual-text "))


def mir_by_layer(report: xr.Dataset, checkpoints: Sequence[str] | None = None, *, ax: Axes | None = None,
                 highlight: str | Sequence[str] | None = "auto") -> Axes:
    """The modality integration rate's per-layer term (``mir``), one line per checkpoint with its
    interval band; each legend entry carries the checkpoint's ``mir_total``.

    Parameters
    ----------
    report : xarray.Dataset
        A drift report with ``mir`` (and usually ``mir_total``).
    checkpoints : sequence of str, optional
        Default all.
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new figure.
    highlight : str, sequence of str, "auto" or None
        The checkpoint(s) drawn in full with their band (see :func:`drift_by_layer`).

    Returns
    -------
    matplotlib.axes.Axes
        The Axes drawn into (``ax`` when given).

    Raises
    ------
    driftlens.errors.UsageError
        No ``mir`` in the report, or an unknown checkpoint.
    """
    labels, legend_title = None, None
    total = "mir_total_runs" if "mir_total_runs" in report.data_vars else "mir_total"
    if total in report.data_vars and report[total].dims == ("checkpoint",):
        tot = report[total]
        labels = {str(c): f"{c}: {float(v):.2f}" for c, v in zip(tot["checkpoint"].values, tot.values)}
        legend_title = f"checkpoint: MIR total\n({_units_text(tot.attrs.get('units', 'log10'))})"
    return _lines_by_layer(report, "mir", site=None, modality=None, checkpoints=checkpoints, ax=ax, labels=labels,
                           legend_title=legend_title, highlight=highlight)


def rank_schedule(schedule: RankSchedule, report: xr.Dataset | None = None, *, ax: Axes | None = None) -> Axes:
    """LoRA rank per decoder layer (bars stacked by module) beside the signal they came from (line).

    Parameters
    ----------
    schedule : driftlens.RankSchedule
        From :func:`driftlens.allocate_ranks`.
    report : xarray.Dataset, optional
        When given and the schedule has one signal expression, the raw (unclipped) profile is drawn
        from it, with the variable's units; otherwise the cleaned signal the rule saw (mean over the
        layer's modules).
    ax : matplotlib.axes.Axes, optional
        Where to draw the bars; the signal goes on a twin Axes sharing its x axis
        (``ax.figure.axes`` then holds both). Default a new figure.

    Returns
    -------
    matplotlib.axes.Axes
        The bars' Axes (``ax`` when given). Its ``patches`` are the bars; the signal line is the
        first line of the twin Axes.
    """
    from matplotlib.lines import Line2D

    L = schedule.n_layers
    if ax is None:
        ax = _new_axes((max(5.6, 0.32 * L + 3.0), 3.8))
    x = np.arange(L)
    bottom = np.zeros(L)
    targets = list(schedule.meta.get("targets") or sorted({m.module for m in schedule.modules}))
    common = _common_prefix(targets)
    handles = []
    for i, t in enumerate(targets):
        h = np.zeros(L)
        for m in schedule.modules:
            if m.module == t:
                h[m.layer] += m.rank
        bars = ax.bar(x, h, bottom=bottom, width=0.8, color=OKABE_ITO[i % len(OKABE_ITO)], edgecolor="white",
                      linewidth=0.5, label=t[len(common):] or t)
        handles.append(bars)
        bottom += h
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("LoRA rank (sum over modules)")
    exprs = sorted(set((schedule.meta.get("signals") or {}).values()))
    label = exprs[0] if len(exprs) == 1 else "signal (mean over modules)"
    y = schedule.layer_signal()
    if report is not None and len(exprs) == 1:
        from driftlens.ranks import DEFAULT_MODALITY, parse_signal, signal_profile

        y = signal_profile(report, exprs[0], checkpoint=schedule.meta.get("checkpoint"),
                           contrast=schedule.meta.get("contrast"),
                           modality=schedule.meta.get("modality_default", DEFAULT_MODALITY))
        name = parse_signal(exprs[0])[0]
        label = f"{exprs[0]} ({_units_text(report[name].attrs.get('units'))})"
    ax2 = ax.twinx()
    ax2.plot(x, y, color="black", marker="o", ms=4.5, lw=1.6, label=label)
    ax2.axhline(0, color=_GREY, lw=0.6)
    ax2.set_ylabel("signal: " + label)
    # same zero, and the largest signal level with the tallest bar: proportional ranks then sit on the line
    top_bar = float(bottom.max()) if bottom.size else 1.0
    top_bar = top_bar if top_bar > 0 else 1.0
    finite = np.asarray(y, dtype=float)[np.isfinite(y)]
    head = 1.45                                       # room above the tallest bar for the legend
    ax.set_ylim(0, top_bar * head)
    if finite.size and finite.min() >= 0 and finite.max() > 0:
        ax2.set_ylim(0, float(finite.max()) * head)
    _layer_ticks(ax, x)
    ax.set_xlim(-0.6, L - 0.4)
    rule = schedule.meta.get("rule")
    ck, con = schedule.meta.get("checkpoint"), schedule.meta.get("contrast")
    at = f"; signal: contrast {con}" if con else (f"; signal at checkpoint {ck}" if ck else "")
    if schedule.meta.get("runs"):
        at += f", mean of {len(schedule.meta['runs'])} runs"
    ax.set_title(f"{rule} ranks, budget {schedule.budget}" + at,
                 fontsize=9)
    line = Line2D([], [], color="black", marker="o", ms=4.5, lw=1.6, label="signal")
    ax2.legend(handles + [line], [h.get_label() for h in handles] + ["signal"], loc="upper center",
               ncols=min(len(handles) + 1, 5), fontsize="small", frameon=False,
               title=f"modules ({common.rstrip('.')})" if common else None, title_fontsize="small")
    return ax


def _common_prefix(names: Sequence[str]) -> str:
    """The dotted prefix shared by every name (``self_attn.``), or ``""``."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    common = []
    for bits in zip(*parts):
        if len(set(bits)) != 1:
            break
        common.append(bits[0])
    if any(len(p) <= len(common) for p in parts):
        return ""
    return ".".join(common) + "." if common else ""


# ----------------------------------------------------------------------------- other figures


def _language_colors(ax, labels: Sequence[str], langs: Sequence[str], colors: Mapping[str, str] | None) -> dict:
    """Each language's colour, with the meaning colours have in every other figure: a language named
    like a trajectory (``ko`` for ``ko-1 ... ko-5``) takes that trajectory's colour (trajectories in
    order of appearance take the Okabe-Ito colours, as in :func:`checkpoint_styles`); a language
    already drawn on ``ax`` keeps its colour; ``colors`` overrides both."""
    drawn = {line.get_label(): line.get_color() for line in ax.get_lines()}
    groups = [g for g in dict.fromkeys(_group(c) for c in labels) if g in langs]
    taken = {drawn[lang] for lang in langs if lang in drawn}
    order = groups + [lang for lang in langs if lang not in groups]
    free = [c for c in _GROUP_COLORS if c not in taken]
    out = {}
    for lang in order:
        if colors is not None and lang in colors:
            out[lang] = colors[lang]
        elif lang in drawn:
            out[lang] = drawn[lang]
        else:
            out[lang] = free.pop(0) if free else _GREY
    return out


def grounding_vs_drift(accuracy: Mapping[str, Mapping[str, float]], drift: Mapping[str, float], *,
                       ax: Axes | None = None, chance: float | None = None,
                       xlabel: str = "visual drift: mean MMD$^2$ over layers (dimensionless)", tag: str = "",
                       annotate: Annotate = "ends", colors: Mapping[str, str] | None = None) -> Axes:
    """Grounding accuracy per language against drift, one point per checkpoint in trajectory order.

    Call it again on the same ``ax`` with a ``tag`` to overlay a second trajectory (a control):
    a language keeps its colour, the tagged series is dashed with square markers. Colours mean what
    they mean in the report figures: the language of a trajectory (``ko`` for ``ko-1 ... ko-5``) gets
    that trajectory's colour there -- draw the adaptation first, the control second, as the report
    orders them.

    Parameters
    ----------
    accuracy : mapping
        ``{checkpoint: {language: accuracy}}``, accuracies in [0, 1].
    drift : mapping
        ``{checkpoint: float}`` (e.g. the mean over layers of the visual MMD^2 effect); its order is
        the line's order; checkpoints missing from ``accuracy`` are skipped.
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new figure.
    chance : float, optional
        Chance accuracy, drawn as a grey dashed line.
    xlabel : str
        The x axis label (with units).
    tag : str
        Appended to the legend labels of this series (``" (control)"``); a non-empty tag draws dashed.
    annotate : {"ends", "all", "none"}
        Label the first and last checkpoint of each line, every checkpoint, or none.
    colors : mapping, optional
        ``{language: colour}``, overriding the colours above.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes drawn into (``ax`` when given).
    """
    ax = ax if ax is not None else _new_axes((7.2, 4.4))
    labels = [c for c in drift if c in accuracy]
    langs = sorted({lang for c in labels for lang in accuracy[c]})
    color_of = _language_colors(ax, labels, langs, colors)
    seen = {(t.get_text(), tuple(np.round(getattr(t, "xy", (np.nan, np.nan)), 9))) for t in ax.texts}
    for lang in langs:
        xs = [float(drift[c]) for c in labels]
        ys = [float(accuracy[c][lang]) for c in labels]
        ax.plot(xs, ys, marker="s" if tag else "o", ls="--" if tag else "-", ms=5, lw=1.5,
                color=color_of[lang], label=lang + tag, mfc="white" if tag else None)
        if annotate == "none":
            continue
        keep = range(len(labels)) if annotate == "all" else sorted({0, len(labels) - 1})
        for k in keep:
            key = (labels[k], tuple(np.round((xs[k], ys[k]), 9)))
            if key in seen:                       # the shared base point of two series: label it once
                continue
            seen.add(key)
            dx, dy = 1.0, 1.0                     # up and right; a line's last point: onward, off the line
            if k == len(labels) - 1 and k > 0:
                span = (max(xs) - min(xs)) or 1.0
                dx, dy = (xs[k] - xs[k - 1]) / span, ys[k] - ys[k - 1]
            ax.annotate(labels[k], (xs[k], ys[k]), fontsize=7, color="#333333", textcoords="offset points",
                        xytext=(4 if dx >= 0 else -4, 4 if dy >= 0 else -4), ha="left" if dx >= 0 else "right",
                        va="bottom" if dy >= 0 else "top")
    if chance is not None and not any(line.get_label() == "chance" for line in ax.get_lines()):
        ax.axhline(chance, color=_GREY, ls=":", lw=1.2, label="chance")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("grounding accuracy (fraction correct)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(color="#e6e6e6", lw=0.6)
    ax.set_axisbelow(True)
    ax.set_title("grounding accuracy vs visual drift", fontsize=9)
    _legend_outside(ax)
    return ax


def seeds_by_layer(series: Mapping[str, np.ndarray], *, ax: Axes | None = None,
                   ylabel: str = "visual MMD$^2$ (dimensionless)", title: str | None = None,
                   layers: Sequence[int] | None = None) -> Axes:
    """Per-layer values over seeds: one line per series (its mean), one dot per seed.

    Parameters
    ----------
    series : mapping
        ``{label: array [seeds, layers]}``, e.g. the last Korean checkpoint and the control's.
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new figure.
    ylabel : str
        The y axis label (with units).
    title : str, optional
        Default ``"per-layer values over seeds"``.
    layers : sequence of int, optional
        The x positions (layer numbers); default ``0 .. layers-1``.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes drawn into (``ax`` when given).
    """
    ax = ax if ax is not None else _new_axes((7.2, 4.2))
    arrays = {label: np.atleast_2d(np.asarray(vals, dtype=float)) for label, vals in series.items()}  # [seeds, layers]
    n = len(arrays)
    n_seeds = {len(v) for v in arrays.values()}
    xs = None
    for i, (label, vals) in enumerate(arrays.items()):
        xs = np.asarray(layers if layers is not None else np.arange(vals.shape[1]))
        color, marker = OKABE_ITO[i % len(OKABE_ITO)], _MARKERS[i % len(_MARKERS)]
        ax.plot(xs, vals.mean(0), marker=marker, color=color, lw=1.6,
                label=label if len(n_seeds) == 1 else f"{label} (mean of {len(vals)} seeds)")
        off = 0.08 * (i - (n - 1) / 2)
        for row in vals:
            ax.scatter(xs + off, row, s=14, color=color, alpha=0.55, marker=marker, lw=0)
    ax.axhline(0, color=_GREY, lw=0.8, zorder=0)
    if xs is not None:
        _layer_ticks(ax, xs)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "per-layer values over seeds", fontsize=9)
    ax.grid(axis="y", color="#e6e6e6", lw=0.6)
    ax.set_axisbelow(True)
    k = next(iter(n_seeds)) if len(n_seeds) == 1 else None
    _legend_outside(ax, title=f"line: mean of {k} seeds\ndots: one seed" if k else "dots: one seed",
                    title_fontsize="small")
    return ax


def probe_accuracy(probe_ds: xr.Dataset, checkpoints: Sequence[str] | None = None, *,
                   ax: Axes | None = None) -> Axes:
    """Linear-probe accuracy per layer, one line per checkpoint with a +-1 sd band.

    Parameters
    ----------
    probe_ds : xarray.Dataset
        A result of :func:`driftlens.probing.linear_probe` on a layered site: dims ``(checkpoint, layer)``;
        ``accuracy`` (required), and where present ``accuracy_sd`` (the band), ``transfer`` (dashed,
        same colour: the reference checkpoint's probe applied to this checkpoint; not drawn at the
        reference, where it equals the accuracy), ``shuffled`` (grey dotted: the same procedure on
        shuffled labels; left out when all NaN) and ``chance`` (grey dash-dot; a scalar, or per
        layer). Attributes ``reference``, ``label``, ``site``, ``modality`` go into the legend and
        title when present.
    checkpoints : sequence of str, optional
        Default all.
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new figure.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes drawn into (``ax`` when given).

    Raises
    ------
    driftlens.errors.UsageError
        No ``accuracy`` variable with those dims, or an unknown checkpoint.
    """
    from matplotlib.lines import Line2D

    dims = ("checkpoint", "layer")
    acc, _ = _select(probe_ds, "accuracy", dims=dims)
    chosen = _pick_checkpoints(acc, checkpoints, None, drop_zero_reference=False)
    reference = _reference(probe_ds)
    styles = checkpoint_styles(_have(acc, "checkpoint"), reference if reference in _have(acc, "checkpoint") else None)
    layers = acc["layer"].values

    def get(name):
        if name not in probe_ds.data_vars:
            return None
        da = probe_ds[name]
        if not set(da.dims) <= set(dims):
            return None
        return da.broadcast_like(acc).transpose(*dims)

    sd, transfer, shuffled, chance = get("accuracy_sd"), get("transfer"), get("shuffled"), get("chance")
    if shuffled is not None and not np.isfinite(shuffled.values).any():      # run without shuffles
        shuffled = None
    ax = ax if ax is not None else _new_axes((7.2, 4.2))
    for ck in chosen:
        st = styles[ck]
        y = acc.sel(checkpoint=ck).values
        ax.plot(layers, y, color=st["color"], marker=st["marker"], ms=4.5, lw=1.6, label=ck, zorder=3)
        if sd is not None:
            s = sd.sel(checkpoint=ck).values
            ax.fill_between(layers, y - s, y + s, color=st["color"], alpha=0.15, lw=0, zorder=1)
        if transfer is not None and ck != reference:      # at the reference, transfer is the accuracy
            ax.plot(layers, transfer.sel(checkpoint=ck).values, color=st["color"], ls="--", lw=1.3, zorder=2)
        if shuffled is not None:
            ax.plot(layers, shuffled.sel(checkpoint=ck).values, color=_GREY, ls=":", lw=1.0, zorder=2)
    if chance is not None:
        c = chance.isel(checkpoint=0).values
        if np.allclose(c, c[0], equal_nan=True):
            ax.axhline(float(c[0]), color=_GREY, ls="-.", lw=1.0, zorder=0)
        else:
            ax.plot(layers, c, color=_GREY, ls="-.", lw=1.0, zorder=0)
    _layer_ticks(ax, layers)
    ax.set_xlabel("decoder layer")
    units = acc.attrs.get("units")
    ax.set_ylabel("probe accuracy " + (f"({_units_text(units)})" if units not in (None, "", "1")
                                       else "(fraction correct)"))
    vals = np.concatenate([np.ravel(d.values) for d in (acc, transfer, shuffled) if d is not None])
    vals = vals[np.isfinite(vals)]
    if vals.size and vals.min() >= 0 and vals.max() <= 1:
        ax.set_ylim(-0.02, 1.02)
    ax.grid(axis="y", color="#e6e6e6", lw=0.6)
    ax.set_axisbelow(True)
    attrs = probe_ds.attrs
    what = attrs.get("label") or attrs.get("target")
    where = ", ".join(str(attrs[k]) for k in ("site", "modality") if attrs.get(k))
    ax.set_title("linear probe accuracy by layer" + (f": {what}" if what else "") + (f" ({where})" if where else "")
                 + ("\nbands: $\\pm$1 sd over folds" if sd is not None else ""), fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    extra = [(Line2D([], [], color="black", lw=1.6), "accuracy")]
    if transfer is not None:
        extra.append((Line2D([], [], color="black", ls="--", lw=1.3),
                      f"transfer of the {reference} probe" if reference else "transfer"))
    if shuffled is not None:
        extra.append((Line2D([], [], color=_GREY, ls=":", lw=1.0), "shuffled labels"))
    if chance is not None:
        extra.append((Line2D([], [], color=_GREY, ls="-.", lw=1.0), "chance"))
    blank = Line2D([], [], alpha=0)
    _legend_outside(ax, handles=handles + [blank] + [h for h, _ in extra],
                    labels=labels + [""] + [lab for _, lab in extra], title="checkpoint", title_fontsize="small")
    return ax


def token_map(data, *, color="modality", ax=None, checkpoints=None, palette=None, legend_title=None,
                   s: float | None = None, alpha: float = 0.7, title: str | None = None, panel_width: float = 3.6):
    """Draw a token map of :func:`token_map_data`.

    Two layouts, chosen by ``color``:

    - ``color="checkpoint"``: one panel, every checkpoint's tokens drawn over each other, one
      colour per checkpoint (the reference first, in black; later checkpoints on top). Returns
      one ``Axes``.
    - anything else (``"modality"``, the default, another token coordinate, labels): one panel
      per checkpoint, side by side with shared axes, tokens coloured by the labels. Returns a
      1-D ``numpy.ndarray`` of ``Axes`` (one per checkpoint, even when there is one).

    Parameters
    ----------
    data : xarray.Dataset
        The result of :func:`token_map_data`.
    color : str or callable or array-like
        ``"checkpoint"``, ``"modality"``, the name of another coordinate or variable of
        ``data`` on ``token`` (``lang``, ``cluster``, ...) or on (checkpoint, token); or labels:
        an array of one label per token (``data.sizes["token"]``) or per (checkpoint, token) of
        ``data``, or a callable taking ``data`` and returning such an array. String / boolean
        labels get a categorical palette and a legend; numbers a continuous colormap (cividis)
        and a colorbar. Example, the shape colour of the organism world:
        ``color=lambda d: [g.split("-")[0] for g in d.group.values]``.
    ax : matplotlib Axes or sequence of Axes, optional
        Where to draw: one Axes for ``color="checkpoint"``, one per drawn checkpoint otherwise.
        Default: a new figure (pyplot's under IPython, so it shows inline; else a bare
        :class:`matplotlib.figure.Figure`, no pyplot).
    checkpoints : sequence of str, optional
        Checkpoints to draw (default all of ``data``).
    palette : dict or sequence, optional
        Colours of the categories: a dict label -> colour or a list in label order. Default:
        Okabe-Ito (colour-blind safe): visual blue, text orange; labels that are colour names
        (red, blue, green, ...) get their Okabe-Ito colour; more than 8 categories are spread
        over cividis.
    legend_title : str, optional
        Title of the legend / colorbar (default: the name of ``color``).
    s, alpha : float
        Marker area (default from the number of points) and opacity.
    title : str, optional
        Replaces the default title (site, layer, method, sample size).
    panel_width : float
        Width in inches of one panel of a new figure (its height follows the map's aspect).

    Returns
    -------
    matplotlib.axes.Axes or numpy.ndarray of Axes
    """
    from matplotlib.lines import Line2D

    for v in ("x", "y"):
        if v not in data.data_vars or data[v].dims != ("checkpoint", "token"):
            raise UsageError("data must be the result of token_map_data (variables x, y on checkpoint, token)")
    labels_all = [str(c) for c in data.checkpoint.values]
    chosen = pick_checkpoints(labels_all, checkpoints, "the map")
    ci = [labels_all.index(c) for c in chosen]
    xs, ys = data.x.values[ci], data.y.values[ci]
    ref = data.attrs.get("reference")
    by_checkpoint = isinstance(color, str) and color == "checkpoint"

    n_panels = 1 if by_checkpoint else len(chosen)
    axes, own = _map_axes(ax, n_panels, panel_width, _map_aspect(xs, ys))
    fig = axes[0].figure
    n_points = xs.size if by_checkpoint else xs.shape[1]
    size = s if s is not None else float(np.clip(12000.0 / max(1, n_points), 3.0, 30.0))

    if by_checkpoint:
        order = sorted(range(len(chosen)), key=lambda i: chosen[i] != ref)     # the reference underneath
        cats = [chosen[i] for i in order]
        colors = _map_palette(cats, palette, first_black=ref in chosen)
        a = axes[0]
        for i in order:
            a.scatter(xs[i], ys[i], s=size, c=colors[chosen[i]], alpha=alpha, linewidths=0,
                      label=chosen[i] + (" (reference)" if chosen[i] == ref else ""), rasterized=n_points > 5000)
        handles = [Line2D([], [], ls="", marker="o", color=colors[c], markersize=6,
                          label=c + (" (reference)" if c == ref else "")) for c in cats]
        a.legend(handles=handles, title=legend_title or "checkpoint", **_LEGEND)
    else:
        values, name = _map_colors(data, color, ci)
        numeric = values.dtype.kind in "iuf"
        if numeric:
            finite = values[np.isfinite(values)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            norm = Normalize(lo, hi if hi > lo else lo + 1.0)
            for p, a in enumerate(axes):
                a.scatter(xs[p], ys[p], s=size, c=values[p], cmap="cividis", norm=norm, alpha=alpha,
                          linewidths=0)
            sm = ScalarMappable(norm=norm, cmap="cividis")
            fig.colorbar(sm, ax=list(axes), label=legend_title or name, shrink=0.8)
        else:
            values = values.astype(str)
            cats = list(dict.fromkeys(np.unique(values)))
            if name == "modality":                                   # visual, text, then any other
                known = list(MODALITY_COLORS)
                cats = sorted(cats, key=lambda c: (known.index(c) if c in known else len(known), c))
            colors = _map_palette(cats, palette, modality=name == "modality")
            for p, a in enumerate(axes):
                for cat in cats:
                    m = values[p] == cat
                    if m.any():
                        a.scatter(xs[p][m], ys[p][m], s=size, c=colors[cat], alpha=alpha, linewidths=0,
                                  label=cat)
            if len(cats) <= MAX_LEGEND:
                counts = {c: int((values[0] == c).sum()) for c in cats}
                handles = [Line2D([], [], ls="", marker="o", color=colors[c], markersize=6,
                                  label=f"{c} ({counts[c]})") for c in cats]
                axes[-1].legend(handles=handles, title=legend_title or name, **_LEGEND)
            else:
                axes[-1].text(0.99, 0.01, f"{len(cats)} {legend_title or name} values (no legend)",
                              transform=axes[-1].transAxes, ha="right", va="bottom", fontsize=6, color="0.4")
        for p, a in enumerate(axes):
            a.set_title(chosen[p] + (" (reference)" if chosen[p] == ref else ""), fontsize=9)

    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
        # one unit is as long across as up; shared panels keep their box, a lone panel its data limits
        a.set_aspect("equal", adjustable="box" if len(axes) > 1 else "datalim")
    axes[0].set_ylabel("UMAP 2", fontsize=8)
    for a in axes:
        a.set_xlabel("UMAP 1", fontsize=8)
    head = title if title is not None else _map_title(data)
    if own and head:
        fig.suptitle(head, fontsize=9)
    elif head:
        below = axes[0].get_title()
        axes[0].set_title(head + ("\n" + below if below else ""), fontsize=8)
    return axes[0] if by_checkpoint else axes


_LEGEND = {"fontsize": 7, "title_fontsize": 7, "loc": "upper left", "bbox_to_anchor": (1.02, 1.0),
           "borderaxespad": 0.0, "frameon": False}


def _map_title(data) -> str:
    a = data.attrs
    where = f"{a.get('site', '?')}" + (f" layer {a['layer']}" if "layer" in a else "")
    how = {"reference": f"UMAP of {a.get('reference')!r}, others placed in it",
           "aligned": "AlignedUMAP, one map per checkpoint"}.get(a.get("method"), str(a.get("method")))
    n = f"{a.get('n_tokens')} tokens, {a.get('n_clusters')} {a.get('cluster_unit', 'cluster')}s per checkpoint"
    return f"{where}: {how}\n{n}"


def _map_aspect(xs, ys) -> float:
    """Height / width of the drawn points' extent, kept between 0.45 and 1.5."""
    xr, yr = np.nanmax(xs) - np.nanmin(xs), np.nanmax(ys) - np.nanmin(ys)
    return float(np.clip(yr / xr, 0.45, 1.5)) if np.isfinite(xr) and xr > 0 and np.isfinite(yr) else 1.0


def _map_axes(ax, n, width, aspect):
    """(1-D array of n Axes, whether we created the figure)."""
    if ax is None:
        legend_w = 1.4                                     # the legend sits right of the last panel
        fig = _new_figure((width * n + legend_w + 0.4, width * aspect + 1.0))
        axes = np.atleast_1d(fig.subplots(1, n, sharex=True, sharey=True, squeeze=False)[0])
        return axes, True
    axes = np.ravel(np.asarray(ax, dtype=object))
    if len(axes) != n or not all(hasattr(a, "scatter") for a in axes):
        raise UsageError(f"ax must be {'one Axes' if n == 1 else f'{n} Axes (one per checkpoint)'}, "
                         f"got {len(axes)} object(s)")
    return axes, False


def _map_colors(data, color, ci):
    """Labels per (drawn checkpoint, token) and their name."""
    n_c, n_t = data.sizes["checkpoint"], data.sizes["token"]
    if isinstance(color, str):
        if color not in data.variables or color in ("x", "y", "token"):
            names = sorted(k for k in data.variables if k not in ("x", "y", "checkpoint")
                           and set(data[k].dims) <= {"checkpoint", "token"} and "token" in data[k].dims)
            raise UsageError(f"color {color!r} is not a token coordinate of the map; use 'checkpoint', one of "
                             f"{names}, or pass labels (an array or a callable)")
        values, name = data[color], color
    else:
        name = getattr(color, "__name__", None) or getattr(color, "name", None) or "label"
        if name == "<lambda>":
            name = "label"
        values = color(data) if callable(color) else color
    if hasattr(values, "dims") and hasattr(values, "transpose"):        # a DataArray
        if set(values.dims) == {"checkpoint", "token"}:
            values = values.transpose("checkpoint", "token")
        elif tuple(values.dims) != ("token",):
            raise UsageError(f"color labels must be on (token,) or (checkpoint, token), got dims {values.dims}")
        values = values.values
    values = np.asarray(values)
    if values.dtype == object:
        values = values.astype(str)
    if values.shape == (n_t,):
        values = np.broadcast_to(values, (n_c, n_t))
    if values.shape != (n_c, n_t):
        raise UsageError(f"color labels have shape {values.shape}; expected one per token ({n_t},) or per "
                         f"(checkpoint, token) ({n_c}, {n_t})")
    values = values[ci]
    if values.dtype.kind == "b":
        values = values.astype(str)
    return values, str(name)


def _map_palette(cats, palette, first_black: bool = False, modality: bool = False) -> dict:
    """Colour of each category."""
    if palette is not None:
        if isinstance(palette, dict):
            missing = [c for c in cats if c not in palette]
            if missing:
                raise UsageError(f"palette has no colour for {missing}")
            return {c: palette[c] for c in cats}
        pal = list(palette)
        if len(pal) < len(cats):
            raise UsageError(f"palette has {len(pal)} colour(s) for {len(cats)} categories")
        return dict(zip(cats, pal))
    if modality and all(c in MODALITY_COLORS for c in cats):
        return {c: MODALITY_COLORS[c] for c in cats}
    lower = [c.lower() for c in cats]
    if all(c in OKABE_ITO_NAMES for c in lower) and len({OKABE_ITO_NAMES[c] for c in lower}) == len(cats):
        return {c: OKABE_ITO_NAMES[c.lower()] for c in cats}
    if len(cats) <= len(OKABE_ITO):
        others = tuple(c for c in OKABE_ITO if c != "#000000")
        pal = ("#000000",) + others if first_black else others + ("#000000",)
        return dict(zip(cats, pal))
    from matplotlib import colormaps

    cmap = colormaps["cividis"]
    return {c: cmap(i / max(1, len(cats) - 1)) for i, c in enumerate(cats)}


# ----------------------------------------------------------------------------- files


def save(ax_or_fig: Axes | Figure, path: str | Path, formats: Sequence[str] | None = None, *,
         dpi: int = 150) -> Path:
    """Write the figure of an Axes (or a Figure) to ``path``, once per format.

    Parameters
    ----------
    ax_or_fig : matplotlib.axes.Axes or matplotlib.figure.Figure
        What any function here returned, or a figure.
    path : str or pathlib.Path
        The file; parent folders are made. Written atomically (a temporary file beside it, then a
        rename): a failed write keeps the previous figure and leaves no partial file.
    formats : sequence of str, optional
        File formats (``"png"``, ``"svg"``, ``"pdf"`` ...): one file per format, ``path`` with that
        suffix. Default: the suffix of ``path`` (``png`` when it has none).
    dpi : int
        Resolution of raster formats.

    Returns
    -------
    pathlib.Path
        The file of the first format (the others lie beside it, same stem).

    Notes
    -----
    A figure made through pyplot (inside IPython) is closed afterwards, so that saving in a
    loop does not pile figures up; a bare ``Figure`` needs no closing.
    """
    from matplotlib.figure import Figure, SubFigure

    from driftlens.outputs import atomic_path, local

    fig = ax_or_fig if isinstance(ax_or_fig, (Figure, SubFigure)) else ax_or_fig.figure
    while isinstance(fig, SubFigure):           # a subfigure's root figure
        fig = fig.figure
    path = local(path, "path")
    if formats is None:
        formats = (path.suffix.lstrip(".").lower() or "png",)
    if isinstance(formats, str):
        formats = (formats,)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        with warnings.catch_warnings():      # a colorbar makes tight_layout say it changed the layout
            warnings.simplefilter("ignore", UserWarning)
            fig.tight_layout()
    out = []
    for fmt in formats:
        fmt = fmt.lstrip(".").lower()
        target = path if path.suffix.lstrip(".").lower() == fmt else path.with_suffix(f".{fmt}")
        with atomic_path(target) as tmp:          # a failed or killed write keeps the previous figure
            fig.savefig(tmp, dpi=dpi, format=fmt)
        out.append(target)
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)                        # a no-op for a figure pyplot does not manage
    return out[0]


def plot_report(report: xr.Dataset, out_dir: str | Path, formats: Sequence[str] = ("png",),
                schedule: RankSchedule | None = None, *, variables: Sequence[str] | None = None,
                sites: Sequence[str] | None = None) -> list[Path]:
    """Write every figure a drift report supports into ``out_dir``.

    Per distributional metric (``mmd``, ``sinkhorn``, ``sliced_w``, ``gauss_w2``) and ``paired_shift``
    present, per site and modality: ``{var}_heatmap_{site}_{modality}`` (:func:`drift_heatmap`) and
    ``{var}_by_layer_{site}_{modality}`` (:func:`drift_by_layer`) and, with contrasts,
    ``{var}_contrast_by_layer_{site}_{modality}`` (:func:`contrast_by_layer`); with merged checkpoints
    (a ``merge_alpha`` coordinate), ``mmd_vs_alpha_{site}_{modality}`` (:func:`drift_vs_alpha`); per site of ``gap``:
    ``gap_by_layer_{site}``; with ``mir``: ``mir_by_layer``; with a ``schedule``: ``rank_schedule``.
    A cell with no finite value is skipped with a warning.

    Parameters
    ----------
    report : xarray.Dataset
        A drift report.
    out_dir : str or pathlib.Path
        Folder (made when missing).
    formats : sequence of str
        One file per figure and format, e.g. ``("png", "svg")``.
    schedule : driftlens.RankSchedule, optional
        Also draw it beside its signal (:func:`rank_schedule`).
    variables, sites : sequence of str, optional
        Only the figures of these report variables (``mmd``, ``gap``, ``mir`` ...) and sites.

    Returns
    -------
    list of pathlib.Path
        Every file written, in the order above.

    Raises
    ------
    driftlens.errors.UsageError
        The report has none of the variables above, or ``variables`` / ``sites`` name one it lacks;
        or ``out_dir`` lies inside the report's activation store or a figure would replace the report
        (checked before anything is drawn).
    driftlens.errors.DataError
        The report has no checkpoint or no layer.
    """
    from driftlens.errors import DataError, UsageError
    from driftlens.outputs import check_output, local

    for dim in ("checkpoint", "layer"):
        if dim in report.dims and report.sizes[dim] == 0:
            raise DataError(f"the report has no {dim}: nothing to draw")
    out_dir = local(out_dir)
    inputs = [("drift report", report.encoding.get("source")), ("activation store", report.attrs.get("store_path"))]
    check_output(out_dir, inputs)
    formats = tuple(formats)
    if not formats:
        raise UsageError("no figure format given")
    figured = [m for m, spec in _METRICS.items() if spec.figures]        # what the registry says to draw
    drawable = [v for v in figured if v in report.data_vars]
    unknown = sorted(set(variables or ()) - set(drawable))
    if unknown:
        raise UsageError(f"no figure of variable(s) {unknown}: the report's drawable variables are {drawable}")
    have_sites = sorted({str(s) for s in report["site"].values}) if "site" in report.coords else []
    unknown = sorted(set(sites or ()) - set(have_sites))
    if unknown:
        raise UsageError(f"site(s) {unknown} are not in the report; it has {have_sites}")
    chosen = [v for v in drawable if variables is None or v in variables]

    def site_list(da):
        return [s for s in _have(da, "site") if sites is None or s in sites] if "site" in da.dims else [None]

    jobs = []      # (stem, callable returning an Axes)
    for var in _with_figure("cell"):
        if var not in chosen:
            continue
        da = report[var]
        for site in site_list(da):
            for mod in (_have(da, "modality") if "modality" in da.dims else [None]):
                suffix = "".join(f"_{s}" for s in (site, mod) if s is not None)
                jobs.append((f"{var}_heatmap{suffix}",
                             lambda v=var, s=site, m=mod: drift_heatmap(report, v, site=s, modality=m)))
                jobs.append((f"{var}_by_layer{suffix}",
                             lambda v=var, s=site, m=mod: drift_by_layer(report, v, site=s, modality=m)))
        if f"{var}_contrast" in report.data_vars:
            for site in site_list(da):
                for mod in (_have(da, "modality") if "modality" in da.dims else [None]):
                    suffix = "".join(f"_{s}" for s in (site, mod) if s is not None)
                    jobs.append((f"{var}_contrast_by_layer{suffix}",
                                 lambda v=var, s=site, m=mod: contrast_by_layer(report, v, site=s, modality=m)))
    if "merge_alpha" in report.coords and np.isfinite(report["merge_alpha"].values).any():
        for var in _with_figure("vs_alpha"):
            if var not in chosen:
                continue
            for site in site_list(report[var]):
                for mod in _have(report[var], "modality"):
                    jobs.append((f"{var}_vs_alpha_{site}_{mod}",
                                 lambda v=var, s=site, m=mod: drift_vs_alpha(report, v, site=s, modality=m)))
    for var in _with_figure("gap_lines"):
        if var not in chosen:
            continue
        for site in site_list(report[var]):
            jobs.append((f"{var}_by_layer{f'_{site}' if site else ''}",
                         lambda s=site: modality_gap_by_layer(report, site=s)))
    for var in _with_figure("mir_lines"):
        if var in chosen:
            jobs.append((f"{var}_by_layer", lambda: mir_by_layer(report)))
    if schedule is not None:
        jobs.append(("rank_schedule", lambda: rank_schedule(schedule, report)))
    if not jobs:
        raise UsageError(f"the report has nothing to draw: none of {tuple(figured)} "
                         f"(it has {sorted(map(str, report.data_vars))})")
    for stem, _ in jobs:          # a figure's file name may not be an input's (a report named like a figure)
        for f in formats:
            check_output(out_dir / f"{stem}.{f.lstrip('.').lower()}", inputs)
    written = []
    for stem, draw in jobs:
        try:
            ax = draw()
        except UsageError as exc:
            if "no finite value" not in str(exc):
                raise
            warnings.warn(f"{stem}: {exc}; skipped", stacklevel=2)
            continue
        first = save(ax, out_dir / f"{stem}.{formats[0]}", formats)
        written += [first.with_suffix(f".{f.lstrip('.').lower()}") for f in formats]
    return written
