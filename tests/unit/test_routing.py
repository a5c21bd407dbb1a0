"""Routing-drift statistics of mixture-of-experts decoders, against independent naive computations.

``route_js`` (mean per-token Jensen-Shannon divergence, clusters weighted equally) is checked
against scipy's ``jensenshannon``; ``route_load`` (the cluster U-statistic of the mean routing
change) against a double loop over cluster pairs; the expert cells' subset U-statistic against the
U-statistic of the subset itself, with draws paired to the full-K draws of every other cell.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from driftlens import inference as I
from driftlens.stats import routing as cells


def _routing(seed, n_clusters=12, per=5, experts=6):
    rng = np.random.default_rng(seed)
    cl = np.repeat([f"s{a}" for a in range(n_clusters)], per)
    logits = rng.normal(size=(len(cl), experts)) + np.repeat(rng.normal(size=(n_clusters, experts)), per, 0)
    r = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    moved = logits + rng.normal(scale=0.7, size=logits.shape) + np.array([0.5] + [0.0] * (experts - 1))
    c = np.exp(moved) / np.exp(moved).sum(1, keepdims=True)
    return r, c, cl


@pytest.mark.parametrize("seed", [0, 1])
def test_paired_routing_matches_naive_formulas(seed):
    r, c, cl = _routing(seed)
    got = I.paired_routing(torch.as_tensor(r), torch.as_tensor(c), cl, n_permutations=50, n_bootstrap=50, seed=seed)
    labels = list(dict.fromkeys(cl))
    js = np.array([jensenshannon(r[i], c[i], base=2) ** 2 for i in range(len(cl))])
    naive_js = np.mean([js[cl == a].mean() for a in labels])
    assert got["route_js"].effect == pytest.approx(naive_js, rel=1e-10)
    assert np.isnan(got["route_js"].p)
    d = [(c[cl == a] - r[cl == a]).mean(0) for a in labels]
    k = len(labels)
    naive_load = sum(d[a] @ d[b] for a in range(k) for b in range(k) if a != b) / (k * (k - 1))
    assert got["route_load"].effect == pytest.approx(naive_load, rel=1e-10)
    assert 0 < got["route_load"].p <= 1 and got["route_load"].lo <= got["route_load"].hi


def test_routing_is_zero_for_the_same_routing_and_bounded_by_one_bit():
    r, _, cl = _routing(3)
    same = I.paired_routing(torch.as_tensor(r), torch.as_tensor(r), cl, n_permutations=20, n_bootstrap=20)
    assert same["route_js"].effect == 0.0 and same["route_load"].effect == 0.0
    onehot = np.eye(6)[np.arange(len(cl)) % 3]
    other = np.eye(6)[np.arange(len(cl)) % 3 + 3]                 # disjoint experts: 1 bit per token
    far = I.paired_routing(torch.as_tensor(onehot), torch.as_tensor(other), cl, n_permutations=20, n_bootstrap=20)
    assert far["route_js"].effect == pytest.approx(1.0, abs=1e-12)


def test_float16_rounding_of_stored_distributions_is_renormalized():
    r, c, cl = _routing(4)
    exact = I.paired_routing(torch.as_tensor(r), torch.as_tensor(c), cl, n_permutations=20, n_bootstrap=20)
    half = I.paired_routing(torch.as_tensor(r).half(), torch.as_tensor(c).half(), cl, n_permutations=20,
                            n_bootstrap=20)
    assert half["route_js"].effect == pytest.approx(exact["route_js"].effect, rel=2e-2)


def test_subset_u_statistic_is_the_u_statistic_of_the_subset_with_paired_draws():
    rng = np.random.default_rng(5)
    k, b = 9, 40
    a = rng.normal(size=(k, 3))
    h = torch.as_tensor(a @ a.T)
    present = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    flips, counts = I.sign_flips(k, b, 0), I.bootstrap_counts(k, b, 1)
    got, draws = I.subset_u_draws(h, present, flips, counts)
    idx = torch.nonzero(present).reshape(-1)
    sub, _ = I.u_statistic_draws(h[idx][:, idx], flips[idx], counts[idx])
    assert got.effect == pytest.approx(sub.effect, rel=1e-12) and got.p == sub.p and got.n_clusters == 6
    # draw b weights the present clusters by the full-K counts of column b (paired with every other cell)
    for j in range(b):
        w = counts[idx, j].numpy()
        den = w.sum() ** 2 - (w * w).sum()
        hs = h[idx][:, idx].numpy().copy()
        np.fill_diagonal(hs, 0.0)
        want = (w @ hs @ w) / den if den > 0 else np.nan
        assert (np.isnan(want) and np.isnan(draws[j])) or draws[j] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 clusters with rows"):
        I.subset_u_draws(h, torch.tensor([1] + [0] * 8, dtype=torch.bool), flips, counts)


def test_top_k_members():
    route = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert cells.top_k_members(route, 1).tolist() == [[False, True, False], [True, False, False]]
    assert cells.top_k_members(route, 2).tolist() == [[False, True, True], [True, False, True]]
    assert cells.top_k_members(route, 5).all()


# ----------------------------------------------------------------------------- the report's routing cells


def _moe_store(path, n_clusters=16, per=6, experts=4, dim=8, seed=0):
    """A store with ``hidden`` and ``route`` at 2 layers (layer 0 dense: route NaN), checkpoints base / moved."""
    from driftlens.store import ActivationStore

    rng = np.random.default_rng(seed)
    n = n_clusters * per
    cl = np.repeat([f"s{a}" for a in range(n_clusters)], per)
    tok = {"sample": np.array([f"{c}-p" for c in cl]), "group": cl, "cluster": cl,
           "position": np.tile(np.arange(per), n_clusters),
           "modality": np.where(np.tile(np.arange(per), n_clusters) < 4, "visual", "text"), "lang": np.full(n, "en")}
    meta = {"model_type": "qwen3_vl_moe", "family": "qwen3_vl_moe", "probe_set": "synthetic", "probe_fingerprint": "x",
            "n_layers": 2, "layers": [0, 1], "sites": ["hidden", "route"], "dims": {"hidden": dim, "route": experts},
            "dtype": "float32", "token_selection": "all", "route_layers": [1], "route_top_k": 2,
            "route_scores": "softmax"}
    store = ActivationStore(path, meta, tok)
    hidden = rng.normal(size=(2, n, dim)) + np.repeat(rng.normal(size=(2, n_clusters, dim)), per, 1)
    logits = rng.normal(size=(n, experts)) + np.repeat(rng.normal(size=(n_clusters, experts)), per, 0)
    for label, move in (("base", 0.0), ("moved", 1.0)):
        i = store.slot(label)
        h = hidden + move * rng.normal(scale=0.3, size=hidden.shape)
        lg = logits + move * np.array([1.0, 0.0, -0.5, 0.0])
        route = np.stack([np.full((n, experts), np.nan), np.exp(lg) / np.exp(lg).sum(1, keepdims=True)])
        store.write("hidden", i, 0, h.astype(np.float32))
        store.write("route", i, 0, route.astype(np.float32))
        store.mark_complete(label)
    return store.path


def test_report_routing_cells_equal_the_cluster_functions(tmp_path):
    import warnings

    import driftlens as dl
    from driftlens import metrics as M

    ds = dl.open_store(_moe_store(tmp_path / "moe.zarr"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = dl.drift(ds, metrics=("mmd", "route_js", "route_load", "expert_mmd"), n_permutations=100,
                       n_bootstrap=100, progress=False)
    assert rep.route_js.sel(layer=0).isnull().all() and rep.expert_mmd.sel(layer=0).isnull().all()   # dense
    vis = ds.modality.values == "visual"
    r = torch.as_tensor(ds.route.sel(checkpoint="base", layer=1).values[vis])
    c = torch.as_tensor(ds.route.sel(checkpoint="moved", layer=1).values[vis])
    want = I.paired_routing(r, c, ds.cluster.values[vis], n_permutations=100, n_bootstrap=100)
    cell = rep.sel(checkpoint="moved", layer=1, modality="visual")
    for m in ("route_js", "route_load"):
        assert float(cell[m]) == pytest.approx(want[m].effect, rel=1e-9)
        assert float(cell[m + "_lo"]) == pytest.approx(want[m].lo, rel=1e-9)
    assert float(cell.route_load_p) == pytest.approx(want["route_load"].p)
    # an expert cell: the paired cluster MMD^2 of the tokens the reference routes to that expert (top-2)
    member = cells.top_k_members(r, 2).numpy()
    h = ds.hidden.sel(layer=1).values
    hv_r, hv_c = torch.as_tensor(h[0][vis]), torch.as_tensor(h[1][vis])
    centre = hv_r.mean(0, dtype=torch.float64).float()
    sigma = float(rep.sigma.sel(layer=1, site="hidden", modality="visual"))
    assert sigma == pytest.approx(M.median_sigma(hv_r - centre, pairs="reference", seed=0))
    for e in range(4):
        clusters = ds.cluster.values[vis][member[:, e]]
        assert int(rep.expert_clusters.sel(layer=1, modality="visual", expert=e)) == len(set(clusters))
        got = float(cell.expert_mmd.sel(site="hidden", expert=e))
        if len(set(clusters)) < rep.attrs["expert_min_clusters"]:
            assert np.isnan(got) and "expert(s)" in rep.attrs["warnings"]
            continue
        direct = I.paired_mmd(hv_r[member[:, e]] - centre, hv_c[member[:, e]] - centre, clusters, sigma=sigma,
                              n_permutations=10, n_bootstrap=10).effect
        assert got == pytest.approx(direct, rel=1e-4)          # float32 kernels, centred on other means
    assert not [w for w in caught if "route" in str(w.message)]


def test_routing_metrics_without_the_route_site_are_skipped_and_route_is_no_report_site(tmp_path):
    import driftlens as dl
    from driftlens.errors import DriftError
    from driftlens.testing import make_store

    ds = dl.open_store(make_store(tmp_path / "s.zarr", n_clusters=6))
    with pytest.warns(UserWarning, match=r"\['route_js', 'expert_mmd'\] need the site 'route'.*skipped"):
        rep = dl.drift(ds, metrics=("mmd", "route_js", "expert_mmd"), n_permutations=20, n_bootstrap=20,
                       progress=False)
    assert "mmd" in rep and "route_js" not in rep and "expert" not in rep.dims
    moe = dl.open_store(_moe_store(tmp_path / "moe.zarr"))
    with pytest.raises(DriftError, match="site 'route' holds routing distributions"):
        dl.drift(moe, metrics=("mmd",), sites=("route",), progress=False)
