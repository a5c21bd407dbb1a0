"""Mixture-of-experts routing: ``route_js``, ``route_load`` and ``expert_mmd``, with their cells.

``route_js`` and ``route_load`` compare the same tokens' routing distributions over experts (store
site ``route``) at the reference and at a checkpoint; ``expert_mmd`` is the paired cluster MMD^2
restricted to the tokens the reference routes to one expert.
"""
from __future__ import annotations

import numpy as np
import torch

from driftlens.errors import DriftError, UsageError
from driftlens.stats.kernels import paired_mmd_matrix
from driftlens.stats.resampling import (
    Inference,
    Rows,
    bootstrap_counts,
    check_clusters,
    cluster_codes,
    cluster_mean_draws,
    cluster_sums,
    draws,
    gram_rows,
    sign_flips,
    subset_u_draws,
    u_statistic_draws,
    u_statistic_inference,
)
from driftlens.stats.settings import Cell, Settings


def route_distributions(a: torch.Tensor) -> torch.Tensor:
    """Rows of routing probabilities [n, E] as float64 distributions (negatives from storage rounding
    clipped, rows renormalized to sum 1)."""
    a = a.to(torch.float64).clamp(min=0.0)
    return a / a.sum(1, keepdim=True).clamp(min=1e-300)


def js_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence in bits between distributions ``p``, ``q`` [n, E] -> [n] (0 log 0 = 0)."""
    m = (p + q) / 2

    def kl(a):
        ratio = torch.where(a > 0, a / m.clamp(min=1e-300), torch.ones_like(a))
        return (a * torch.log2(ratio)).sum(1)

    return ((kl(p) + kl(q)) / 2).clamp(min=0.0)


def routing_terms(r: torch.Tensor, c: torch.Tensor, codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster terms of the routing metrics from the same tokens' routing at the reference (``r``) and
    the checkpoint (``c``), [n, E] each.

    Returns
    -------
    js : tensor [K] float64
        Mean over the cluster's tokens of the per-token Jensen-Shannon divergence (bits).
    delta : tensor [K, E] float64
        Mean over the cluster's tokens of ``c_i - r_i`` (``D_a`` of ``route_load``).
    """
    p, q = route_distributions(r), route_distributions(c)
    codes = codes.to(p.device)
    n = cluster_sums(torch.ones(p.shape[0], dtype=torch.float64, device=p.device), codes, k).clamp(min=1.0)
    js = cluster_sums(js_bits(p, q), codes, k) / n
    delta = cluster_sums(q - p, codes, k) / n[:, None]
    return js.cpu(), delta.cpu()


def paired_routing(r, c, clusters, n_permutations: int = 1000, n_bootstrap: int = 1000, level: float = 0.95,
                   seed: int = 0) -> dict[str, Inference]:
    """Routing drift between the same tokens' routing distributions at two checkpoints, with inference.

    Parameters
    ----------
    r, c : tensor [n, E]
        Per-token routing distributions over E experts (rows sum to 1) at the reference and the
        checkpoint, same token rows.
    clusters : sequence [n]
        Cluster label of each row (the unit of independence).
    n_permutations, n_bootstrap, level, seed
        As :func:`paired_mmd` (sign flips ``seed``, bootstrap draws ``seed + 1``).

    Returns
    -------
    dict
        ``route_js``: the mean per-token Jensen-Shannon divergence (bits; clusters weighted equally)
        with its cluster-bootstrap interval and ``p`` NaN -- JS is symmetric, so a sign flip leaves
        it unchanged and there is no paired null. ``route_load``: the paired cluster U-statistic
        ``mean over a != b of <D_a, D_b>``, ``D_a`` the cluster's mean of ``c_i - r_i``, unbiased
        for ``|E c - E r|^2`` (the squared shift of the expert load), with its interval and
        cluster sign-flip p-value.
    """
    r, c = torch.as_tensor(r), torch.as_tensor(c)
    if r.ndim != 2 or r.shape != c.shape:
        raise UsageError(f"r and c must be [n, experts] of one shape, got {tuple(r.shape)} and {tuple(c.shape)}")
    codes_np, uniq = cluster_codes(clusters)
    if len(codes_np) != r.shape[0]:
        raise UsageError(f"clusters has {len(codes_np)} labels for {r.shape[0]} rows")
    k = len(uniq)
    check_clusters(k, "paired_routing")
    js, delta = routing_terms(r, c, torch.as_tensor(codes_np), k)
    counts = bootstrap_counts(k, n_bootstrap, seed + 1)
    return {"route_js": cluster_mean_draws(js, counts, level)[0],
            "route_load": u_statistic_inference(gram_rows(delta), sign_flips(k, n_permutations, seed), counts, level)}


def top_k_members(route_ref, k: int):
    """[n, E] bool: row i is routed to expert e at the reference (e among its ``k`` most probable experts)."""
    import torch

    top = torch.topk(route_ref, min(int(k), route_ref.shape[1]), dim=1).indices                # [n, k]
    return torch.zeros(route_ref.shape, dtype=torch.bool, device=route_ref.device).scatter_(1, top, True)


def routing_cell(names, r, c, rows: Rows, s: Settings) -> dict:
    """The routing metrics of one (checkpoint, sparse layer, modality) cell.

    ``r``, ``c`` [n, E]: the same tokens' routing distributions at the reference and the checkpoint.
    Returns metric -> ``(Inference, draws [B])`` for the requested ones among ``route_js`` and
    ``route_load`` (:func:`paired_routing`).
    """
    js, delta = routing_terms(r, c, rows.codes, rows.k)
    flips, counts = draws("flips", rows.k, s.n_permutations, s.seed), draws("counts", rows.k, s.n_bootstrap, s.seed)
    out = {}
    if "route_js" in names:
        out["route_js"] = cluster_mean_draws(js, counts, s.level)
    if "route_load" in names:
        out["route_load"] = u_statistic_draws(gram_rows(delta), flips, counts, s.level)
    return out


def expert_cell(name: str, x: Cell, member, s: Settings) -> tuple[Inference, np.ndarray]:
    """Paired cluster MMD^2 of one cell restricted to the rows in ``member`` [n] (the tokens routed to one
    expert at the reference): ``(Inference, draws [B])``, the draws paired with every other cell's
    (:func:`driftlens.stats.resampling.subset_u_draws`)."""
    rows = x.rows
    codes = rows.codes[member]
    present = torch.bincount(codes.cpu(), minlength=rows.k) > 0
    h = paired_mmd_matrix(x.r[member], x.c[member], codes, rows.k, x.sigma)
    try:
        return subset_u_draws(h.cpu(), present, draws("flips", rows.k, s.n_permutations, s.seed),
                              draws("counts", rows.k, s.n_bootstrap, s.seed), s.level)
    except FloatingPointError as exc:
        raise DriftError(f"{name} at {x.where}: {exc} (sigma {x.sigma:.4g}); please report this with the "
                         f"store") from exc
