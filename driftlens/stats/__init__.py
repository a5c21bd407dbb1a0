"""The drift math, one module per metric family.

Each family module holds a metric's value (the public functions :mod:`driftlens.metrics` and
:mod:`driftlens.inference` re-export), its cluster inference and its report cell:

- :mod:`~driftlens.stats.kernels`: Gaussian-mixture kernel sums, blocked (the report's paired pair
  terms, :func:`~driftlens.stats.mmd.mmd2` / ``mmd_test``'s pooled pass, the differentiable
  :func:`~driftlens.stats.kernels.kernel_sum` of the anchor loss), the median-heuristic bandwidth;
- :mod:`~driftlens.stats.mmd`: MMD^2, the permutation test, the paired cluster MMD and its cell;
- :mod:`~driftlens.stats.transport`: Sinkhorn, sliced and Gaussian Wasserstein, the Frechet
  distance (exact and batched) and the transport cell;
- :mod:`~driftlens.stats.shift`: paired token displacement and its cell;
- :mod:`~driftlens.stats.crossmodal`: modality gap, MIR and their cells;
- :mod:`~driftlens.stats.routing`: ``route_js``, ``route_load``, ``expert_mmd`` and their cells;
- :mod:`~driftlens.stats.resampling`: cluster codes and sums, sign flips, bootstrap counts,
  U-statistics, p-values, intervals, p-value corrections (shared by every family);
- :mod:`~driftlens.stats.common`: input validation and the one-BLAS-thread guard;
- :mod:`~driftlens.stats.settings`: the report's options, carried by the engine's plan;
- :mod:`~driftlens.stats.kinds`: the registry kind -> cell function table the engine dispatches on.

The package imports no driftlens module but :mod:`driftlens.errors`, :mod:`driftlens.schema` and
:mod:`driftlens.registry`; nothing is imported here (``import driftlens.stats.resampling`` loads
only what it needs).
"""
