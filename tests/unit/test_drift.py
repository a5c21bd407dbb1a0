"""The drift report on a synthetic store with a known truth (driftlens.testing.make_store)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import driftlens as dl
from driftlens import inference as I
from driftlens import metrics as M
from driftlens.drift import DriftError
from driftlens.report import load_report
from driftlens.store import open_store
from driftlens.testing import make_store

METRICS = ("mmd", "sliced_w", "gauss_w2", "paired_shift", "gap", "mir")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("drift") / "s.zarr")


N_DRAWS, N_TRANSPORT = 50, 10        # layout and value checks: few draws (the fast tier)
MANY_DRAWS, MANY_TRANSPORT = 500, 40  # what the significance checks need (BH over 24 tests: p = 1/501)


@pytest.fixture(scope="module")
def report(store):
    return dl.drift(open_store(store), reference="base", metrics=METRICS, n_permutations=N_DRAWS,
                    n_bootstrap=N_DRAWS, transport_resamples=N_TRANSPORT, progress=False)


@pytest.fixture(scope="module")
def report_many(store):
    return dl.drift(open_store(store), reference="base", metrics=METRICS, n_permutations=MANY_DRAWS,
                    n_bootstrap=MANY_DRAWS, transport_resamples=MANY_TRANSPORT, progress=False)


def _cell(rep, var, checkpoint="shifted", layer=1, site="hidden", modality="visual"):
    return float(rep[var].sel(checkpoint=checkpoint, layer=layer, site=site, modality=modality))


def test_report_layout_and_attributes(report):
    assert dict(report.sizes) == {"checkpoint": 3, "layer": 3, "site": 2, "modality": 2, "draw": N_DRAWS}
    assert report["mmd_boot"].dims == ("checkpoint", "layer", "site", "modality", "draw")
    assert report["sliced_w_boot"].attrs["n_draws"] == N_TRANSPORT and report["mir_boot"].dims == ("checkpoint", "layer", "draw")
    for m in ("mmd", "sliced_w", "gauss_w2"):
        for suffix in ("", "_lo", "_hi", "_p", "_q"):
            assert report[m + suffix].dims == ("checkpoint", "layer", "site", "modality")
            assert report[m + suffix].attrs["definition"] and "units" in report[m + suffix].attrs
    assert "paired_shift_p" not in report                   # no sampling null for a displacement
    assert report.gap.dims == ("checkpoint", "layer", "site")
    assert report.mir.dims == ("checkpoint", "layer") and report.mir_total.dims == ("checkpoint",)
    assert report.attrs["cluster_coord"] == "cluster" and report.attrs["n_clusters"] == 24
    assert report.attrs["n_tests"] == 3 * 2 * 3 * 2 * 2     # 3 metrics x 2 checkpoints x 3 layers x 2 x 2
    assert report.mmd_q.attrs["n_tests"] == 24 and report.mmd_q.attrs["correction"] == "bh"
    assert report.attrs["warnings"] == ""


def test_cells_equal_the_cluster_functions(store, report):
    """Each cell is inference.paired_mmd / paired_shift on that cell's rows, same seeds."""
    ds = open_store(store)
    vis = ds.modality.values.astype(str) == "visual"
    cl = ds.cluster.values.astype(str)[vis]
    r = torch.as_tensor(ds.hidden.sel(checkpoint="base", layer=2).values[vis])
    c = torch.as_tensor(ds.hidden.sel(checkpoint="same", layer=2).values[vis])
    res = I.paired_mmd(r, c, cl, n_permutations=N_DRAWS, n_bootstrap=N_DRAWS)
    got = [_cell(report, v, "same", 2) for v in ("mmd", "mmd_lo", "mmd_hi", "mmd_p")]
    assert got == pytest.approx([res.effect, res.lo, res.hi, res.p], rel=1e-6, abs=1e-9)
    assert float(report.sigma.sel(layer=2, site="hidden", modality="visual")) == pytest.approx(
        M.median_sigma(r - r.mean(0), pairs="reference"), rel=1e-6)
    shift = I.paired_shift(r, c, cl, n_bootstrap=N_DRAWS)
    got = [_cell(report, v, "same", 2) for v in ("paired_shift", "paired_shift_lo", "paired_shift_hi")]
    assert got == pytest.approx(list(shift), rel=1e-6)


@pytest.mark.heavy                   # 500 permutations and bootstrap draws per cell
def test_planted_change_is_found_where_it_was_planted(report_many):
    report = report_many
    assert _cell(report, "mmd_lo") > 0 and _cell(report, "mmd_p") == 1 / 501 and _cell(report, "mmd_q") < 0.05
    assert _cell(report, "sliced_w_lo") > 0 and _cell(report, "gauss_w2_p") <= 1 / 41
    q = report.mmd_q.sel(checkpoint="shifted").values.copy()
    q[1, 0, 0] = np.nan                                        # (layer 1, hidden, visual)
    assert np.nanmin(q) > 0.05                                 # nothing else is significant
    assert _cell(report, "paired_shift_lo") > _cell(report, "paired_shift_hi", layer=0)


