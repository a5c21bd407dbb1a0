"""Figures (driftlens.plot), headless: what each function drew, on synthetic reports."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from driftlens import plot
from driftlens.errors import UsageError
from driftlens.ranks import allocate_ranks
from driftlens.specs import load_spec
from driftlens.testing import make_report

CKPTS = ("base", "ko-1", "ko-2", "en-1")
L = 5


@pytest.fixture
def rep():
    r = make_report(n_layers=L, checkpoints=CKPTS, seed=3)
    for v in r.data_vars:
        r[v].attrs["units"] = "model units^2" if v.startswith("sinkhorn") else "1"
    r["mir_total"].attrs["units"] = "log10"
    r.attrs["level"] = 0.95
    return r


def new_ax():
    return Figure().add_subplot()


def bands(ax):
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def labelled(ax, names):
    return [line for line in ax.get_lines() if line.get_label() in names]


def probe_ds(with_sd=True):
    rng = np.random.default_rng(0)
    c, n = ("base", "ko-1", "ko-2"), 4
    acc = rng.uniform(0.4, 0.9, size=(3, n))
    data = {"accuracy": (("checkpoint", "layer"), acc),
            "transfer": (("checkpoint", "layer"), acc - 0.1),
            "shuffled": (("checkpoint", "layer"), rng.uniform(0.2, 0.3, size=(3, n))),
            "chance": ((), 0.25)}
    if with_sd:
        data["accuracy_sd"] = (("checkpoint", "layer"), np.full((3, n), 0.03))
    return xr.Dataset(data, coords={"checkpoint": list(c), "layer": np.arange(n)},
                      attrs={"reference": "base", "label": "shape", "site": "hidden", "modality": "visual"})


# ------------------------------------------------------------------------------------ heatmap

def test_heatmap_cells_labels_and_significance_marks(rep):
    ax = plot.drift_heatmap(rep, "mmd", site="hidden", modality="visual", alpha=0.5, marks="against_zero")
    (im,) = ax.images
    want = rep["mmd"].sel(site="hidden", modality="visual").transpose("checkpoint", "layer").values
    np.testing.assert_allclose(im.get_array(), want)
    assert ax.get_xlabel() == "decoder layer" and ax.get_ylabel() == "checkpoint"
    assert [t.get_text() for t in ax.get_yticklabels()] == list(CKPTS)
    cbar = ax.figure.axes[1]
    assert cbar.get_ylabel() == "MMD$^2$ (dimensionless)"
    assert len(ax.texts) == len(CKPTS) * L                                     # one value per cell
    q = rep["mmd_q"].sel(site="hidden", modality="visual").values
    assert sum(t.get_text().endswith("*") for t in ax.texts) == int((q <= 0.5).sum()) > 0
    assert "q" in ax.get_title() and "0.5" in ax.get_title()


def test_heatmap_falls_back_to_p_then_to_no_marks(rep):
    p = rep["mmd_p"].sel(site="key", modality="text").values
    ax = plot.drift_heatmap(rep.drop_vars("mmd_q"), "mmd", site="key", modality="text", alpha=0.3, annotate=False,
                            marks="against_zero")
    assert [t.get_text() for t in ax.texts] == ["*"] * int((p <= 0.3).sum())     # marks only
    ax = plot.drift_heatmap(rep.drop_vars(["mmd_q", "mmd_p"]), "mmd", annotate=False, marks="against_zero")
    assert len(ax.texts) == 0 and "*" not in ax.get_title()


def test_heatmap_units_of_the_variable(rep):
    ax = plot.drift_heatmap(rep, "sinkhorn")
    assert ax.figure.axes[1].get_ylabel() == "Sinkhorn divergence (model units$^2$)"


# ------------------------------------------------------------------------------------ per-layer lines

def test_drift_by_layer_one_line_and_band_per_checkpoint(rep):
    ax = new_ax()
    assert plot.drift_by_layer(rep, "mmd", site="key", modality="text", ax=ax) is ax
    lines = labelled(ax, CKPTS)
    assert [line.get_label() for line in lines] == list(CKPTS)
    np.testing.assert_allclose(lines[1].get_ydata(), rep["mmd"].sel(checkpoint="ko-1", site="key", modality="text"))
    assert len(bands(ax)) == len(CKPTS)
    assert ax.get_xlabel() == "decoder layer" and ax.get_ylabel() == "text MMD$^2$ (dimensionless)"
    assert "95% interval" in ax.get_title()
    assert ax.get_legend() is not None


def test_drift_by_layer_no_band_without_interval_and_checkpoint_subset(rep):
    ax = plot.drift_by_layer(rep.drop_vars(["mmd_lo", "mmd_hi"]), "mmd", checkpoints=["ko-2", "en-1"])
    assert [line.get_label() for line in labelled(ax, CKPTS)] == ["ko-2", "en-1"]
    assert bands(ax) == [] and "interval" not in ax.get_title()


def test_drift_by_layer_leaves_out_the_zero_reference_row(rep):
    rep["mmd"].loc[{"checkpoint": "base"}] = 0.0
    ax = plot.drift_by_layer(rep, "mmd")
    assert [line.get_label() for line in labelled(ax, CKPTS)] == ["ko-1", "ko-2", "en-1"]
    assert len(bands(ax)) == 3


def test_trajectories_share_a_hue_and_the_reference_is_black(rep):
    ax = plot.modality_gap_by_layer(rep)
    color = {line.get_label(): line.get_color() for line in labelled(ax, CKPTS)}
    assert color["base"] == "#000000"
    assert len({color["ko-1"], color["ko-2"], color["en-1"]}) == 3
    marker = {line.get_label(): line.get_marker() for line in labelled(ax, CKPTS)}
    assert marker["ko-1"] == marker["ko-2"] != marker["en-1"]


def test_modality_gap_by_layer(rep):
    ax = new_ax()
    assert plot.modality_gap_by_layer(rep, site="key", ax=ax) is ax
    lines = labelled(ax, CKPTS)
    assert len(lines) == len(CKPTS) and len(bands(ax)) == len(CKPTS)      # the reference's gap is a value
    np.testing.assert_allclose(lines[-1].get_ydata(), rep["gap"].sel(checkpoint="en-1", site="key"))
    assert ax.get_ylabel() == "visual-text modality gap (dimensionless)" and "key" in ax.get_title()
    assert bands(plot.modality_gap_by_layer(rep.drop_vars("gap_hi"))) == []


def test_mir_by_layer_totals_in_the_legend(rep):
    ax = new_ax()
    assert plot.mir_by_layer(rep, ax=ax) is ax
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == [f"{c}: {float(v):.2f}" for c, v in zip(CKPTS, rep["mir_total"].values)]
    assert "log$_{10}$" in ax.get_legend().get_title().get_text()
    assert len(ax.get_lines()) == len(CKPTS) and len(bands(ax)) == len(CKPTS)
    assert ax.get_ylabel() == "MIR (per-layer term) (dimensionless)"


# ------------------------------------------------------------------------------------ other figures

def test_rank_schedule_bars_line_and_labels(rep):
    sch = allocate_ranks(rep, 64, "mmd", "proportional", 1, 8, spec=load_spec("llava"), checkpoint="en-1")
    ax = new_ax()
    assert plot.rank_schedule(sch, rep, ax=ax) is ax
    heights = np.zeros(L)
    for patch in ax.patches:
        heights[int(round(patch.get_x() + patch.get_width() / 2))] += patch.get_height()
    np.testing.assert_array_equal(heights, sch.layer_ranks())
    twin = ax.figure.axes[1]
    np.testing.assert_allclose(twin.lines[0].get_ydata(), rep["mmd"].sel(site="hidden", modality="visual").values[-1])
    assert ax.get_ylabel() == "LoRA rank (sum over modules)" and ax.get_xlabel() == "decoder layer"
    assert twin.get_ylabel() == f"signal: {sch.meta['signals']['self_attn.q_proj']} (dimensionless)"
    legend = twin.get_legend()
    assert len(legend.get_texts()) == len(sch.meta["targets"]) + 1


def test_grounding_vs_drift_overlays_a_control(rep):
    acc = {"base": {"en": 0.9, "ko": 0.3}, "ko-1": {"en": 0.6, "ko": 0.5}, "ko-2": {"en": 0.5, "ko": 0.8}}
    ctrl = {"base": {"en": 0.9, "ko": 0.3}, "en-1": {"en": 0.88, "ko": 0.28}}
    ax = new_ax()
    assert plot.grounding_vs_drift(acc, {"base": 0.0, "ko-1": 0.2, "ko-2": 0.3}, ax=ax, chance=0.25) is ax
    assert plot.grounding_vs_drift(ctrl, {"base": 0.0, "en-1": 0.1}, ax=ax, tag=" (control)") is ax
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["en", "ko", "chance", "en (control)", "ko (control)"]
    en, ko, _, en_c, _ = ax.get_lines()
    np.testing.assert_allclose(en.get_ydata(), [0.9, 0.6, 0.5])
    assert en.get_color() == en_c.get_color() and en_c.get_linestyle() == "--"
    # ends labelled, the shared base point once per language
    assert sorted(t.get_text() for t in ax.texts) == ["base", "base", "en-1", "en-1", "ko-2", "ko-2"]
    assert "fraction correct" in ax.get_ylabel() and "dimensionless" in ax.get_xlabel()
    ax = plot.grounding_vs_drift(acc, {"base": 0.0, "ko-1": 0.2, "ko-2": 0.3}, annotate="none")
    assert len(ax.texts) == 0


def test_seeds_by_layer_lines_and_dots():
    series = {"a": np.arange(12.0).reshape(3, 4), "b": -np.ones((3, 4))}
    ax = new_ax()
    assert plot.seeds_by_layer(series, ax=ax, title="t") is ax
    assert [line.get_label() for line in ax.get_lines()[:2]] == ["a", "b"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [4, 5, 6, 7])
    assert len(ax.collections) == 6                                        # one scatter per seed and series
    assert ax.get_title() == "t" and "3 seeds" in ax.get_legend().get_title().get_text()


def test_probe_accuracy_lines_bands_and_references():
    ds = probe_ds()
    ax = new_ax()
    assert plot.probe_accuracy(ds, ax=ax) is ax
    lines = ax.get_lines()
    assert [line.get_label() for line in lines if not line.get_label().startswith("_")] == ["base", "ko-1", "ko-2"]
    assert sum(line.get_linestyle() == "--" for line in lines) == 2             # transfer, not at the reference
    assert sum(line.get_linestyle() == ":" for line in lines) == 3              # shuffled
    (chance,) = [line for line in lines if line.get_linestyle() == "-."]
    np.testing.assert_allclose(chance.get_ydata(), [0.25, 0.25])
    assert len(bands(ax)) == 3
    assert ax.get_xlabel() == "decoder layer" and "fraction correct" in ax.get_ylabel()
    assert {"transfer of the base probe", "shuffled labels", "chance"} <= {t.get_text() for t in ax.get_legend().get_texts()}
    assert "shape (hidden, visual)" in ax.get_title() and "sd" in ax.get_title()
    ds = probe_ds(with_sd=False)
    ds["shuffled"][:] = np.nan                                                 # a run without shuffles
    ax = plot.probe_accuracy(ds, checkpoints=["ko-2"])
    assert bands(ax) == [] and len([ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]) == 1
    assert not [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert "shuffled labels" not in {t.get_text() for t in ax.get_legend().get_texts()}


# ------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("call, match", [
    (lambda r: plot.drift_heatmap(r, "nope"), "'nope' is not in the report"),
    (lambda r: plot.drift_heatmap(r, "mmd", site="hiden"), "site 'hiden' is not in the report"),
    (lambda r: plot.drift_by_layer(r, "mmd", modality="audio"), "modality 'audio'"),
    (lambda r: plot.drift_by_layer(r, "mir_total"), "cannot be drawn here"),
    (lambda r: plot.drift_by_layer(r, "mmd", modality=None), "name the modality"),
    (lambda r: plot.drift_by_layer(r, "mmd", checkpoints=["ko-9"]), r"\['ko-9'\] are not in the report"),
    (lambda r: plot.modality_gap_by_layer(r.drop_vars("gap")), "'gap' is not in the report"),
    (lambda r: plot.mir_by_layer(r.drop_vars("mir")), "'mir' is not in the report"),
    (lambda r: plot.probe_accuracy(r), "'accuracy' is not in the report"),
])
def test_clear_usage_errors(rep, call, match):
    with pytest.raises(UsageError, match=match):
        call(rep)


def test_all_nan_variable_is_refused(rep):
    rep["mmd"][:] = np.nan
    with pytest.raises(UsageError, match="no finite value"):
        plot.drift_heatmap(rep, "mmd")


# ------------------------------------------------------------------------------------ files

def test_save_png_and_svg(rep, tmp_path):
    ax = plot.drift_heatmap(rep)
    first = plot.save(ax, tmp_path / "sub" / "h.png", formats=("png", "svg"))
    assert first == tmp_path / "sub" / "h.png"
    assert (tmp_path / "sub" / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "sub" / "h.svg").read_bytes()[:500]
    assert plot.save(ax.figure, tmp_path / "f.svg") == tmp_path / "f.svg"   # default: the path's suffix
    assert (tmp_path / "f.svg").exists() and not (tmp_path / "f.png").exists()


def test_plot_report_names_every_figure_the_report_supports(rep, tmp_path, monkeypatch):
    sch = allocate_ranks(rep, 64, "mmd", "proportional", 1, 8, spec=load_spec("llava"), checkpoint="en-1")
    drawn = []
    monkeypatch.setattr(plot, "save", lambda ax, path, formats: drawn.append((ax, path, formats)) or path)
    paths = plot.plot_report(rep, tmp_path, formats=("png", "svg"), schedule=sch)
    stems = []
    for var in ("mmd", "sinkhorn", "sliced_w", "gauss_w2", "paired_shift"):
        for site in ("hidden", "key"):
            for mod in ("visual", "text"):
                stems += [f"{var}_heatmap_{site}_{mod}", f"{var}_by_layer_{site}_{mod}"]
    stems += ["gap_by_layer_hidden", "gap_by_layer_key", "mir_by_layer", "rank_schedule"]
    assert paths == [tmp_path / f"{s}.{f}" for s in stems for f in ("png", "svg")]
    assert [p for _, p, _ in drawn] == [tmp_path / f"{s}.png" for s in stems]
    heat = drawn[stems.index("sinkhorn_heatmap_key_text")][0]
    assert "key, text" in heat.get_title() and len(heat.images) == 1


@pytest.mark.heavy
def test_plot_report_writes_png_and_svg(rep, tmp_path):
    small = rep[["mmd", "mmd_lo", "mmd_hi", "mmd_p", "gap", "mir", "mir_lo", "mir_hi", "mir_total"]].sel(
        site=["hidden"], modality=["visual"])
    sch = allocate_ranks(rep, 64, "mmd", "proportional", 1, 8, spec=load_spec("llava"), checkpoint="en-1")
    paths = plot.plot_report(small, tmp_path / "figs", formats=("png", "svg"), schedule=sch)
    stems = ["mmd_heatmap_hidden_visual", "mmd_by_layer_hidden_visual", "gap_by_layer_hidden", "mir_by_layer",
             "rank_schedule"]
    assert paths == [tmp_path / "figs" / f"{s}.{f}" for s in stems for f in ("png", "svg")]
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(p.name for p in paths)
    for p in paths:
        head = p.read_bytes()[:400]
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else b"<svg" in head


def test_plot_report_minimal_report_and_refusal(rep, tmp_path):
    small = rep[["gap", "gap_lo", "gap_hi"]].sel(site=["hidden"])
    assert plot.plot_report(small, tmp_path) == [tmp_path / "gap_by_layer_hidden.png"]
    with pytest.raises(UsageError, match="nothing to draw"):
        plot.plot_report(rep[["mir_total"]], tmp_path)


# ------------------------------------------------------------------------------------ conventions

def test_new_figures_outside_ipython_are_bare_figures(rep):
    ax = plot.drift_by_layer(rep)
    assert type(ax.figure) is Figure and ax.figure.get_layout_engine() is not None
    assert getattr(ax.figure.canvas, "manager", None) is None                # not registered with pyplot


def test_inside_ipython_new_figures_go_through_pyplot(rep, monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plot, "_in_ipython", lambda: True)
    ax = plot.drift_heatmap(rep)
    try:
        assert plt.fignum_exists(ax.figure.number)
    finally:
        plt.close(ax.figure)


@pytest.mark.heavy
def test_importing_and_drawing_never_touch_pyplot():
    code = ("import sys, driftlens.plot as p\n"
            "assert 'matplotlib' not in sys.modules or 'matplotlib.pyplot' not in sys.modules\n"
            "from driftlens.testing import make_report\n"
            "p.save(p.drift_heatmap(make_report()), sys.argv[1])\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-c", code, f"{d}/x.png"], check=True, capture_output=True)


# ------------------------------------------------------------------------------------ runs and contrasts

@pytest.fixture(scope="module")
def runs_rep(tmp_path_factory):
    import driftlens as dl
    from driftlens.testing import make_store

    root = tmp_path_factory.mktemp("plotruns")
    stores = {f"seed-{s}": make_store(root / f"s{s}.zarr", seed=s, shift=1.0 + 0.5 * s) for s in range(3)}
    return dl.drift(stores, reference="base", metrics=("mmd", "gap", "mir"), n_permutations=50, n_bootstrap=60,
                    progress=False, contrasts=["shifted:same"], min_effect=0.005)


def test_a_report_with_runs_is_drawn_as_the_mean_with_one_dot_per_run_and_the_across_run_band(runs_rep):
    ax = plot.drift_by_layer(runs_rep, "mmd")
    want = runs_rep["mmd_runs"].sel(site="hidden", modality="visual", checkpoint="shifted").values
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    np.testing.assert_allclose(lines["shifted"].get_ydata(), want)
    dots = [c for c in ax.collections if c.get_offsets().shape[0] == runs_rep.sizes["layer"]
            and not hasattr(c, "get_paths") or len(c.get_offsets()) == runs_rep.sizes["layer"]]
    assert len(dots) >= 3 * 2                           # 3 runs x (same, shifted)
    assert "across-run interval" in ax.get_title() and "mean of 3 runs" in ax.get_title()
    for fig in (plot.modality_gap_by_layer(runs_rep), plot.mir_by_layer(runs_rep)):
        assert "across-run interval" in fig.get_title()
    heat = plot.drift_heatmap(runs_rep, "mmd")
    np.testing.assert_allclose(heat.images[0].get_array(),
                               runs_rep["mmd_runs"].sel(site="hidden", modality="visual").values)
    assert not any(t.get_text().endswith("*") for t in heat.texts) and "mean of 3 runs" in heat.get_title()


def test_contrast_by_layer_draws_the_contrast_its_band_and_the_runs(runs_rep):
    ax = plot.contrast_by_layer(runs_rep, "mmd")
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "shifted - same"]
    np.testing.assert_allclose(line.get_ydata(), runs_rep["mmd_contrast_runs"].sel(
        contrast="shifted - same", site="hidden", modality="visual").values)
    assert "across-run interval" in ax.get_title()
    one = plot.contrast_by_layer(runs_rep.sel(run="seed-0").drop_vars([v for v in runs_rep.data_vars
                                                                       if "_runs" in v]), "mmd")
    assert "probe sampling only" in one.get_title()
    with pytest.raises(UsageError, match="no 'gap_contrast'|no 'sinkhorn_contrast'"):
        plot.contrast_by_layer(runs_rep, "sinkhorn")


def test_heatmap_marks_come_from_the_minimum_effect_test(runs_rep):
    one = runs_rep.sel(run="seed-2").drop_vars([v for v in runs_rep.data_vars if "_runs" in v])
    ax = plot.drift_heatmap(one, "mmd", alpha=0.05)
    pmin = one["mmd_pmin"].sel(site="hidden", modality="visual").values
    assert sum(t.get_text().endswith("*") for t in ax.texts) == int((pmin <= 0.05).sum()) > 0
    assert "effect > 0.005" in ax.get_title()
    none = plot.drift_heatmap(one.drop_vars("mmd_pmin"), "mmd")
    assert not any(t.get_text().endswith("*") for t in none.texts)
    with pytest.raises(UsageError, match="min-effect"):
        plot.drift_heatmap(one.drop_vars("mmd_pmin"), "mmd", marks="min_effect")


# ------------------------------------------------------------------------------------ readable figures (issue 26)

def test_heatmap_numbers_share_one_precision(rep):
    """``0.100`` beside ``0.058``: one number of decimals per metric, not 3 significant digits per cell."""
    r = rep.copy(deep=True)
    sel = dict(site="hidden", modality="visual")
    vals = np.full((len(CKPTS), L), 0.0577)
    vals[1, 0] = 0.1
    r["mmd"].loc[sel] = vals
    ax = plot.drift_heatmap(r, "mmd", ax=new_ax(), marks="none")
    texts = {t.get_text() for t in ax.texts}
    assert texts == {"0.100", "0.058"}


def test_many_trajectory_lines_band_only_the_highlighted_ones():
    ckpts = ("base", *(f"ko-{k}" for k in range(1, 6)), *(f"en-{k}" for k in range(1, 6)))
    r = make_report(n_layers=L, checkpoints=ckpts, seed=5)
    r["mmd"].loc[dict(checkpoint="base")] = 0.0
    ax = plot.drift_by_layer(r, "mmd", ax=new_ax())            # 10 lines: bands on ko-5 and en-5 only
    assert len(bands(ax)) == 2 and "bands only on ko-5, en-5" in ax.get_title()
    widths = {line.get_label(): line.get_linewidth() for line in ax.get_lines() if line.get_label() in ckpts}
    assert widths["ko-5"] > widths["ko-2"] and widths["en-5"] > widths["en-1"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(ckpts[1:])     # trajectory order kept
    ax = plot.drift_by_layer(r, "mmd", ax=new_ax(), highlight="ko-3")
    assert len(bands(ax)) == 1 and "bands only on ko-3" in ax.get_title()
    assert len(bands(plot.drift_by_layer(r, "mmd", ax=new_ax(), highlight=None))) == 10
    ax = plot.modality_gap_by_layer(r, ax=new_ax())            # gap: the reference has a line, and its band
    assert len(bands(ax)) == 3 and "bands only on base, ko-5, en-5" in ax.get_title()
    with pytest.raises(UsageError, match="highlight"):
        plot.drift_by_layer(r, "mmd", ax=new_ax(), highlight="zz-1")
    ax = plot.drift_by_layer(r, "mmd", ax=new_ax(), highlight="base")  # the reference's zero row is not drawn
    assert len(bands(ax)) == 0 and "base" not in [t.get_text() for t in ax.get_legend().get_texts()]


def test_a_band_of_few_resamples_is_not_called_95_percent(rep):
    r = rep.copy()
    r["sinkhorn_lo"].attrs["n_bootstrap"] = 10
    r["mmd_lo"].attrs["n_bootstrap"] = 1000
    assert "95% interval (probe sampling, 1000 cluster resamples)" in plot.band_note(r, "mmd")
    note = plot.band_note(r, "sinkhorn")
    assert "95% interval" not in note and "10 cluster resamples" in note
    assert "95% interval" not in plot.drift_by_layer(r, "sinkhorn", ax=new_ax()).get_title()


def test_several_metrics_say_what_their_bands_are_once(rep):
    r = rep.copy()
    for m in ("sinkhorn", "sliced_w", "gauss_w2"):
        r[f"{m}_lo"].attrs["n_bootstrap"] = 10
    r["mmd_lo"].attrs["n_bootstrap"] = 1000
    axes = plot.metrics_by_layer(r)
    assert len(axes) == 4 and all("bands" not in ax.get_title() for ax in axes)
    assert [ax.get_legend() is not None for ax in axes] == [False, False, False, True]
    title = axes[0].figure._suptitle.get_text()
    assert title.count("rough interval from only 10") == 1 and title.count("1000 cluster resamples") == 1


def test_grounding_colours_mean_what_the_trajectories_mean_elsewhere(rep):
    """The Korean trajectory's colour in the drift figures is Korean's colour here (it was English's)."""
    acc = {"base": {"en": 0.9, "ko": 0.3}, "ko-1": {"en": 0.6, "ko": 0.5}}
    ctrl = {"base": {"en": 0.9, "ko": 0.3}, "en-1": {"en": 0.88, "ko": 0.28}}
    ax = new_ax()
    plot.grounding_vs_drift(acc, {"base": 0.0, "ko-1": 0.2}, ax=ax)
    plot.grounding_vs_drift(ctrl, {"base": 0.0, "en-1": 0.1}, ax=ax, tag=" (control)")
    styles = plot.checkpoint_styles(["base", "ko-1", "en-1"], "base")
    from matplotlib.colors import to_hex

    colour = {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()}
    assert colour["ko"] == to_hex(styles["ko-1"]["color"]) and colour["en"] == to_hex(styles["en-1"]["color"])
    assert colour["ko (control)"] == colour["ko"] and colour["en (control)"] == colour["en"]
