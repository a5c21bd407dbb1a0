"""Calibration of the routing-drift statistics by simulation on clustered routing distributions.

Each replicate draws K clusters of tokens routed over E experts: a token's router logits are a
cluster effect ``u_a`` shared at both checkpoints, a cluster-level deviation (``w_a`` at the
reference, an independent ``w'_a`` at the checkpoint: the tokens of one scene move together) and
token noise; the routing distribution is their softmax. "No change" is the paired, exchangeable
null (swapping the two checkpoints' tokens of a cluster leaves the joint law unchanged: the expert
load is the same); a planted change adds a fixed vector to the checkpoint's logits, and the true
``route_load`` (``|E q - E p|^2``) and ``route_js`` (``E JS(p_i, q_i)``) are computed by Monte
Carlo on a million tokens.

What must hold: cluster sign-flip p-values of ``route_load`` uniform without change (KS p > 0.01,
rejection rate at 0.05 in [0.02, 0.08]); the 95% cluster-bootstrap intervals of ``route_load`` and
``route_js`` cover their true values in 90-98% of replicates. The same checks run with every token
its own cluster (token-level sign flips and bootstrap: the broken variant) must fail.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from driftlens import inference as I
from driftlens.testing import pvalue_calibration

pytestmark = pytest.mark.heavy      # simulations: not in `dev.py test --fast`

SHIFT = np.array([0.8, 0.0, -0.4, 0.0])      # the planted change of the checkpoint's router logits


@dataclass(frozen=True)
class RoutingSpec:
    """Clustered router logits: cluster effect, per-checkpoint cluster deviation, token noise (std)."""

    n_clusters: int = 24
    tokens_per_cluster: int = 8
    experts: int = 4
    cluster_sd: float = 1.0
    deviation_sd: float = 0.6
    token_sd: float = 0.4


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def simulate(spec: RoutingSpec, shift=None, seed: int = 0):
    """(reference, checkpoint, clusters): routing distributions [n, E] of the same tokens, cluster labels [n]."""
    rng = np.random.default_rng(seed)
    k, m, e = spec.n_clusters, spec.tokens_per_cluster, spec.experts
    u = np.repeat(rng.normal(scale=spec.cluster_sd, size=(k, e)), m, 0)

    def side():
        return u + np.repeat(rng.normal(scale=spec.deviation_sd, size=(k, e)), m, 0) \
            + rng.normal(scale=spec.token_sd, size=(k * m, e))

    ref, ck = side(), side()
    if shift is not None:
        ck = ck + shift
    return _softmax(ref), _softmax(ck), np.repeat(np.arange(k), m)


def truth(spec: RoutingSpec, shift, n: int = 1_000_000, seed: int = 12345) -> dict[str, float]:
    """True route_load and route_js of the planted change (Monte Carlo, common random numbers)."""
    rng = np.random.default_rng(seed)
    e = spec.experts
    u = rng.normal(scale=spec.cluster_sd, size=(n, e))
    x = u + rng.normal(scale=spec.deviation_sd, size=(n, e)) + rng.normal(scale=spec.token_sd, size=(n, e))
    y = u + rng.normal(scale=spec.deviation_sd, size=(n, e)) + rng.normal(scale=spec.token_sd, size=(n, e))
    p, q = _softmax(x), _softmax(y + shift)
    load = float(((_softmax(y + shift) - _softmax(y)).mean(0) ** 2).sum())      # E q - E p, same law of x and y
    js = float(I.js_bits(torch.as_tensor(p), torch.as_tensor(q)).mean())
    return {"route_load": load, "route_js": js}


def _run(r, c, cl, token_level: bool, seed: int, n_permutations=1000, n_bootstrap=1000):
    clusters = np.arange(len(cl)) if token_level else cl       # the broken variant: every token its own unit
    return I.paired_routing(torch.as_tensor(r), torch.as_tensor(c), clusters, n_permutations=n_permutations,
                            n_bootstrap=n_bootstrap, seed=seed)


def _null_check(token_level: bool, n: int = 300):
    spec = RoutingSpec()
    ps = [_run(*simulate(spec, seed=s), token_level, s, n_bootstrap=10)["route_load"].p for s in range(n)]
    return pvalue_calibration(ps)


def _calibrated(check):
    return check["ks_p"] > 0.01 and 0.02 <= check["rejection_rate"] <= 0.08


def test_route_load_p_values_are_uniform_without_change():
    check = _null_check(token_level=False)
    assert _calibrated(check), check


def test_token_level_route_load_p_values_fail_the_same_check():
    check = _null_check(token_level=True, n=200)
    assert not _calibrated(check), check
    assert check["rejection_rate"] > 0.2, check      # "the routing changed" for many unchanged pairs


def _coverage(token_level: bool, n: int = 300) -> dict[str, float]:
    spec = RoutingSpec(n_clusters=48)
    want = truth(spec, SHIFT)
    hits = {m: [] for m in want}
    for s in range(n):
        res = _run(*simulate(spec, SHIFT, seed=50_000 + s), token_level, s, n_permutations=10)
        for m, t in want.items():
            hits[m].append(res[m].lo <= t <= res[m].hi)
    return {m: float(np.mean(h)) for m, h in hits.items()}


def test_intervals_cover_the_true_routing_change():
    cover = _coverage(token_level=False)
    assert all(0.90 <= v <= 0.98 for v in cover.values()), cover


def test_token_level_intervals_undercover():
    cover = _coverage(token_level=True, n=200)
    assert all(v < 0.85 for v in cover.values()), cover


def test_simulated_routing_is_clustered_and_the_planted_change_is_not_trivial():
    spec = RoutingSpec()
    r, _, cl = simulate(spec, seed=0)
    means = np.stack([r[cl == a].mean(0) for a in np.unique(cl)])
    assert means.var(0).sum() / r.var(0).sum() > 0.5            # most routing variance is between clusters
    t = truth(spec, SHIFT, n=200_000)
    assert t["route_load"] > 0.005 and 0.02 < t["route_js"] < 0.5, t
