"""An interactive explorer of a drift report (and its store) for Jupyter.

:func:`explore` returns an :class:`Explorer`. In a live Jupyter kernel it is a widget with two parts:

- the **report view**, drawn in the browser by the same viewer as the HTML report page
  (:mod:`driftlens.htmlreport`; an anywidget whose state Python and the page share): the checkpoint x
  layer heatmap (hover a cell for its values, click to select it), the per-layer curves with the
  selected checkpoint highlighted and its band, a **readout** of the selected cell (effect, interval,
  p, q, clusters; with runs and contrasts the across-run values) and the contrasts; metric, site and
  modality controls, the ones that do not apply disabled (modality for gap and MIR). Every change is
  drawn in the browser at once: it never shows a figure of an earlier state;
- with a store, the **token map** of the selected layer at the reference and the selected
  checkpoint. A map costs a UMAP fit (the first one of a process also compiles numba code, tens of
  seconds), so it is computed in a background thread: while it runs the panel says so (busy), a
  request superseded by a newer selection is dropped unseen, and each layer's map is computed once.

Outside a live kernel (a script, a static notebook render) and without anywidget, the explorer is
a static matplotlib figure of the same panels (``Explorer.figure()``, the readout in its title);
in a kernel without anywidget the HTML page is shown instead (everything but the token map stays
interactive). ``Explorer.html()`` is that page as a string.

Example::

    ex = dl.explore(report, store)      # the last expression of a cell: the widget
    ex.set(checkpoint="ko-5", layer=2)  # or from code (the page follows)
    ex.readout()                        # the selected cell's values, as a dict
    fig = ex.figure()                   # a static Figure of the current state
"""
from __future__ import annotations

import textwrap
import threading
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from driftlens._version import install_hint
from driftlens.errors import EnvironmentProblem, UsageError
from driftlens.htmlreport import METRICS, initial_state, page_data, report_html

if TYPE_CHECKING:
    import xarray as xr
    from matplotlib.figure import Figure

__all__ = ["METRICS", "Explorer", "LatestOnly", "State", "explore"]

_FRAME = "#D55E00"


@dataclass(frozen=True)
class State:
    """What the explorer shows: a report variable at one site / modality, one checkpoint and layer."""

    metric: str
    site: str
    modality: str
    checkpoint: str
    layer: int


class LatestOnly:
    """Run requests in one background thread, newest first: a request superseded before or while it
    runs is dropped, so what is published is always the latest request's result.

    Parameters
    ----------
    compute : callable
        ``compute(key) -> result`` (runs in the worker thread).
    publish : callable
        ``publish(key, result)``: called only for a request that is still the newest when it finishes.
    busy : callable, optional
        ``busy(key or None)``: the request now pending (``None`` once the newest one is published or
        failed).

    Attributes
    ----------
    dropped : int
        Requests whose result was never published because a newer one came.
    """

    def __init__(self, compute, publish, busy=None):
        from concurrent.futures import ThreadPoolExecutor

        self._compute, self._publish, self._busy = compute, publish, busy or (lambda key: None)
        self._lock = threading.Lock()
        self._generation = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftlens-explore")
        self.dropped = 0
        self.error: BaseException | None = None

    def request(self, key):
        """Ask for ``key``'s result; returns a future of the request (None when dropped)."""
        with self._lock:
            self._generation += 1
            generation = self._generation
        self._busy(key)
        return self._pool.submit(self._run, generation, key)

    def _latest(self, generation: int) -> bool:
        with self._lock:
            return generation == self._generation

    def _run(self, generation: int, key):
        if not self._latest(generation):                 # superseded while queued: never computed
            self.dropped += 1
            return None
        try:
            result = self._compute(key)
        except BaseException as exc:                     # noqa: BLE001 - shown in the panel, not lost
            self.error = exc
            if self._latest(generation):
                self._busy(None)
                self._publish(key, exc)
            return None
        if not self._latest(generation):                 # superseded while computing: not shown
            self.dropped += 1
            return None
        self._publish(key, result)
        self._busy(None)
        return result

    def wait(self) -> None:
        """Block until every request submitted so far has finished (for tests and scripts)."""
        self._pool.submit(lambda: None).result()


_VIEW_CLASS = None


def _view_class():
    """The anywidget class of the report view (made on first use; needs anywidget)."""
    global _VIEW_CLASS
    if _VIEW_CLASS is None:
        import anywidget
        import traitlets

        from driftlens.htmlreport import asset

        class ReportView(anywidget.AnyWidget):
            """The report viewer of :mod:`driftlens.htmlreport` as a Jupyter widget (``state`` is shared)."""

            _esm = asset("explorer.js")
            _css = asset("explorer.css")
            data = traitlets.Dict().tag(sync=True)
            state = traitlets.Dict().tag(sync=True)

        _VIEW_CLASS = ReportView
    return _VIEW_CLASS