@pytest.mark.heavy
def test_no_change_is_not_significant_after_correction(report_many):
    report = report_many
    assert float(report.mmd_q.sel(checkpoint="same").min()) > 0.05
    # the effect's interval covers 0 in (almost) every cell of the unchanged checkpoint
    lo, hi = report.mmd_lo.sel(checkpoint="same").values, report.mmd_hi.sel(checkpoint="same").values
    assert np.mean((lo <= 0) & (hi >= 0)) >= 0.8


def test_reference_row_is_not_tested(report):
    base = report.sel(checkpoint="base")
    assert np.isnan(base.mmd_p).all() and np.isnan(base.mmd_q).all()
    assert float(abs(base.mmd).max()) == 0.0 and float(abs(base.paired_shift_hi).max()) == 0.0


def test_cross_modal_values_and_intervals(store, report):
    ds = open_store(store)
    mod = ds.modality.values.astype(str)
    vis, txt = mod == "visual", mod == "text"           # text tokens all follow the image here
    h = ds.hidden.sel(checkpoint="same", layer=0).values
    assert float(report.gap.sel(checkpoint="same", layer=0, site="hidden")) == pytest.approx(
        M.modality_gap(torch.as_tensor(h[vis]), torch.as_tensor(h[txt])), rel=1e-9)
    assert float(report.mir.sel(checkpoint="same", layer=0)) == pytest.approx(
        M.mir(torch.as_tensor(h[vis]), torch.as_tensor(h[txt])), rel=1e-9)
    # the last layer's MIR reads the post-final-norm site, as Huang et al.'s hidden_states[-1]
    f = ds.final.sel(checkpoint="same").values
    assert float(report.mir.sel(checkpoint="same", layer=2)) == pytest.approx(
        M.mir(torch.as_tensor(f[vis]), torch.as_tensor(f[txt])), rel=1e-9)
    assert "final" in report.mir.attrs["last_layer_state"]
    for v in ("gap", "mir"):
        assert (report[v + "_lo"] <= report[v]).all() and (report[v] <= report[v + "_hi"]).all()
    total = np.log10(report.mir.sum("layer"))
    np.testing.assert_allclose(report.mir_total.values, total.values)
    assert (report.mir_total_lo < report.mir_total).all() and (report.mir_total < report.mir_total_hi).all()


def test_netcdf_round_trip(report, tmp_path):
    back = load_report(dl.save_report(report, tmp_path / "r.nc"))
    np.testing.assert_allclose(back.mmd_lo.values, report.mmd_lo.values)
    assert back.attrs["reference"] == "base" and back.attrs["warnings"] == ""


def test_store_without_clusters_falls_back_to_groups_and_says_so(store):
    ds = open_store(store).drop_vars("cluster")
    with pytest.warns(UserWarning, match="no `cluster` coordinate"):
        rep = dl.drift(ds, metrics=("mmd",), sites=("hidden",), n_permutations=50, n_bootstrap=50,
                       progress=False)
    assert rep.attrs["cluster_coord"] == "group" and rep.attrs["n_clusters"] == 48
    assert "renders or twins of one scene as independent" in rep.attrs["warnings"]


def test_store_without_final_site_says_what_mir_used(tmp_path):
    path = make_store(tmp_path / "nf.zarr", n_clusters=6, final=False)
    with pytest.warns(UserWarning, match="before the model's final norm"):
        rep = dl.drift(open_store(path), metrics=("mir",), n_bootstrap=20, progress=False)
    assert "pre-norm" in rep.mir.attrs["last_layer_state"]


def test_shift_alias_and_bad_arguments(store):
    ds = open_store(store)
    rep = dl.drift(ds, metrics=("shift",), sites=("key",), n_bootstrap=20, progress=False)
    assert "paired_shift" in rep
    with pytest.raises(DriftError, match="reference 'nope' is not a checkpoint"):
        dl.drift(ds, reference="nope", progress=False)
    with pytest.raises(DriftError, match="unknown metric 'kl'"):
        dl.drift(ds, metrics=("mmd", "kl"), progress=False)
    with pytest.raises(DriftError, match="not in the store"):
        dl.drift(ds, sites=("query",), progress=False)
    for kw, msg in (({"n_permutations": 0}, "n_permutations must be an integer >= 1"), ({"level": 1.5}, "level"),
                    ({"correction": "bonferroni"}, "correction"), ({"blur": -1}, "blur")):
        with pytest.raises(DriftError, match=msg):
            dl.drift(ds, progress=False, **kw)


def test_non_finite_values_name_the_cell(store):
    ds = open_store(store).load()
    bad = ds.hidden.values.copy()
    bad[2, 1, 5, 0] = np.nan
    ds["hidden"] = (ds.hidden.dims, bad)
    with pytest.raises(DriftError, match=r"checkpoint 'shifted', site 'hidden', layer 1: 1 token row"):
        dl.drift(ds, metrics=("mmd",), n_permutations=5, n_bootstrap=5, progress=False)


def test_one_cluster_is_refused(tmp_path):
    path = make_store(tmp_path / "one.zarr", n_clusters=1, final=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="1 cluster"):
            dl.drift(open_store(path), metrics=("mmd",), progress=False)
