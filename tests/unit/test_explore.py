"""The explorer (driftlens.explore), headless: state, the static figure, the widget's controls."""
from __future__ import annotations

import pytest
from matplotlib.patches import Rectangle

import driftlens as dl
from driftlens.errors import UsageError
from driftlens.explore import Explorer, _live_kernel, explore
from driftlens.testing import make_report

CKPTS = ("base", "ko-1", "ko-2", "en-1")


def suptitle(fig) -> str:
    """The figure's suptitle (``Figure.get_suptitle`` only exists from matplotlib 3.8; the floor is 3.7)."""
    return fig._suptitle.get_text() if fig._suptitle is not None else ""



@pytest.fixture
def rep():
    return make_report(n_layers=4, checkpoints=CKPTS, seed=1)


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
    assert "ko-1" in suptitle(fig) and "layer 2" in suptitle(fig)
    assert ex.last_figure is fig


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


def test_the_widget_redraws_in_place_when_a_control_moves(rep):
    pytest.importorskip("ipywidgets")
    ex = explore(rep, checkpoint="ko-1", layer=0)
    box = ex.widget()
    assert ex.widget() is box                             # one widget per explorer
    first = ex.last_figure
    ex._controls["layer"].value = 3                       # what a user's slider drag does
    assert ex.state.layer == 3 and ex.last_figure is not first
    assert framed(ex.last_figure) == (CKPTS.index("ko-1"), 3)
    ex.set(checkpoint="en-1")                             # from code: the controls follow
    assert ex._controls["checkpoint"].value == "en-1"


def test_outside_a_kernel_it_displays_a_static_figure(rep, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    assert not _live_kernel()
    explore(rep)._ipython_display_()
    from matplotlib.figure import Figure

    assert len(shown) == 1 and isinstance(shown[0], Figure)


def test_a_report_with_nothing_to_explore_is_refused(rep):
    with pytest.raises(UsageError, match="nothing to explore"):
        Explorer(rep[["sigma"]] if "sigma" in rep else rep.drop_vars(list(rep.data_vars)))
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