class Explorer:
    """The explorer's state, readout, static figure, page and (in a live kernel) its widget.

    Parameters
    ----------
    report : xarray.Dataset
        A drift report (:func:`driftlens.drift`), with or without runs and contrasts.
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
        try:
            self.data = page_data(report)
        except UsageError as exc:
            raise UsageError(f"{exc}: nothing to explore") from None
        self.metrics = list(self.data["metrics"])
        self.checkpoints, self.layers = self.data["checkpoints"], self.data["layers"]
        self.sites = self.data["sites"] or ["hidden"]
        self.modalities = self.data["modalities"] or ["visual"]
        self.reference = self.data["reference"]          # driftlens.select.reference_of's rule
        self.state = State(**initial_state(self.data, metric=metric, site=site, modality=modality,
                                           checkpoint=checkpoint, layer=layer))
        self._maps: dict = {}             # (site, layer) -> token map Dataset
        self._maps_lock = threading.Lock()
        self._building: dict = {}         # (site, layer) -> lock held while that map is computed
        self._view = None
        self._widget = None
        self._map_image = self._map_status = None
        self._map_shown: tuple | None = None
        self._map_queue: LatestOnly | None = None
        self.last_figure: Figure | None = None

    # ------------------------------------------------------------------------------- state
    def _check(self, s: State) -> None:
        initial_state(self.data, **asdict(s))            # raises UsageError naming what the report has

    def set(self, **changes) -> Explorer:
        """Change the state (``metric``, ``site``, ``modality``, ``checkpoint``, ``layer``); the view follows."""
        unknown = sorted(set(changes) - set(State.__dataclass_fields__))
        if unknown:
            raise UsageError(f"unknown explorer setting(s) {unknown}; use {list(State.__dataclass_fields__)}")
        new = replace(self.state, **changes)
        self._check(new)
        self._apply(new)
        return self

    def _apply(self, new: State) -> None:
        self.state = new
        if self._view is not None and dict(self._view.state) != asdict(new):
            self._view.state = asdict(new)
        if self._widget is not None and self.store is not None:
            self._request_map()

    def applicable(self) -> dict[str, bool]:
        """Which controls apply to the current metric: ``{"site": ..., "modality": ...}`` (gap has no
        modality; MIR neither a site nor a modality)."""
        meta = self.data["metrics"][self.state.metric]
        return {"site": meta["has_site"] and len(self.sites) > 1,
                "modality": meta["has_modality"] and len(self.modalities) > 1}

    def readout(self) -> dict:
        """The selected cell's values, read from the report.

        Returns
        -------
        dict
            ``metric``, ``checkpoint``, ``layer``, ``site`` / ``modality`` (where the metric has them),
            ``effect``, ``lo``, ``hi``, ``p``, ``q``, ``pmin`` (those the report has), ``level``,
            ``covers`` (``"probe sampling"`` or ``"runs, then clusters"``), ``n_clusters``,
            ``decimals`` (the metric's fixed precision); with runs ``sd`` and ``runs`` ({run: {effect,
            lo, hi}}), the values being the mean over runs and the across-run interval; with contrasts
            of the metric ``contrasts`` ({label: {effect, lo, hi, p[, needed]}} at the selected layer,
            across runs when the report has runs).
        """
        s, rep = self.state, self.report
        meta = self.data["metrics"][s.metric]
        runs = bool(self.data["runs"])
        where = {k: v for k, v in (("site", s.site), ("modality", s.modality)) if meta[f"has_{k}"]}
        cell = {"checkpoint": s.checkpoint, "layer": s.layer, **where}
        name = f"{s.metric}_runs" if runs else s.metric
        out = {"metric": s.metric, **cell, "level": self.data["level"],
               "covers": "runs, then clusters" if runs else "probe sampling", "decimals": meta["decimals"]}
        for key, suffix in (("effect", ""), ("lo", "_lo"), ("hi", "_hi"), ("sd", "_sd"), ("p", "_p"), ("q", "_q"),
                            ("pmin", "_pmin")):
            var = name + suffix
            if var in rep.data_vars:
                out[key] = float(rep[var].sel({k: v for k, v in cell.items() if k in rep[var].dims}))
        mod = s.modality if meta["has_modality"] else ""
        out["n_clusters"] = self.data["n_clusters"].get(mod, self.data["n_clusters"][""])
        if runs:
            out["runs"] = {str(r): {k: float(rep[f"{s.metric}{suf}"].sel(run=r, **{kk: v for kk, v in cell.items()
                                                                                   if kk in rep[s.metric].dims}))
                                    for k, suf in (("effect", ""), ("lo", "_lo"), ("hi", "_hi"))
                                    if f"{s.metric}{suf}" in rep.data_vars}
                           for r in self.data["runs"]}
        con = f"{s.metric}_contrast" + ("_runs" if runs else "")
        if s.metric in self.data["contrasts"] and con in rep.data_vars:
            sel = {"layer": s.layer, **where}
            out["contrasts"] = {
                str(label): {k: float(rep[con + suf].sel(contrast=label, **sel))
                             for k, suf in (("effect", ""), ("lo", "_lo"), ("hi", "_hi"), ("p", "_p"),
                                            ("needed", "_needed")) if con + suf in rep.data_vars}
                for label in self.data["contrasts"][s.metric]["labels"]}
        return out

    def readout_text(self) -> str:
        """:meth:`readout` in one line, at the metric's fixed precision."""
        r, d = self.readout(), self.readout()["decimals"]
        text = f"{r['checkpoint']}, layer {r['layer']}: {r.get('effect', float('nan')):.{d}f}"
        if "lo" in r:
            text += f" [{r['lo']:.{d}f}, {r['hi']:.{d}f}] ({r['level']:.0%}, {r['covers']})"
        for key in ("p", "q", "pmin"):
            if key in r:
                text += f", {key} {r[key]:.3g}"
        if r.get("n_clusters") is not None:
            text += f", {r['n_clusters']} clusters"
        return text

    # ------------------------------------------------------------------------------- figure
    def _token_map(self, site: str, layer: int):
        key = (site, layer)
        with self._maps_lock:
            if key in self._maps:
                return self._maps[key]
            building = self._building.setdefault(key, threading.Lock())
        from driftlens.tokenmap import token_map_data

        with building:                    # a second caller of the same map waits for the first's result
            with self._maps_lock:
                if key in self._maps:
                    return self._maps[key]
            data = token_map_data(self.store, layer, site=site, checkpoints=self.checkpoints,
                                  max_tokens=self.max_tokens, reference=self.reference)
            with self._maps_lock:
                self._maps[key] = data
        return data

    def _draw_map(self, fig, cells, site: str, layer: int, checkpoint: str) -> None:
        from driftlens.plot import token_map

        pair = [self.reference] + ([checkpoint] if checkpoint != self.reference else [])
        axes = [fig.add_subplot(c) for c in cells][: len(pair)]
        data = self._token_map(site, layer)
        token_map(data, color="modality", checkpoints=pair, ax=axes, title="")
        axes[-1].annotate(f"token map of layer {layer} (UMAP of {pair[0]!r}, others placed in it): "
                          f"{data.attrs['n_tokens']} tokens, {data.attrs['n_clusters']} clusters", (1.0, -0.12),
                          xycoords="axes fraction", ha="right", va="top", fontsize=7)

    def figure(self, *, token_map: bool = True) -> Figure:
        """A static figure of the current state: heatmap, per-layer curves (and the token map).

        The selected cell is framed, its checkpoint's line highlighted with its band (the others
        thin), its layer marked; the title carries the readout (:meth:`readout_text`).
        """
        from matplotlib.figure import Figure

        from driftlens import plot

        s = self.state
        with_map = self.store is not None and token_map
        width, ratios = (15.0 if with_map else 10.5), [1.0, 1.3] + ([0.9, 0.9] if with_map else [])
        fig = Figure(figsize=(width, 5.0), layout="constrained")
        grid = fig.add_gridspec(1, len(ratios), width_ratios=ratios)
        heat, lines = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
        kw = {"site": s.site, "modality": s.modality}
        plot.drift_heatmap(self.report, s.metric, ax=heat, annotate=len(self.layers) <= 12, **kw)
        self._frame_cell(heat)
        plot.drift_by_layer(self.report, s.metric, ax=lines, highlight=[s.checkpoint], **kw)
        self._emphasise(lines)
        _wrap_title(lines, 0.8 * width * ratios[1] / sum(ratios))     # the panel less its legend
        if with_map:
            self._draw_map(fig, [grid[2], grid[3]], s.site, s.layer, s.checkpoint)
        meta = self.data["metrics"][s.metric]
        where = ", ".join(v for k, v in (("site", s.site), ("modality", s.modality)) if meta[f"has_{k}"])
        fig.suptitle(f"{s.metric}" + (f" at {where}" if where else "") + f" -- selected {self.readout_text()}",
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

    def html(self, title: str | None = None) -> str:
        """The report page of the current state (:func:`driftlens.htmlreport.report_html`)."""
        return report_html(self.report, title, **asdict(self.state))

    # ------------------------------------------------------------------------------- widget
    def widget(self):
        """The live widget: the report view and, with a store, the token-map panel (needs anywidget)."""
        if self._widget is not None:
            return self._widget
        try:
            import ipywidgets as w

            view_cls = _view_class()
        except ImportError as exc:
            raise EnvironmentProblem(f"the explorer's widget needs anywidget and ipywidgets ({exc}; "
                                     f"{install_hint('notebooks')}); Explorer.html() and Explorer.figure() draw "
                                     f"the same panels without them") from exc
        self._view = view_cls(data=self.data, state=asdict(self.state))
        self._view.observe(self._on_view_state, names="state")
        parts = [self._view]
        if self.store is not None:
            self._map_status = w.HTML(value="")
            self._map_image = w.Image(format="png", layout=w.Layout(max_width="100%"))
            self._map_queue = LatestOnly(self._map_png, self._show_map, self._map_busy)
            parts.append(w.VBox([self._map_status, self._map_image]))
        self._widget = w.VBox(parts)
        if self.store is not None:
            self._request_map()
        return self._widget

    def _on_view_state(self, change) -> None:
        """A click or control in the page: validate and adopt its state."""
        try:
            new = State(**{**asdict(self.state), **dict(change["new"])})
            self._check(new)
        except (TypeError, UsageError):
            self._view.state = asdict(self.state)       # an impossible state from the page: put ours back
            return
        if new != self.state:
            self._apply(new)

    def _map_key(self) -> tuple:
        s = self.state
        return (s.site, s.layer, s.checkpoint)

    def _request_map(self) -> None:
        if self._map_queue is not None and self._map_key() != self._map_shown:
            self._map_queue.request(self._map_key())

    def _map_busy(self, key) -> None:
        if self._map_status is None:
            return
        if key is None:
            self._map_status.value = ""
            return
        site, layer, ck = key
        first = (site, layer) not in self._maps
        self._map_status.value = (f"<span class='dl-busy'>computing the token map of layer {layer} ({site}, {ck})"
                                  + (" -- a UMAP fit; the first of a session also compiles numba code, tens of "
                                     "seconds" if first else "") + "; the map below is the previous one</span>")

    def _map_png(self, key) -> bytes:
        import io

        from matplotlib.figure import Figure

        site, layer, ck = key
        fig = Figure(figsize=(7.6, 3.6), layout="constrained")
        grid = fig.add_gridspec(1, 2)
        self._draw_map(fig, [grid[0], grid[1]], site, layer, ck)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        return buf.getvalue()

    def _show_map(self, key, result) -> None:
        if isinstance(result, BaseException):
            self._map_status.value = f"token map of layer {key[1]} failed: {type(result).__name__}: {result}"
            return
        self._map_image.value = result
        self._map_shown = key

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        if _live_kernel():
            try:
                display(self._bundle(), raw=True)
                return
            except EnvironmentProblem:
                import html as _html

                display(HTML(f'<iframe srcdoc="{_html.escape(self.html())}" style="width:100%;height:820px;'
                             f'border:0"></iframe>'))
                if self.store is not None:
                    display(self._static_map())
                return
        display(self.figure())

    def _bundle(self) -> dict:
        """The widget's display data plus a PNG of the static figure (without the token map): JupyterLab
        shows the live widget; a saved notebook rendered where widgets do not run (GitHub) shows the
        picture instead of ``VBox(children=...)``."""
        import base64
        import io

        bundle = dict(self.widget()._repr_mimebundle_())
        buf = io.BytesIO()
        self.figure(token_map=False).savefig(buf, format="png", dpi=100)
        bundle["image/png"] = base64.b64encode(buf.getvalue()).decode("ascii")
        bundle["text/plain"] = f"{self!r} (the live explorer: run the notebook to use it)"
        return bundle

    def _static_map(self):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.6, 3.6), layout="constrained")
        grid = fig.add_gridspec(1, 2)
        s = self.state
        self._draw_map(fig, [grid[0], grid[1]], s.site, s.layer, s.checkpoint)
        return fig

    def __repr__(self) -> str:
        return f"Explorer({self.state}, store={'yes' if self.store is not None else 'no'})"


def _wrap_title(ax, width_in: float, fontsize: float = 8.0) -> None:
    """Wrap ``ax``'s title to about ``width_in`` inches, so it runs neither past the figure's edge nor
    over a neighbouring panel's title (a line of about 0.55 ``fontsize`` points per character)."""
    chars = max(20, int(width_in * 72 / (0.55 * fontsize)))
    ax.set_title("\n".join(textwrap.fill(line, chars) for line in ax.get_title().split("\n")), fontsize=fontsize)


def _live_kernel() -> bool:
    """A Jupyter kernel that can talk to widgets (not a plain IPython shell, not a script)."""
    import sys

    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def explore(report: xr.Dataset, store: xr.Dataset | None = None, **state) -> Explorer:
    """An :class:`Explorer` of ``report`` (and ``store`` for the token map); see the module docstring."""
    return Explorer(report, store, **state)

