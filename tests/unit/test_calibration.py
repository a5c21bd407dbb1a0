"""Calibration by simulation on clustered tokens (driftlens.testing's hierarchical model).

Each replicate draws K clusters of correlated tokens (a cluster effect shared by the tokens of one
scene, as the tokens of one image are), observed at two checkpoints with their own cluster- and
token-level noise; "no change" is a paired, exchangeable null and a planted change moves every
checkpoint token by a fixed vector, whose population MMD^2 is known in closed form.

What must hold (issue: calibrated drift inference):
- no change: cluster sign-flip p-values uniform (KS p > 0.01 over >= 200 replicates), rejection
  rate at 0.05 within [0.02, 0.08];
- planted change: the 95% cluster-bootstrap interval covers the true effect in 90-98% of
  replicates; the effect's mean does not depend on the number of clusters while the interval
  narrows.
The same checks are run on the statistics the report used before (a token-level permutation
p-value and a split-half z-score on disjoint halves of the probe images) and must reject them:
these tests can fail.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from driftlens import inference as I
from driftlens import metrics as M
from driftlens.testing import ClusteredSpec, clustered_pair, pvalue_calibration, true_mmd2

pytestmark = pytest.mark.heavy      # simulations / CLI subprocesses: not in `dev.py test --fast`

# Share of a visual token's variance shared by its cluster, measured on the organism's store
# (base checkpoint, 72 scenes, hidden states of layers 0-3): 0.41-0.48 (bench/RESULTS.md). The
# simulated data must be at least as clustered.
ORGANISM_ICC = 0.48
NULL = ClusteredSpec(n_clusters=24, tokens_per_cluster=8, dim=6)
SIGMA = 2.0       # fixed bandwidth for the coverage checks, so the true effect is exact


def _t(a):
    return torch.as_tensor(a)


def _p_values(spec, shift, n, seed0=0, n_permutations=1000):
    out = []
    for s in range(n):
        r, c, cl = clustered_pair(spec, shift, seed=seed0 + s)
        out.append(I.paired_mmd(_t(r), _t(c), cl, n_permutations=n_permutations, n_bootstrap=10, seed=s).p)
    return np.array(out)


def _calibrated(check):
    return check["ks_p"] > 0.01 and 0.02 <= check["rejection_rate"] <= 0.08


def test_simulated_tokens_are_at_least_as_clustered_as_the_organism():
    assert NULL.icc >= ORGANISM_ICC
    r, _, cl = clustered_pair(NULL, seed=0)
    means = np.stack([r[cl == a].mean(0) for a in np.unique(cl)])
    icc = means.var(0).sum() / r.var(0).sum()
    assert icc > ORGANISM_ICC


def test_cluster_sign_flip_p_values_are_uniform_without_change():
    check = pvalue_calibration(_p_values(NULL, 0.0, 400))
    assert _calibrated(check), check


def test_old_token_permutation_p_value_fails_the_same_check():
    """The report's former mmd_p: token permutations between disjoint halves of the images."""
    ps = []
    for s in range(200):
        r, c, cl = clustered_pair(NULL, 0.0, seed=s)
        half = np.isin(cl, np.random.default_rng(s).permutation(np.unique(cl))[:NULL.n_clusters // 2])
        ps.append(M.mmd_test(_t(r[half]), _t(c[~half]), n_permutations=200, seed=s).p_value)
    check = pvalue_calibration(ps)
    assert not _calibrated(check), check
    assert check["rejection_rate"] > 0.5          # "drift" declared for most unchanged pairs


def test_old_split_z_score_fails_the_same_check():
    """The report's former {metric}_z: (mean over 20 group splits of value - null mean) / null std."""
    ps = []
    for s in range(200):
        r, c, cl = clustered_pair(NULL, 0.0, seed=s)
        rt, ct = _t(r), _t(c)
        sigma = M.median_sigma(rt, pairs="reference")
        rng = np.random.default_rng(s)
        nulls, values = [], []
        for _ in range(20):
            a = np.isin(cl, rng.permutation(np.unique(cl))[:NULL.n_clusters // 2])
            nulls.append(M.mmd2(rt[a], rt[~a], sigma=sigma))
            values.append(M.mmd2(rt[a], ct[~a], sigma=sigma))
        z = (np.mean(values) - np.mean(nulls)) / np.std(nulls, ddof=1)
        ps.append(stats.norm.sf(z))               # what "z > 1.645" claims as a 5% test
    assert not _calibrated(pvalue_calibration(ps))


@pytest.mark.parametrize("k", [48])
def test_interval_covers_the_true_effect(k):
    spec = ClusteredSpec(n_clusters=k, tokens_per_cluster=8, dim=6)
    truth = true_mmd2(spec, 0.8, SIGMA)
    hits = []
    for s in range(300):
        r, c, cl = clustered_pair(spec, 0.8, seed=10_000 + s)
        res = I.paired_mmd(_t(r), _t(c), cl, sigma=SIGMA, n_permutations=10, n_bootstrap=1000, seed=s)
        hits.append(res.lo <= truth <= res.hi)
    assert 0.90 <= np.mean(hits) <= 0.98, np.mean(hits)


def test_effect_does_not_depend_on_the_number_of_clusters():
    truth, out = None, {}
    for k in (16, 144):
        spec = ClusteredSpec(n_clusters=k, tokens_per_cluster=8, dim=6)
        truth = true_mmd2(spec, 0.8, SIGMA)
        res = []
        for s in range(150):
            r, c, cl = clustered_pair(spec, 0.8, seed=20_000 + s)
            res.append(I.paired_mmd(_t(r), _t(c), cl, sigma=SIGMA, n_permutations=10, n_bootstrap=400, seed=s))
        eff = np.array([x.effect for x in res])
        out[k] = (eff.mean(), eff.std(ddof=1) / np.sqrt(len(eff)), np.mean([x.hi - x.lo for x in res]))
    (m16, se16, w16), (m144, se144, w144) = out[16], out[144]
    assert abs(m16 - m144) < 4 * np.hypot(se16, se144), out     # no trend with probe count
    assert abs(m144 - truth) < 4 * se144 and abs(m16 - truth) < 4 * se16, (out, truth)
    assert w144 < 0.5 * w16, out                                 # while the interval narrows (~1/3)


def test_paired_shift_interval_covers_its_true_value():
    spec = ClusteredSpec(n_clusters=48, tokens_per_cluster=8, dim=6)
    d, shift = spec.dim, 0.8
    disp = 2 * d * (spec.checkpoint_cluster_var + spec.checkpoint_token_var) + shift ** 2
    truth = np.sqrt(disp / (2 * d * spec.total_var))
    hits = []
    for s in range(300):
        r, c, cl = clustered_pair(spec, shift, seed=30_000 + s)
        _, lo, hi = I.paired_shift(_t(r), _t(c), cl, n_bootstrap=1000, seed=s)
        hits.append(lo <= truth <= hi)
    assert 0.90 <= np.mean(hits) <= 0.98, np.mean(hits)


def test_token_level_test_is_calibrated_where_rows_are_independent():
    """metrics.mmd_test stays right for independent rows (iid samples, no clusters)."""
    ps = []
    for s in range(200):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(25, 4, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g, dtype=torch.float64)
        ps.append(M.mmd_test(x, y, n_permutations=200, seed=s).p_value)
    assert _calibrated(pvalue_calibration(ps))


def test_power_grows_with_the_planted_change():
    spec = ClusteredSpec(n_clusters=24, tokens_per_cluster=8, dim=6)
    power = []
    for shift in (0.3, 0.9):
        power.append(np.mean(_p_values(spec, shift, 60, seed0=40_000, n_permutations=200) <= 0.05))
    assert power[0] < power[1] and power[1] >= 0.9, power
