"""Calibration of the MMD permutation test and of the split-half null on synthetic data:
p-values are uniform when nothing changed, the test has power under a small mean shift, and
split-null z-scores stay small under the null."""
import numpy as np
import scipy.stats
import torch

from driftlens import metrics as M

N_SEEDS = 200


def _samples(seed, n=25, m=25, d=4, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64)
    y[:, 0] += shift
    return x, y


def test_mmd_test_p_values_uniform_under_null():
    ps = np.array([M.mmd_test(*_samples(s, n=25, m=30), n_permutations=200, seed=s).p_value
                   for s in range(N_SEEDS)])
    ks = scipy.stats.kstest(ps, "uniform")
    assert ks.pvalue > 0.01, (ks, np.sort(ps)[:10])
    # the size of the 5% test is about 5% (binomial 200, 0.05: 99.9% interval ~ [1, 22])
    assert 1 <= int((ps <= 0.05).sum()) <= 22


def test_mmd_test_has_power_for_small_mean_shift():
    ps = np.array([M.mmd_test(*_samples(1000 + s, n=60, m=60, shift=0.8), n_permutations=200,
                              seed=s).p_value for s in range(40)])
    assert (ps <= 0.05).mean() >= 0.8


def test_split_null_z_scores_small_under_null():
    zs = []
    for s in range(40):
        x, y = _samples(2000 + s, n=60, m=60, d=4)
        null = M.split_null(M.mmd2, x, n_splits=10, seed=s)
        zs.append(M.zscore(M.mmd2(x, y), null))
    zs = np.array(zs)
    assert np.isfinite(zs).all()
    assert np.mean(np.abs(zs)) < 2.0
    assert (np.abs(zs) > 3).mean() <= 0.1
    # and large under a shift
    x, y = _samples(3000, n=60, m=60, d=4, shift=1.5)
    assert M.zscore(M.mmd2(x, y), M.split_null(M.mmd2, x, n_splits=10)) > 3
