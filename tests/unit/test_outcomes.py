"""driftlens.outcomes: per-cluster displacement against an independent float64 computation and the
report's paired shift; the across-cluster association against scipy, and calibrated by simulation
(no association -> uniform p; the same test on rows of one cluster treated as units is not)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import driftlens as dl
from driftlens import inference as I
from driftlens.errors import UsageError
from driftlens.outcomes import _ranks, association, cluster_displacement
from driftlens.testing.synthetic import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("o") / "s.zarr", n_clusters=12, renders=2, n_visual=5, n_text=3,
                      dim=8, n_layers=2, shift=4.0)


def _reference_displacement(r, c, labels):
    """Independent float64: per cluster sqrt(mean |c - r|^2 / mean over a != b of mean_{i in a, j in b} |r_i - r_j|^2)."""
    r, c = r.astype(np.float64), c.astype(np.float64)
    names = list(dict.fromkeys(labels))
    idx = [np.flatnonzero(labels == a) for a in names]
    disp = np.array([((c[i] - r[i]) ** 2).sum(1).mean() for i in idx])
    d2 = ((r[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    pairs = [d2[np.ix_(ia, ib)].mean() for a, ia in enumerate(idx) for b, ib in enumerate(idx) if a != b]
    return names, np.sqrt(disp / np.mean(pairs))


def test_cluster_displacement_matches_a_float64_computation_and_the_reports_shift(store):
    ds = dl.open_store(store)
    got = cluster_displacement(ds, "base", "shifted")
    assert got.dims == ("layer", "cluster") and got.sizes["cluster"] == 12
    vis = np.asarray(ds.modality.values) == "visual"
    labels = np.asarray(ds.cluster.values)[vis]
    for layer in (0, 1):
        r = ds.hidden.sel(checkpoint="base", layer=layer).values[vis]
        c = ds.hidden.sel(checkpoint="shifted", layer=layer).values[vis]
        names, ref = _reference_displacement(r, c, labels)
        assert list(got.cluster.values) == names
        np.testing.assert_allclose(got.sel(layer=layer).values, ref, rtol=1e-6)
    # the shift was planted at layer 1's visual tokens: every cluster moved more there
    assert (got.sel(layer=1) > got.sel(layer=0)).all()
    # sqrt(mean of squares) is the report's paired_shift of the cell
    rep = dl.drift(ds, reference="base", metrics=("paired_shift",), sites=("hidden",), n_bootstrap=20, progress=False)
    shift = rep.paired_shift.sel(checkpoint="shifted", site="hidden", modality="visual").values
    np.testing.assert_allclose(np.sqrt((got.values ** 2).mean(1)), shift, rtol=1e-6)
    text = cluster_displacement(store, "base", "same", modality="text", layers=[1])      # a path works too
    assert text.sizes["layer"] == 1 and (text.values > 0).all()
    fin = cluster_displacement(ds, "base", "shifted", site="final")
    assert fin.dims == ("cluster",)


def test_cluster_displacement_refuses_bad_requests(store):
    ds = dl.open_store(store)
    with pytest.raises(UsageError, match="'ko-5' is not a checkpoint.*'base', 'same', 'shifted'"):
        cluster_displacement(ds, "base", "ko-5")
    with pytest.raises(UsageError, match="site 'query'"):
        cluster_displacement(ds, "base", "same", site="query")
    with pytest.raises(UsageError, match="layers"):
        cluster_displacement(ds, "base", "same", layers=[7])
    with pytest.raises(UsageError, match="no layers"):
        cluster_displacement(ds, "base", "same", site="final", layers=[0])


def test_ranks_are_scipys_average_ranks():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=(50, 17)).astype(float)          # many ties
    np.testing.assert_array_equal(_ranks(a), stats.rankdata(a, axis=1))


def test_association_effect_and_interval_match_scipy_on_resamples():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 8, size=30).astype(float)                # ties
    y = 0.5 * x + rng.normal(size=30)
    for method, ref in (("spearman", stats.spearmanr), ("pearson", stats.pearsonr)):
        got = association(x, y, method=method, n_bootstrap=200, n_permutations=50, seed=3)
        assert got.effect == pytest.approx(ref(x, y)[0], abs=1e-12) and got.n_clusters == 30
        counts = I.bootstrap_counts(30, 200, 4).numpy().astype(int)            # the draws association uses
        boot = []
        for j in range(200):
            idx = np.repeat(np.arange(30), counts[:, j])
            boot.append(ref(x[idx], y[idx])[0])
        lo, hi = np.quantile(boot, [0.025, 0.975])
        assert (got.lo, got.hi) == pytest.approx((lo, hi), abs=1e-10)


def test_association_p_matches_an_exact_permutation_test():
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.7, 0.4, 0.3])
    y = np.array([0.2, 0.4, 0.1, 0.8, 0.3, 0.6, 0.5])

    def rho(a):
        return stats.spearmanr(a, y)[0]

    exact = stats.permutation_test((x,), rho, permutation_type="pairings", n_resamples=np.inf,
                                   alternative="two-sided").pvalue
    got = association(x, y, n_permutations=20000, n_bootstrap=10)
    assert got.p == pytest.approx(exact, abs=0.01)


def test_association_averages_rows_per_cluster_and_matches_labels():
    rng = np.random.default_rng(2)
    labels = np.repeat([f"s{i}" for i in range(10)], 3)
    x, y = rng.normal(size=30), rng.normal(size=30)
    means = {f"s{i}": (x[3 * i:3 * i + 3].mean(), y[3 * i:3 * i + 3].mean()) for i in range(10)}
    a = association(x, y, labels, n_bootstrap=50, n_permutations=99)
    b = association({k: v[0] for k, v in means.items()}, {k: v[1] for k, v in reversed(means.items())},
                    n_bootstrap=50, n_permutations=99)
    assert a == b


def test_association_refuses_bad_input():
    x = np.arange(5.0)
    with pytest.raises(UsageError, match="same length"):
        association(x, np.arange(4.0))
    with pytest.raises(UsageError, match="non-finite"):
        association(x, np.array([1, 2, np.nan, 4, 5.0]))
    with pytest.raises(UsageError, match="constant"):
        association(x, np.ones(5))
    with pytest.raises(UsageError, match="at least 3"):
        association(x[:2], x[:2])
    with pytest.raises(UsageError, match="different clusters"):
        association({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2, "d": 3})
    with pytest.raises(UsageError, match="method"):
        association(x, x, method="kendall")


def _null_pvalues(clustered: bool, reps: int = 300, k: int = 30, m: int = 3, seed: int = 0) -> np.ndarray:
    """p-values under no association: x and y independent, each with a strong cluster effect."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), m)
    out = []
    for r in range(reps):
        x = np.repeat(rng.normal(size=k), m) + 0.3 * rng.normal(size=k * m)
        y = np.repeat(rng.normal(size=k), m) + 0.3 * rng.normal(size=k * m)
        res = association(x, y, labels if clustered else None, n_bootstrap=1, n_permutations=199, seed=r)
        out.append(res.p)
    return np.asarray(out)


def test_association_is_calibrated_with_clusters_and_not_with_rows_as_units():
    """No association: the cluster-level p is uniform (false-positive rate 0.02-0.08 at 0.05); the same
    permutation test on images (three per cluster, treated as independent) rejects far more often."""
    p = _null_pvalues(clustered=True)
    assert 0.02 <= np.mean(p <= 0.05) <= 0.08
    assert stats.kstest(p, "uniform").pvalue > 0.01
    broken = _null_pvalues(clustered=False)
    assert np.mean(broken <= 0.05) > 0.15


def test_association_interval_covers_a_planted_correlation():
    rng = np.random.default_rng(5)
    rho, k, hits = 0.5, 60, 0
    for r in range(200):
        u = rng.normal(size=k)
        v = rho * u + np.sqrt(1 - rho ** 2) * rng.normal(size=k)
        res = association(u, v, method="pearson", n_bootstrap=300, n_permutations=1, seed=r)
        hits += res.lo <= rho <= res.hi
    assert 0.85 <= hits / 200 <= 0.99
