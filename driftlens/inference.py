"""Inference on clustered tokens: the cluster, not the token, is the unit of independence.

Tokens of one image are strongly correlated, and so are the renders, crops and language twins of
one scene. A probe set therefore names, per probe, the *cluster* it belongs to (a scene, a source
photograph), and every resampling here draws whole clusters:

- **cluster sign flips** (paired permutation test): the same probes go through every checkpoint,
  so under "no change" the reference's and the checkpoint's tokens of one cluster are
  exchangeable; swapping them for a random subset of clusters draws from the null;
- **cluster bootstrap**: draw K clusters with replacement (multinomial counts per cluster).

Statistics that are *U-statistics over clusters* -- sums of a symmetric pair term ``H[a, b]``
over distinct clusters ``a != b`` -- get both resamplings as batched quadratic forms: a column
``w`` of signs or of bootstrap counts gives ``sum_{a != b} w_a w_b H[a, b] / sum_{a != b} w_a w_b``.
The paired cluster MMD (:func:`paired_mmd_matrix`) is one: with ``D_a`` the difference of the
kernel mean embeddings of cluster ``a`` at the reference and at the checkpoint,
``H[a, b] = <D_a, D_b>``, a sign flip of cluster ``a`` is ``D_a -> -D_a``, and
``E H[a, b] = MMD^2`` between the two token distributions for ``a != b`` whatever the number of
clusters or the correlation of tokens inside a cluster.

Everything here is a pure function of tensors or arrays; seeds make every draw reproducible and
the same for every cell of a report (so per-layer resamples can be summed across layers).

The functions live in :mod:`driftlens.stats`: the resampling machinery in
:mod:`~driftlens.stats.resampling`, the pair terms in :mod:`~driftlens.stats.kernels`, each
metric's cluster inference in its family (:mod:`~driftlens.stats.mmd`, :mod:`~driftlens.stats.shift`,
:mod:`~driftlens.stats.routing`); this module re-exports the public ones (``dl.inference.*``).
"""
from __future__ import annotations

from driftlens.stats.kernels import paired_mmd_matrix
from driftlens.stats.mmd import paired_mmd
from driftlens.stats.resampling import (
                                        CHUNK_ELEMENTS,
                                        MIN_CLUSTERS,
                                        Inference,
                                        adjust_pvalues,
                                        bootstrap_counts,
                                        check_clusters,
                                        cluster_codes,
                                        cluster_mean_draws,
                                        cluster_sums,
                                        gram_rows,
                                        nan_percentile_interval,
                                        p_value,
                                        percentile_interval,
                                        quadratic_u,
                                        row_chunks,
                                        rows_by_cluster,
                                        sign_flips,
                                        subset_u_draws,
                                        u_statistic_draws,
                                        u_statistic_inference,
)
from driftlens.stats.routing import js_bits, paired_routing, route_distributions, routing_terms
from driftlens.stats.shift import paired_shift, paired_shift_terms, shift_estimates

__all__ = [
    "CHUNK_ELEMENTS",
    "Inference",
    "MIN_CLUSTERS",
    "adjust_pvalues",
    "bootstrap_counts",
    "check_clusters",
    "cluster_codes",
    "cluster_mean_draws",
    "cluster_sums",
    "gram_rows",
    "js_bits",
    "nan_percentile_interval",
    "p_value",
    "paired_mmd",
    "paired_mmd_matrix",
    "paired_routing",
    "paired_shift",
    "paired_shift_terms",
    "percentile_interval",
    "quadratic_u",
    "route_distributions",
    "routing_terms",
    "row_chunks",
    "rows_by_cluster",
    "shift_estimates",
    "sign_flips",
    "subset_u_draws",
    "u_statistic_draws",
    "u_statistic_inference",
]
