"""Contrasts and runs (driftlens.compare) on real reports of synthetic stores, against independent references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import driftlens as dl
from driftlens import compare as C
from driftlens import inference as I
from driftlens import metrics as M
from driftlens.errors import DataError, UsageError
from driftlens.report import load_report, save_report
from driftlens.store import open_store
from driftlens.testing import RunsSpec, make_store, run_reports, simulate_runs

B = 200
KW = dict(metrics=("mmd", "paired_shift", "gap"), n_permutations=100, n_bootstrap=B, progress=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {f"seed-{s}": make_store(root / f"s{s}.zarr", seed=s, shift=1.0 + 0.5 * s) for s in range(3)}


@pytest.fixture(scope="module")
def runs_report(stores):
    return dl.drift(stores, reference="base", contrasts=[("shifted", "same")], layer_contrasts=["1:0"],
                    min_effect=0.01, **KW)


def test_a_checkpoint_contrast_is_the_difference_of_two_cells_under_the_same_cluster_draws(stores):
    rep = dl.drift(stores["seed-0"], reference="base", contrasts=["shifted:same"], **KW)
    ds = open_store(stores["seed-0"])
    sel = dict(layer=1)
    vis = ds["modality"].values == "visual"
    block = torch.as_tensor(ds["hidden"].sel(checkpoint="base", **sel).values, dtype=torch.float32)
    r = block[torch.as_tensor(vis)]
    codes_np, uniq = I.cluster_codes(ds["cluster"].values[vis])
    codes, k = torch.as_tensor(codes_np), len(uniq)
    centre = block.mean(0, dtype=torch.float64).to(r.dtype)     # the report centres on the whole block's mean
    sigma = M.median_sigma(r - centre, pairs="reference", seed=0)
    counts = I.bootstrap_counts(k, B, 1)                      # the report's draws: seed + 1
    terms = []
    for label in ("shifted", "same"):
        c = torch.as_tensor(ds["hidden"].sel(checkpoint=label, **sel).values[vis], dtype=torch.float32)
        terms.append(I.paired_mmd_matrix(r - centre, c - centre, codes, k, sigma))
    h = terms[0] - terms[1]                                    # the difference of the two pair-term matrices
    want = float(I.quadratic_u(h, torch.ones(k, 1, dtype=torch.float64))[0])
    draws = I.quadratic_u(h, counts).numpy()
    cell = rep.sel(contrast="shifted - same", layer=1, site="hidden", modality="visual")
    assert float(cell["mmd_contrast"]) == pytest.approx(want, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(cell["mmd_contrast_boot"].values, draws, rtol=1e-9, atol=1e-12)
    lo, hi = np.quantile(draws, [0.025, 0.975])
    assert float(cell["mmd_contrast_lo"]) == pytest.approx(lo) and float(cell["mmd_contrast_hi"]) == pytest.approx(hi)
    below, above = (draws <= 0).sum(), (draws >= 0).sum()
    assert float(cell["mmd_contrast_p"]) == pytest.approx(min(1, 2 * (1 + min(below, above)) / (B + 1)))
    ratio = float(rep.mmd.sel(checkpoint="shifted", layer=1, site="hidden", modality="visual")) / float(
        rep.mmd.sel(checkpoint="same", layer=1, site="hidden", modality="visual"))
    assert float(cell["mmd_contrast_ratio"]) == pytest.approx(ratio)


def test_the_planted_layer_contrast_is_found_within_a_run_and_a_null_one_is_not(runs_report):
    r0 = runs_report.sel(run="seed-0", site="hidden", modality="visual")
    planted = r0.sel(contrast="shifted - same", layer=1)
    assert float(planted["mmd_contrast_lo"]) > 0 and float(planted["mmd_contrast_p"]) < 0.05
    null = r0.sel(contrast="shifted - same", layer=0)
    assert float(null["mmd_contrast_lo"]) < 0 < float(null["mmd_contrast_hi"])
    lc = r0.sel(layer_contrast="1 - 0", checkpoint="shifted")
    assert float(lc["mmd_layer_contrast"]) > 0 and float(lc["mmd_layer_contrast_p"]) < 0.05


def test_runs_stack_on_a_run_dim_with_across_run_inference_that_equals_run_stats(runs_report):
    rep = runs_report
    assert list(rep.run.values) == ["seed-0", "seed-1", "seed-2"] and rep.attrs["runs"] == list(rep.run.values)
    assert rep["mmd"].dims[0] == "run" and "run" not in rep["mmd_contrast_runs"].dims
    cell = dict(contrast="shifted - same", layer=1, site="hidden", modality="visual")
    st = C.run_stats(rep["mmd_contrast"].sel(**cell).values, rep["mmd_contrast_boot"].sel(**cell).values,
                     min_effect=0.01)
    for key, var in (("mean", "_runs"), ("lo", "_runs_lo"), ("hi", "_runs_hi"), ("p", "_runs_p"),
                     ("needed", "_runs_needed"), ("pmin", "_runs_pmin")):
        assert float(rep["mmd_contrast" + var].sel(**cell)) == pytest.approx(float(st[key]), rel=1e-12), key
    # independent reference: the per-run contrasts' mean and Student interval (probe variance added)
    d = rep["mmd_contrast"].sel(**cell).values
    v_probe = np.var(rep["mmd_contrast_boot"].sel(**cell).values.mean(0), ddof=1)
    se = np.sqrt(d.var(ddof=1) / 3 + v_probe)
    assert float(st["hi"]) == pytest.approx(d.mean() + stats_t(0.975, 2) * se, rel=1e-9)
    assert rep["mmd_contrast_runs"].attrs["covers"].startswith("training runs")
    assert rep["mmd_contrast_lo"].attrs["covers"].startswith("probe sampling only")
    for m in ("mmd", "paired_shift", "gap"):
        assert f"{m}_runs_lo" in rep and f"{m}_pmin" in rep and f"{m}_contrast_runs_needed" in rep


def stats_t(q, df):
    from scipy import stats

    return stats.t.ppf(q, df)


def test_a_report_with_runs_and_contrasts_round_trips_through_netcdf(runs_report, tmp_path):
    path = save_report(runs_report, tmp_path / "r.nc")
    back = load_report(path)
    xr.testing.assert_allclose(back[["mmd_contrast_runs", "mmd_boot"]], runs_report[["mmd_contrast_runs", "mmd_boot"]])
    assert back.attrs["runs"] == ["seed-0", "seed-1", "seed-2"] or list(back.attrs["runs"]) == list(runs_report.run.values)


def test_runs_needed_matches_the_power_tables():
    # one-sample two-sided t-test at 0.05, 80% power (Cohen 1988; G*Power): d = 1 -> 10, 0.8 -> 15, 0.5 -> 34
    got = C.runs_needed(np.array([1.0, 0.8, 0.5]), np.ones(3))
    np.testing.assert_array_equal(got, [10, 15, 34])
    assert C.runs_needed(0.0, 1.0) == np.inf
    assert C.runs_needed(0.1, 1.0, v_probe=1.0) == np.inf           # the probe set's own error dominates
    assert np.isnan(C.runs_needed(np.nan, 1.0))


def test_bootstrap_pvalue_is_the_interval_inversion():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 0.1, size=(4, 999))
    p = C.bootstrap_pvalue(d)
    for row, pv in zip(d, p):
        assert pv == pytest.approx(min(1, 2 * (1 + min((row <= 0).sum(), (row >= 0).sum())) / 1000))
    assert C.bootstrap_pvalue(np.zeros((1, 10)))[0] == 1.0
    g = C.bootstrap_pvalue(d, 0.3, "greater")
    assert np.all((g > 0.3) & (g < 0.7))
    assert np.isnan(C.bootstrap_pvalue(np.full((1, 5), np.nan))[0])


def test_trajectory_pairs_pair_steps_and_refuse_no_common_step():
    labels = ["base", "ko-1", "ko-2", "ko-3", "en-1", "en-2"]
    assert C.trajectory_pairs(labels, "ko-", "en-") == [("ko-1", "en-1"), ("ko-2", "en-2")]
    with pytest.raises(UsageError, match="no checkpoint pairs"):
        C.trajectory_pairs(labels, "ko-", "fr-")


def test_bad_contrasts_are_refused_naming_the_value(stores):
    rep = dl.drift(stores["seed-0"], reference="base", **KW)
    with pytest.raises(UsageError, match="'nope'"):
        C.contrasts(rep, [("shifted", "nope")])
    with pytest.raises(UsageError, match="with itself"):
        C.contrasts(rep, ["same:same"])
    with pytest.raises(UsageError, match="A:B"):
        C.contrasts(rep, ["same-shifted"])
    with pytest.raises(UsageError, match="at least 2 runs"):
        C.across_runs(C.combine_runs({"only": rep}))
    with pytest.raises(UsageError, match="sinkhorn"):
        C.contrasts(rep, ["same:shifted"], metrics=["sinkhorn"])


def test_runs_of_another_design_are_refused_naming_what_differs(stores):
    rep = dl.drift(stores["seed-0"], reference="base", **KW)
    other = rep.sel(checkpoint=["base", "shifted"])
    with pytest.raises(DataError, match="differ in checkpoint"):
        C.combine_runs({"a": rep, "b": other})
    reseeded = rep.copy()
    reseeded.attrs = {**rep.attrs, "seed": 7}
    with pytest.raises(DataError, match="differ in seed"):
        C.combine_runs({"a": rep, "b": reseeded})
    probes = rep.copy()
    probes.attrs = {**rep.attrs, "probe_set": "other"}
    with pytest.raises(DataError, match="probe_set"):
        C.combine_runs({"a": rep, "b": probes})


def test_min_effect_gives_a_test_that_can_come_out_no(stores):
    rep = dl.drift(stores["seed-0"], reference="base", min_effect={"mmd": 10.0, "paired_shift": 0.0}, **KW)
    assert "gap_pmin" not in rep
    p_big = rep["mmd_pmin"].sel(checkpoint="shifted", layer=1, site="hidden", modality="visual")
    assert float(p_big) > 0.5                                 # MMD^2 <= 2 < 10: "exceeds 10" is clearly false
    p_shift = rep["paired_shift_pmin"].sel(checkpoint="shifted", layer=1, site="hidden", modality="visual")
    assert float(p_shift) < 0.05
    with pytest.raises(UsageError, match="min_effect"):
        dl.drift(stores["seed-0"], reference="base", min_effect=float("nan"), **KW)


def test_the_bandwidth_scale_changes_sigma_and_is_recorded(stores):
    one = dl.drift(stores["seed-0"], reference="base", metrics=("mmd",), n_permutations=50, n_bootstrap=50,
                   progress=False)
    two = dl.drift(stores["seed-0"], reference="base", metrics=("mmd",), n_permutations=50, n_bootstrap=50,
                   progress=False, bandwidth_scale=2.0)
    np.testing.assert_allclose(two.sigma.values, 2 * one.sigma.values, rtol=1e-6)
    assert two.attrs["bandwidth_scale"] == 2.0
    with pytest.raises(dl.DriftError, match="bandwidth_scale"):
        dl.drift(stores["seed-0"], metrics=("mmd",), bandwidth_scale=0, progress=False)


def test_combining_reports_later_equals_computing_them_together(stores, runs_report):
    reps = {k: dl.drift(v, reference="base", **KW) for k, v in stores.items()}
    later = dl.drift.__globals__["compare_report"](C.combine_runs(reps), contrasts=[("shifted", "same")])
    xr.testing.assert_allclose(later["mmd_contrast_runs_lo"], runs_report["mmd_contrast_runs_lo"])


def test_the_xarray_path_equals_the_array_path_on_simulated_runs():
    reps = run_reports(RunsSpec(), 4, seed=3)
    comb = C.combine_runs(reps)
    comb = comb.merge(C.contrasts(comb, [("A", "B")]))
    ar = C.across_runs(comb)
    e, b = simulate_runs(RunsSpec(), 4, seed=3)
    st = C.run_stats(e[:, 1] - e[:, 2], b[:, 1] - b[:, 2])
    assert float(ar["mmd_contrast_runs_p"].sel(contrast="A - B")) == pytest.approx(float(st["p"]))
    assert float(ar["mmd_contrast_runs_lo"].sel(contrast="A - B")) == pytest.approx(float(st["lo"]))
