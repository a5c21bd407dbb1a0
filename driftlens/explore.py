"""An interactive explorer of a drift report (and its store) for Jupyter.

:func:`explore` returns an :class:`Explorer`. In a live Jupyter kernel with ipywidgets it shows
checkpoint and layer sliders, metric and modality selectors and a site toggle above three
panels -- the checkpoint x layer heatmap (the selected cell framed), the per-layer lines (the
selected checkpoint emphasised, the selected layer marked) and, when a store is given, the token
map of the selected layer at the reference and the selected checkpoint -- redrawn in place on
every change. Anywhere else (a script, a static notebook render, ipywidgets missing) it is a
static matplotlib figure of the same panels for its current state: ``Explorer.figure()``.

Token maps cost a UMAP fit per layer (the first one of a process also compiles numba code, tens of
seconds); the explorer computes a layer's map once, for every checkpoint, and keeps it.

Example::

    ex = dl.explore(report, store)      # the last expression of a cell: the widget
    ex.set(checkpoint="ko-5", layer=2)  # or from code
    fig = ex.figure()                   # a static Figure of the current state
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from driftlens._version import install_hint
from driftlens.errors import UsageError

if TYPE_CHECKING:
    import xarray as xr
    from matplotlib.figure import Figure

#: report variables the explorer offers, in this order, where the report has them
METRICS = ("mmd", "sinkhorn", "sliced_w", "gauss_w2", "paired_shift", "gap", "mir")
_FRAME = "#D55E00"


@dataclass(frozen=True)
class State:
    """What the explorer shows: a report variable at one site / modality, one checkpoint and layer."""

    metric: str
    site: str
    modality: str
    checkpoint: str
    layer: int


def _labels(report, dim: str) -> list:
    return [v.item() if hasattr(v, "item") else v for v in report[dim].values] if dim in report.coords else []


class Explorer:
    """The explorer's state, its static figure and (in a live kernel) its widget.

    Parameters
    ----------
    report : xarray.Dataset
        A drift report (:func:`driftlens.drift`).
    store : xarray.Dataset, optional
        The activation store it was computed from (:func:`driftlens.open_store`): adds the token map.
    metric, site, modality, checkpoint, layer
        The initial state; defaults: ``mmd`` (else the first of :data:`METRICS` present), the first
        site and modality, the last checkpoint, the first layer.
    max_tokens : int
        Token-map sample size per checkpoint (whole clusters; see :func:`driftlens.tokenmap.token_map_data`).
    """

    def __init__(self, report: xr.Dataset, store: xr.Dataset | None = None, *, metric: str | None = None,
                 site: str | None = None, modality: str | None = None, checkpoint: str | None = None,
                 layer: int | None = None, max_tokens: int = 1500):
        self.report, self.store, self.max_tokens = report, store, max_tokens
        self.metrics = [m for m in METRICS if m in report.data_vars]
        if not self.metrics:
            raise UsageError(f"the report has none of {METRICS}: nothing to explore")
        self.checkpoints = [str(c) for c in _labels(report, "checkpoint")]
        self.layers = [int(v) for v in _labels(report, "layer")]
        self.sites = [str(s) for s in _labels(report, "site")] or ["hidden"]
        self.modalities = [str(m) for m in _labels(report, "modality")] or ["visual"]
        if not self.checkpoints or not self.layers:
            raise UsageError("the report has no checkpoint or no layer: nothing to explore")
        self.reference = str(report.attrs.get("reference", self.checkpoints[0]))
        self.state = State(metric or ("mmd" if "mmd" in self.metrics else self.metrics[0]), site or self.sites[0],
                           modality or self.modalities[0], checkpoint or self.checkpoints[-1],
                           self.layers[0] if layer is None else int(layer))
        self._check(self.state)
        self._maps: dict = {}             # (site, layer) -> token map Dataset
        self._widget = None
        self._output = None
        self.last_figure: Figure | None = None

    # ------------------------------------------------------------------------------- state
    def _check(self, s: State) -> None:
        for name, value, allowed in (("metric", s.metric, self.metrics), ("site", s.site, self.sites),
                                     ("modality", s.modality, self.modalities),
                                     ("checkpoint", s.checkpoint, self.checkpoints), ("layer", s.layer, self.layers)):
            if value not in allowed:
                raise UsageError(f"{name} {value!r} is not in the report; choose from {allowed}")

    def set(self, **changes) -> Explorer:
        """Change the state (``metric``, ``site``, ``modality``, ``checkpoint``, ``layer``) and redraw."""
        unknown = sorted(set(changes) - set(State.__dataclass_fields__))
        if unknown:
            raise UsageError(f"unknown explorer setting(s) {unknown}; use {list(State.__dataclass_fields__)}")
        new = replace(self.state, **changes)
        self._check(new)
        self.state = new
        if self._widget is not None:
            self._sync_controls()
            self._redraw()
        return self

    # ------------------------------------------------------------------------------- figure
    def _token_map(self):
        key = (self.state.site, self.state.layer)
        if key not in self._maps:
            from driftlens.tokenmap import token_map_data

            self._maps[key] = token_map_data(self.store, self.state.layer, site=self.state.site,
                                             checkpoints=self.checkpoints, max_tokens=self.max_tokens,
                                             reference=self.reference)
        return self._maps[key]

    def figure(self) -> Figure:
        """A static figure of the current state: heatmap, per-layer lines (and the token map)."""
        from matplotlib.figure import Figure

        from driftlens import plot

        s = self.state
        with_map = self.store is not None
        fig = Figure(figsize=(15.0 if with_map else 10.5, 5.0), layout="constrained")
        grid = fig.add_gridspec(1, 4 if with_map else 2, width_ratios=[1.0, 1.3] + ([0.9, 0.9] if with_map else []))
        heat, lines = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
        kw = {"site": s.site, "modality": s.modality}
        plot.drift_heatmap(self.report, s.metric, ax=heat, annotate=len(self.layers) <= 12, **kw)
        self._frame_cell(heat)
        plot.drift_by_layer(self.report, s.metric, ax=lines, **kw)
        self._emphasise(lines)
        if with_map:
            from driftlens.tokenmap import plot_token_map

            pair = [self.reference] + ([s.checkpoint] if s.checkpoint != self.reference else [])
            axes = [fig.add_subplot(grid[2]), fig.add_subplot(grid[3])][: len(pair)]
            data = self._token_map()
            plot_token_map(data, color="modality", checkpoints=pair, ax=axes, title="")
            axes[-1].annotate(f"token map (UMAP of {pair[0]!r}, others placed in it): {data.attrs['n_tokens']} tokens, "
                              f"{data.attrs['n_clusters']} clusters", (1.0, -0.12), xycoords="axes fraction",
                              ha="right", va="top", fontsize=7)
        fig.suptitle(f"{s.metric} at {s.site}" + (f", {s.modality}" if "modality" in self.report[s.metric].dims
                                                    else "") + f": checkpoint {s.checkpoint}, layer {s.layer}",
                     fontsize=10)
        self.last_figure = fig
        return fig

    def _frame_cell(self, ax) -> None:
        from matplotlib.patches import Rectangle

        i, j = self.checkpoints.index(self.state.checkpoint), self.layers.index(self.state.layer)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=_FRAME, lw=2.5, zorder=5,
                               label="selected"))

    def _emphasise(self, ax) -> None:
        for line in ax.get_lines():
            if line.get_label() == self.state.checkpoint:
                line.set_linewidth(3.0)
                line.set_zorder(4)
        ax.axvline(self.state.layer, color=_FRAME, lw=1.2, ls=":", zorder=1, label="_selected layer")

    # ------------------------------------------------------------------------------- widget
    def widget(self):
        """The ipywidgets control panel with its figure output (needs ipywidgets)."""
        try:
            import ipywidgets as w
        except ImportError as exc:                           # pragma: no cover - the notebooks extra has it
            from driftlens.errors import EnvironmentProblem

            raise EnvironmentProblem(f"the explorer's widget needs ipywidgets ({install_hint('notebooks')}); "
                                     "Explorer.figure() draws the same panels statically") from exc
        if self._widget is not None:
            return self._widget
        s = self.state
        self._controls = {
            "checkpoint": w.SelectionSlider(options=self.checkpoints, value=s.checkpoint, description="checkpoint",
                                            continuous_update=False),
            "layer": w.SelectionSlider(options=self.layers, value=s.layer, description="layer",
                                       continuous_update=False),
            "metric": w.Dropdown(options=self.metrics, value=s.metric, description="metric"),
            "modality": w.Dropdown(options=self.modalities, value=s.modality, description="modality"),
            "site": w.ToggleButtons(options=self.sites, value=s.site, description="site"),
        }
        for name, control in self._controls.items():
            control.observe(lambda change, name=name: self._on_change(name, change["new"]), names="value")
        self._output = w.Output()
        self._widget = w.VBox([w.HBox([self._controls["checkpoint"], self._controls["layer"]]),
                               w.HBox([self._controls["metric"], self._controls["modality"], self._controls["site"]]),
                               self._output])
        self._redraw()
        return self._widget

    def _on_change(self, name: str, value) -> None:
        if getattr(self.state, name) != value:
            self.set(**{name: value})

    def _sync_controls(self) -> None:
        for name, control in self._controls.items():
            if control.value != getattr(self.state, name):
                control.value = getattr(self.state, name)

    def _redraw(self) -> None:
        from IPython.display import display

        fig = self.figure()
        with self._output:
            self._output.clear_output(wait=True)
            display(fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if _live_kernel():
            try:
                display(self.widget())
                return
            except ImportError:                              # pragma: no cover
                pass
        display(self.figure())

    def __repr__(self) -> str:
        return f"Explorer({self.state}, store={'yes' if self.store is not None else 'no'})"


def _live_kernel() -> bool:
    """A Jupyter kernel that can talk to widgets (not a plain IPython shell, not a script)."""
    import sys

    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def explore(report: xr.Dataset, store: xr.Dataset | None = None, **state) -> Explorer:
    """An :class:`Explorer` of ``report`` (and ``store`` for the token map); see the module docstring."""
    return Explorer(report, store, **state)
