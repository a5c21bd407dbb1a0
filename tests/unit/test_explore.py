"""The explorer (driftlens.explore), headless: state, readout, stale-update suppression, the static
figure, the widget's shared state. What the browser draws is tested on the HTML page
(tests/unit/test_htmlreport.py): the widget runs the same viewer."""
from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
from matplotlib.patches import Rectangle

import driftlens as dl
from driftlens.errors import UsageError
from driftlens.explore import Explorer, LatestOnly, _live_kernel, explore
from driftlens.testing import make_report

CKPTS = ("base", "ko-1", "ko-2", "en-1")


def suptitle(fig) -> str:
    """The figure's suptitle (``Figure.get_suptitle`` only exists from matplotlib 3.8; the floor is 3.7)."""
    return fig._suptitle.get_text() if fig._suptitle is not None else ""


@pytest.fixture
def rep():
    return make_report(n_layers=4, checkpoints=CKPTS, seed=1)


@pytest.fixture(scope="module")
def runs_report(tmp_path_factory):
    """Three runs of one design, with a contrast: the across-run values the readout must show."""
    from driftlens.testing import make_store

    d = tmp_path_factory.mktemp("runs")
    paths = {f"seed-{s}": make_store(d / f"s{s}.zarr", n_clusters=12, dim=8, seed=s) for s in range(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dl.drift(paths, reference="base", metrics=("mmd", "gap", "mir"), n_permutations=50, n_bootstrap=50,
                        progress=False, contrasts=[("shifted", "same")], sites=("hidden",))


def framed(fig):
    heat = fig.axes[0]
    rects = [p for p in heat.patches if isinstance(p, Rectangle) and p.get_label() == "selected"]
    assert len(rects) == 1
    x, y = rects[0].get_xy()
    return round(y + 0.5), round(x + 0.5)                 # (checkpoint row, layer column)


def test_static_figure_frames_the_selected_cell_and_emphasises_its_line(rep):
    ex = explore(rep, checkpoint="ko-1", layer=2)
    fig = ex.figure()
    assert framed(fig) == (CKPTS.index("ko-1"), 2)
    lines = fig.axes[1]
    widths = {line.get_label(): line.get_linewidth() for line in lines.get_lines()}
    assert widths["ko-1"] == 3.0 and all(w < 3.0 for k, w in widths.items() if k in CKPTS and k != "ko-1")
    assert "ko-1, layer 2" in suptitle(fig) and ex.readout_text() in suptitle(fig)
    assert ex.last_figure is fig
    bands = [c for c in lines.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
    assert len(bands) == 1                                # only the selected checkpoint has its band


def test_set_moves_the_state_and_refuses_what_the_report_lacks(rep):
    ex = explore(rep)
    assert ex.state.checkpoint == CKPTS[-1] and ex.state.metric == "mmd"
    ex.set(checkpoint="ko-2", layer=3, modality="text", metric="gap")
    assert framed(ex.figure()) == (CKPTS.index("ko-2"), 3)
    with pytest.raises(UsageError, match="checkpoint 'ko-9' is not in the report"):
        ex.set(checkpoint="ko-9")
    with pytest.raises(UsageError, match="unknown explorer setting"):
        ex.set(colour="red")
    assert ex.state.checkpoint == "ko-2"                   # a refused change changes nothing
    ex.set(metric="mmd", checkpoint="base")               # the reference: its zero row has no line
    assert framed(ex.figure()) == (0, 3)


def test_readout_of_the_selected_cell_is_the_reports_values(rep):
    ex = explore(rep, checkpoint="ko-2", layer=1, site="key", modality="text")
    r = ex.readout()
    cell = dict(checkpoint="ko-2", layer=1, site="key", modality="text")
    for key, var in (("effect", "mmd"), ("lo", "mmd_lo"), ("hi", "mmd_hi"), ("p", "mmd_p"), ("q", "mmd_q")):
        assert r[key] == float(rep[var].sel(cell))
    assert r["covers"] == "probe sampling" and "runs" not in r and "contrasts" not in r
    d = r["decimals"]
    assert f"{r['effect']:.{d}f} [{r['lo']:.{d}f}, {r['hi']:.{d}f}]" in ex.readout_text()
    ex.set(metric="mir")                                  # no site, no modality: their controls do not apply
    assert ex.applicable() == {"site": False, "modality": False}
    assert ex.readout()["effect"] == float(rep["mir"].sel(checkpoint="ko-2", layer=1))
    ex.set(metric="gap")
    assert ex.applicable() == {"site": True, "modality": False}
    ex.set(metric="mmd")
    assert ex.applicable() == {"site": True, "modality": True}


@pytest.mark.heavy
def test_readout_with_runs_shows_the_across_run_values_and_the_contrasts(runs_report):
    rep = runs_report
    ex = explore(rep, checkpoint="shifted", layer=1)
    r = ex.readout()
    cell = dict(checkpoint="shifted", layer=1, site="hidden", modality="visual")
    assert r["covers"] == "runs, then clusters"
    for key, var in (("effect", "mmd_runs"), ("lo", "mmd_runs_lo"), ("hi", "mmd_runs_hi"), ("sd", "mmd_runs_sd")):
        assert r[key] == float(rep[var].sel(cell))
    assert list(r["runs"]) == ["seed-0", "seed-1", "seed-2"]
    assert r["runs"]["seed-1"]["effect"] == float(rep["mmd"].sel(cell).sel(run="seed-1"))
    con = r["contrasts"]["shifted - same"]
    sel = dict(contrast="shifted - same", layer=1, site="hidden", modality="visual")
    assert con["effect"] == float(rep["mmd_contrast_runs"].sel(sel))
    assert (con["lo"], con["hi"], con["p"]) == tuple(float(rep[f"mmd_contrast_runs_{k}"].sel(sel))
                                                     for k in ("lo", "hi", "p"))


def test_latest_only_drops_stale_requests():
    """Three requests while the first computes: the first's result and the second are dropped; only the
    newest is published, and the busy state lasts until it is."""
    gate, started = threading.Event(), threading.Event()
    published, busy, computed = [], [], []

    def compute(key):
        computed.append(key)
        started.set()
        gate.wait(5)
        return f"result {key}"

    queue = LatestOnly(compute, lambda key, res: published.append(res), busy.append)
    queue.request(1)
    started.wait(5)                                       # 1 is computing
    queue.request(2)
    queue.request(3)
    assert busy[-1] == 3 and published == []
    gate.set()
    queue.wait()
    assert published == ["result 3"]                      # never a stale result
    assert computed == [1, 3]                             # 2 was superseded before it started
    assert queue.dropped == 2 and busy[-1] is None


def test_the_widget_shares_its_state_with_the_page(rep):
    pytest.importorskip("anywidget")
    ex = explore(rep, checkpoint="ko-1", layer=0)
    box = ex.widget()
    assert ex.widget() is box                             # one widget per explorer
    view = ex._view
    assert view.data["checkpoints"] == list(CKPTS) and view.state["checkpoint"] == "ko-1"
    view.state = {**view.state, "checkpoint": "en-1", "layer": 3}      # what a click on a cell does
    assert (ex.state.checkpoint, ex.state.layer) == ("en-1", 3)
    ex.set(checkpoint="ko-2", metric="gap")               # from code: the page follows
    assert view.state["checkpoint"] == "ko-2" and view.state["metric"] == "gap"
    view.state = {**view.state, "checkpoint": "nope"}     # an impossible state from the page is put back
    assert ex.state.checkpoint == "ko-2" and view.state["checkpoint"] == "ko-2"
    from driftlens.htmlreport import asset

    assert view._esm == asset("explorer.js") and "export default { render }" in view._esm   # the page's viewer


def test_the_token_map_panel_shows_only_the_newest_selection(rep, monkeypatch):
    """The token map is computed off the kernel's thread; a map superseded by a newer selection is never
    shown, and the panel says it is busy meanwhile."""
    pytest.importorskip("anywidget")
    gate = threading.Event()

    def slow_png(self, key):
        gate.wait(5)
        return f"png {key}".encode()

    monkeypatch.setattr(Explorer, "_map_png", slow_png)
    ex = explore(rep, store=object(), checkpoint="ko-1", layer=0)   # any store: the map is faked
    ex.widget()
    ex.set(layer=1)
    ex.set(layer=2, checkpoint="ko-2")
    assert "computing the token map of layer 2" in ex._map_status.value
    assert ex._map_image.value == b""                     # nothing stale shown meanwhile
    gate.set()
    ex._map_queue.wait()
    assert ex._map_image.value == b"png ('hidden', 2, 'ko-2')" and ex._map_status.value == ""
    assert ex._map_queue.dropped >= 1


def test_in_a_kernel_it_displays_the_widget_with_a_picture_for_static_renderers(rep, monkeypatch):
    pytest.importorskip("anywidget")
    import sys

    import IPython.display

    explore_module = sys.modules["driftlens.explore"]       # (dl.explore is the function)
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append((obj, raw)))
    monkeypatch.setattr(explore_module, "_live_kernel", lambda: True)
    ex = explore(rep)
    ex._ipython_display_()
    (bundle, raw), = shown
    assert raw and bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == ex.widget().model_id
    import base64

    assert base64.b64decode(bundle["image/png"])[:4] == b"\x89PNG" and "Explorer(" in bundle["text/plain"]


def test_outside_a_kernel_it_displays_a_static_figure(rep, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    assert not _live_kernel()
    explore(rep)._ipython_display_()
    from matplotlib.figure import Figure

    assert len(shown) == 1 and isinstance(shown[0], Figure)


def test_the_page_of_the_current_state(rep):
    ex = explore(rep, checkpoint="ko-2", layer=3, metric="gap")
    page = ex.html()
    assert page.startswith("<!DOCTYPE html>") and '"checkpoint":"ko-2"' in page and '"metric":"gap"' in page


def test_a_report_with_nothing_to_explore_is_refused(rep):
    with pytest.raises(UsageError, match="nothing to explore"):
        Explorer(rep.drop_vars(list(rep.data_vars)))
    assert dl.explore is explore


@pytest.mark.heavy
def test_with_a_store_the_token_map_of_the_selected_layer_is_drawn(tmp_path):
    from driftlens.store import open_store
    from driftlens.testing import make_store

    path = make_store(tmp_path / "s.zarr", n_clusters=12, dim=8)
    ds = open_store(path)
    report = dl.drift(ds, metrics=("mmd",), n_permutations=20, n_bootstrap=20, progress=False)
    ex = explore(report, ds, checkpoint="shifted", layer=1, max_tokens=400)
    fig = ex.figure()
    maps = [ax for ax in fig.axes if ax.get_xlabel() == "UMAP 1"]
    assert len(maps) == 2 and maps[1].get_title() == "shifted" and "base" in maps[0].get_title()
    assert list(ex._maps) == [(ex.state.site, 1)]
    ex.set(checkpoint="same")                             # same layer: the map is not fitted again
    assert len(ex._maps) == 1
    t0 = time.perf_counter()
    png = ex._map_png((ex.state.site, 1, "same"))         # what the widget's panel shows
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and np.isfinite(time.perf_counter() - t0)


@pytest.mark.parametrize("with_map", [False, True])
def test_static_figure_titles_stay_inside_their_panels(with_map, monkeypatch):
    """The curves panel's title (metric, band note, highlighted checkpoint) is wrapped to its panel: it
    neither runs past the figure's edge nor over the heatmap's title (found on notebook 05's organism
    report of 11 checkpoints, where both happened: past the edge without the token map, over the
    heatmap's title with it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ckpts = ("base", *(f"ko-{k}" for k in range(1, 6)), *(f"en-{k}" for k in range(1, 6)))
    report = make_report(n_layers=4, checkpoints=ckpts, seed=1)
    report.attrs["level"] = 0.95                          # the band note and name of a real report
    report["mmd_lo"].attrs["n_bootstrap"] = 1000
    report["mmd"].attrs["long_name"] = "squared maximum mean discrepancy (paired cluster estimate)"
    ex = explore(report, checkpoint="ko-5", layer=3)
    if with_map:                                          # the token map's layout, without fitting UMAP
        def fake_map(self, fig, cells, site, layer, checkpoint):
            for cell, title in zip(cells, ("base (reference)", checkpoint)):
                ax = fig.add_subplot(cell)
                ax.set(aspect="equal", title=title, xlabel="UMAP 1")

        monkeypatch.setattr(Explorer, "_draw_map", fake_map)
        ex.store = object()
    fig = ex.figure()
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    heat, lines = (ax.title.get_window_extent(renderer) for ax in fig.axes[:2])
    width = fig.bbox.width
    assert 0 <= lines.x0 and lines.x1 <= width, (lines.x0, lines.x1, width)
    assert heat.x1 <= lines.x0 or heat.y1 <= lines.y0 or lines.y1 <= heat.y0, (heat, lines)
    if with_map:
        right = next(ax for ax in fig.axes if ax.get_xlabel() == "UMAP 1").title.get_window_extent(renderer)
        assert lines.x1 <= right.x0 or lines.y1 <= right.y0 or right.y1 <= lines.y0, (lines, right)
    title = " ".join(fig.axes[1].get_title().split())
    assert "95% interval (probe sampling, 1000 cluster resamples); bands only on ko-5" in title


def test_a_token_map_is_computed_once_when_two_threads_ask_for_it(rep, monkeypatch):
    """The widget computes the selected layer's map in the background while a cell may ask for the same
    map (``explorer.figure()``): the second caller waits for the first instead of fitting UMAP again
    (the two fits also raced on the global warning filters, leaking umap-learn's warnings into notebook
    05's output)."""
    import driftlens.tokenmap

    calls = []

    def slow_map(store, layer, **kwargs):
        calls.append(layer)
        time.sleep(0.3)
        return {"layer": layer}

    monkeypatch.setattr(driftlens.tokenmap, "token_map_data", slow_map)
    ex = explore(rep, checkpoint="ko-1", layer=2)
    ex.store = object()
    got = []
    threads = [threading.Thread(target=lambda: got.append(ex._token_map("hidden", 2))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [2] and got == [{"layer": 2}] * 2
    assert ex._token_map("hidden", 2) is got[0] and calls == [2]
