"""Inference on clustered tokens (the cluster, not the token, is the unit of independence): a facade.

The resampling (cluster sign flips, cluster bootstrap, U-statistics over clusters) is described
once, in :mod:`driftlens.stats.resampling`.

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
