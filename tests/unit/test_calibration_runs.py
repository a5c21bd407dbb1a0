"""Calibration of comparative inference by simulation: contrasts within a run and across training runs.

Hierarchical data (driftlens.testing.RunsSpec): one probe set per replicate (clusters with a
per-scene susceptibility), several training runs of one design, two checkpoints ``A`` and ``B``
drifting from a shared reference with a random run effect whose spread is about 8x one run's
interval half-width (the organism's is a median 11x, range 4.5-23x). Per run the paired cluster MMD^2 and its
bootstrap draws come from the report's own cell code; the across-run statistics are
``driftlens.compare.run_stats`` (what ``across_runs`` computes for every report variable).

Each check is first shown to reject a broken variant: the across-run test with probe-sampling
variance only (what a single run's interval is), with a normal instead of a Student quantile, and
the within-run contrast with tokens as the resampling unit.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from driftlens.compare import bootstrap_pvalue, run_stats
from driftlens.testing import RunsSpec, simulate_contrasts

pytestmark = pytest.mark.heavy

N_NULL = 400
RUNS = (3, 5, 8)
ALPHA = 0.05


@pytest.fixture(scope="module")
def null_runs():
    return simulate_contrasts(RunsSpec(), N_NULL, max(RUNS))


def _reject(d, db, n_runs, stat=run_stats):
    return np.array([stat(d[i, :n_runs], db[i, :n_runs])["p"] <= ALPHA for i in range(len(d))])


def _probe_only(values, draws):
    """Broken: the across-run mean with the probe-sampling variance only (a single run's view)."""
    mean = values.mean(0)
    se = np.sqrt(np.var(np.nanmean(draws, 0), axis=-1, ddof=1))
    return {"p": 2 * stats.norm.sf(abs(mean) / se)}


def _normal_quantile(values, draws):
    """Broken: the right standard error with a normal instead of Student's quantile."""
    st = run_stats(values, draws, needed=False)
    return {"p": 2 * stats.norm.sf(abs(st["mean"]) / st["se"])}


def test_the_simulated_run_spread_is_like_the_organisms(null_runs):
    d, db = null_runs
    lo, hi = np.quantile(db, [0.025, 0.975], axis=-1)
    ratio = d.std(axis=1, ddof=1) / np.median((hi - lo) / 2, axis=1)
    assert 5 < np.median(ratio) < 15


@pytest.mark.parametrize("n_runs", RUNS)
def test_the_across_run_test_holds_its_level_and_a_single_runs_view_does_not(null_runs, n_runs):
    d, db = null_runs
    fpr = _reject(d, db, n_runs).mean()
    assert 0.02 <= fpr <= 0.08, fpr
    # a single run's intervals ignore the run-to-run spread: they call most null contrasts real
    assert _reject(d, db, n_runs, _probe_only).mean() > 0.5
    within = np.mean(bootstrap_pvalue(db[:, :n_runs]) <= ALPHA)
    assert within > 0.5, within


def test_a_normal_quantile_with_three_runs_is_too_liberal(null_runs):
    d, db = null_runs
    assert _reject(d, db, 3, _normal_quantile).mean() > 0.08


def test_the_across_run_test_holds_with_heavy_tailed_run_effects():
    d, db = simulate_contrasts(RunsSpec(run_df=3.0), 250, 5, seed0=10_000)
    fpr = _reject(d, db, 5).mean()
    assert fpr <= 0.08, fpr


def test_the_within_run_contrast_is_calibrated_for_probe_sampling():
    """No run effect and equal drift: the within-run p of A - B is uniform; token units are not.

    Each checkpoint has its own per-scene susceptibility, so the contrast varies between clusters
    (the case where treating tokens as independent goes wrong)."""
    spec = RunsSpec(run_sd=0.0, tokens_per_cluster=4, checkpoint_cluster_sd=0.3)
    d, db = simulate_contrasts(spec, N_NULL, 1, seed0=20_000)
    p = bootstrap_pvalue(db[:, 0])
    assert 0.02 <= np.mean(p <= ALPHA) <= 0.08
    _, db_tok = simulate_contrasts(spec, N_NULL, 1, seed0=20_000, token_units=True)
    assert np.mean(bootstrap_pvalue(db_tok[:, 0]) <= ALPHA) > 0.12


def test_the_across_run_interval_covers_a_planted_difference():
    spec = RunsSpec(drift_a=1.3, drift_b=1.0)
    truth_d, _ = simulate_contrasts(spec, 1500, 1, seed0=30_000)         # fresh probe set and run each time
    truth = truth_d.mean()                                         # E over runs and probe sets
    d, db = simulate_contrasts(spec, 800, max(RUNS), seed0=40_000)
    assert abs(truth) > 10 * truth_d.std() / np.sqrt(len(truth_d))   # a difference that is there
    for n_runs in RUNS:
        cover, cover_probe = [], []
        for i in range(len(d)):
            st = run_stats(d[i, :n_runs], db[i, :n_runs], needed=False)
            cover.append(st["lo"] <= truth <= st["hi"])
            half = 1.96 * np.sqrt(np.var(np.nanmean(db[i, :n_runs], 0), ddof=1))
            cover_probe.append(abs(d[i, :n_runs].mean() - truth) <= half)
        assert 0.90 <= np.mean(cover) <= 0.98, (n_runs, np.mean(cover))
        assert np.mean(cover_probe) < 0.5, (n_runs, np.mean(cover_probe))
