"""The drift report: every metric of a checkpoint against a reference, with calibrated inference.

The same probes go through every checkpoint, so the design is *paired*, and tokens are not
independent: the tokens of one image, and the images (renders, crops, language twins) of one
scene, are strongly correlated. The store's ``cluster`` coordinate names the independent unit;
every interval and null here resamples whole clusters (:mod:`driftlens.inference`).

Per (checkpoint, layer, site, modality) cell and distributional metric ``m`` the report holds

- ``{m}``: the effect size, in the metric's units, whose expectation does not depend on the
  number of probe clusters;
- ``{m}_lo`` / ``{m}_hi``: its cluster-bootstrap interval (percentile, ``level``);
- ``{m}_p``: a cluster sign-flip permutation p-value (swap the reference's and the checkpoint's
  tokens of whole clusters), one-sided, ``(1 + k) / (1 + B)``;
- ``{m}_q``: the p-value adjusted over every non-reference cell of the metric (``correction``).

Effect sizes:

``mmd``
    The paired cluster MMD^2: ``mean over cluster pairs a != b of <D_a, D_b>``, ``D_a`` the
    difference between the kernel mean embeddings of cluster ``a``'s tokens at the reference and
    at the checkpoint. A U-statistic over clusters, unbiased for the MMD^2 between the two token
    distributions (each cluster weighted equally) whatever the number of clusters and the
    correlation inside one; it can be slightly negative. Kernel ``exp(-|x-y|^2 / (2 sigma^2))``,
    ``sigma`` the reference tokens' median heuristic (variable ``sigma``), the same for every
    checkpoint and resample. Sign flips and bootstrap draws are batched quadratic forms of one
    K x K matrix, so 1000 of each cost next to nothing.
``sinkhorn``, ``sliced_w``, ``gauss_w2``
    Plug-in estimates are biased upward by an amount that shrinks with the sample size; the
    effect is the excess of the value over the mean of its sign-flip null (which carries the
    same finite-sample bias), so it is near 0 without drift for any number of clusters. Each
    resample recomputes the metric, so these use ``transport_resamples`` draws (default 200).
``paired_shift``
    ``sqrt(E|c_i - r_i|^2 / E|r_i - r_j|^2)``: root-mean-square displacement of a token between
    the reference and the checkpoint, relative to the root-mean-square distance between tokens
    of *different* clusters at the reference (pairs over clusters a != b). 0 = no movement, 1 =
    tokens moved as far as one scene is from another. Interval by cluster bootstrap; no p-value:
    a deterministic model's displacement has no sampling null (any non-zero value is a change).

Cross-modal values per checkpoint, with cluster-bootstrap intervals: ``gap`` (Liang et al.
2022; per layer and site) and ``mir`` (Huang et al. 2025; ``hidden`` only, visual tokens vs the
text tokens after the image; the last layer on the post-final-norm state, site ``final``, as the
paper's ``hidden_states[-1]``), and ``mir_total = log10(sum over layers)``.

Mixture-of-experts decoders (a store with the site ``route``: per-token routing distributions at
the sparse layers), per (checkpoint, sparse layer, modality): ``route_js``, the mean per-token
Jensen-Shannon divergence between a token's routing at the reference and at the checkpoint (bits;
interval, no p-value -- a per-token change of a deterministic model has no sampling null), and
``route_load``, the expert-load shift (the paired cluster U-statistic of the mean routing change;
interval and sign-flip p-value, like ``mmd``). ``expert_mmd`` is ``mmd`` restricted to the tokens the
reference routes to one expert (per sparse layer, site, modality and expert; ``expert_clusters``
counts the clusters with such tokens, NaN cells below ``expert_min_clusters`` with the reason in
the report's warnings).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from driftlens.engine import DatasetBlocks, StoreBlocks, assemble, make_plan, run_grid, task_notes
from driftlens.errors import DriftError
from driftlens.merges import merge_alphas, with_merge_alpha
from driftlens.registry import ALIASES, ALL_METRICS, DEFAULT_METRICS, DISTRIBUTIONAL, METRICS, Metric
from driftlens.report import check_report_path, save_report
from driftlens.schema import MODALITIES, Modality, Site
from driftlens.stats.settings import CORRECTIONS, Settings
from driftlens.store import Verify

if TYPE_CHECKING:
    import torch
    import xarray as xr
    from distributed import Client

Correction = Literal["bh", "holm"] | None

# ----------------------------------------------------------------------------- the report


_LEVEL_RANK = {"none": 0, "fast": 1, "full": 2}
UNCHECKED = ("the store was not verified (verify='none'): a chunk, coordinate or record deleted, cut or altered "
             "since capture would go unnoticed, so these results are unchecked (verify='fast' or 'full' checks it)")


def _check_opened_store(ds, verify: str) -> tuple[str, list[str]]:
    """Check the store a Dataset was opened from at ``verify`` when it was opened with a weaker check.

    Returns the level the data was checked at and what could not be checked. A Dataset assembled
    from several stores (``xr.concat``) keeps the first one's attrs; its checkpoints are then not all
    in that store, and the check is left to each store's own open.
    """
    from driftlens.store import check_store, completed_labels, location

    done = str(ds.attrs.get("store_verified", "none"))
    notes = list(ds.attrs.get("store_notes", []))
    if _LEVEL_RANK[verify] <= _LEVEL_RANK.get(done, 0):
        return done, notes
    path = location(ds.attrs["store_path"])
    labels = [str(c) for c in ds.checkpoint.values.astype(str)]
    if path.is_dir() and set(labels) <= set(completed_labels(path)):
        return verify, check_store(path, verify, labels)
    return done, notes


def _as_drift_error(fn):
    """Numeric refusals of the metric functions (plain ``ValueError``) reach the user as :class:`DriftError`."""
    import functools

    from driftlens.errors import DriftlensError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FloatingPointError) as exc:
            if isinstance(exc, DriftlensError):
                raise
            raise DriftError(f"the report cannot be computed from this store: {exc}") from exc

    return wrapper


@_as_drift_error
def drift(ds: xr.Dataset | str | os.PathLike | Mapping[str, xr.Dataset | str | os.PathLike],
          reference: str | None = None,
          metrics: Sequence[Metric] = DEFAULT_METRICS, sites: Sequence[Site] | None = None,
          modalities: Sequence[Modality] = MODALITIES, n_permutations: int = 1000, n_bootstrap: int = 1000,
          level: float = 0.95, correction: Correction = "bh", transport_resamples: int = 200,
          mir_bootstrap: int | None = None, seed: int = 0, device: str | torch.device = "auto",
          blur: float = 0.1, n_projections: int = 128, progress: bool = True,
          out: str | os.PathLike | None = None, verify: Verify = "full", client: Client | None = None, *,
          contrasts: Sequence[tuple[str, str] | str] | None = None,
          layer_contrasts: Sequence[tuple[int, int] | str] | None = None,
          min_effect: float | Mapping[str, float] | None = None, bandwidth_scale: float = 1.0) -> xr.Dataset:
    """Drift of every captured (checkpoint, layer, site, modality) against a reference.

    Parameters
    ----------
    ds : xarray.Dataset, path, or mapping run label -> Dataset or path
        An activation store (:func:`driftlens.open_store`) or a Dataset laid out like one (dims
        checkpoint, layer, token, ``*_dim``; per-token coords sample, cluster, position, lang,
        modality). Without ``cluster`` the ``group`` (then ``sample``) coordinate is the
        resampling unit, and the report's ``warnings`` attribute says so. A mapping gives several
        training runs (seeds, data orders) of one design, each captured on the same probe set with
        the same checkpoint labels: the report gets a ``run`` dim and across-run inference
        (:mod:`driftlens.compare`: runs are the replication unit).
    reference : str, optional
        Reference checkpoint label (default: the store's recorded ``attrs["reference"]``, else the first
        checkpoint; :mod:`driftlens.select`).
    metrics : sequence of str
        Any of ``mmd``, ``sinkhorn``, ``sliced_w``, ``gauss_w2``, ``paired_shift`` (or
        ``shift``), ``gap``, ``mir``; for a store with the site ``route`` (a mixture-of-experts
        decoder), ``route_js``, ``route_load`` (per sparse layer and modality) and ``expert_mmd``
        (per sparse layer, site, modality and expert).
    sites : sequence of str, optional
        Layered sites (default: those in the store among ``hidden``, ``key``, ``query``).
    modalities : sequence of str
        Token modalities for the distributional and paired metrics.
    n_permutations : int
        Cluster sign flips for the p-values (>= 1).
    n_bootstrap : int
        Cluster-bootstrap draws for the intervals (>= 1).
    level : float
        Interval coverage (default 0.95).
    correction : {"bh", "holm", None}
        Multiple-testing adjustment of the p-values over every non-reference cell of a metric
        (``{m}_q``; attrs ``n_tests``): Benjamini-Hochberg (default) or Holm.
    transport_resamples : int
        Cap on sign flips and bootstrap draws for ``sinkhorn``, ``sliced_w`` and ``gauss_w2``
        (each draw recomputes the metric).
    mir_bootstrap : int, optional
        Bootstrap draws for the ``mir`` intervals (default ``n_bootstrap``): each draw costs a
        batched eigendecomposition of a hidden-size square matrix.
    seed : int
        Seeds every draw; the same draws serve every cell.
    device : str
        ``"auto"`` uses CUDA when present.
    blur : float
        Sinkhorn blur as a fraction of the cell's reference sigma (``report.sigma``).
    n_projections : int
        Sliced Wasserstein projections.
    progress : bool
        tqdm bar over the grid.
    out : str or Path, optional
        Also save the report as netCDF here (checked writable before anything is computed).
    verify : {"full", "fast", "none"}
        Integrity check of the store before any metric is computed (see
        :func:`driftlens.store.verify_store`): ``full`` (default) compares every chunk's CRC32
        with the one recorded at capture; ``fast`` checks presence and sizes only; both check
        the store's identity and token coordinates. ``none`` checks nothing and warns that the
        results are unchecked (a chunk file missing from a completed checkpoint of a local store
        is still refused when its block is read). The report's ``verify`` attribute records the
        level its data was checked at (``not a store`` for an in-memory Dataset), and what could
        not be checked is in its ``warnings``.
    client : distributed.Client, optional
        Run the grid as Dask tasks on this client's cluster, one task per (site, layer) block
        (:mod:`driftlens.engine`); ``device`` is then resolved on each worker. The report is the
        same as without a client: every cell uses the same seeded draws whatever process runs it.
        With a store path, workers read the store's files themselves (they must see the path);
        with a Dataset, it is shipped with each task (keep it lazy, or small). A closed client, or a
        cluster that has no worker within ``$DRIFTLENS_DASK_TIMEOUT`` seconds (default 60), is refused
        (:class:`~driftlens.errors.EnvironmentProblem`) before any work.
    contrasts : sequence of (a, b) or "a:b", optional
        Checkpoint contrasts ``a - b`` of every metric with draws (e.g. ``[("ko-5", "en-5")]``, or
        :func:`driftlens.compare.trajectory_pairs` for two trajectories step by step): a ``contrast``
        dim with effect, within-run interval and p-value, ratio, and across runs (with several runs)
        the hierarchical interval, the t-test over runs and the runs needed for 80% power.
    layer_contrasts : sequence of (l1, l2) or "l1:l2", optional
        Layer contrasts ``l1 - l2`` at every checkpoint (a ``layer_contrast`` dim), likewise.
    min_effect : float or mapping metric -> float, optional
        A minimum effect of interest: adds one-sided p-values ``{var}_pmin`` (and ``{var}_runs_pmin``)
        of "the effect (or the contrast) exceeds min_effect" -- a question that can come out "no".
    bandwidth_scale : float
        The MMD kernel bandwidth in units of the reference's median-heuristic sigma (default 1; e.g.
        0.5 and 2 show whether a conclusion depends on the bandwidth).

    Returns
    -------
    xarray.Dataset
        Dims ``checkpoint``, ``layer``, ``site``, ``modality``, ``draw``. Variables ``{m}``, ``{m}_lo``,
        ``{m}_hi``, ``{m}_p``, ``{m}_q`` for the distributional metrics; ``paired_shift`` (+
        ``_lo``, ``_hi``); ``gap`` (+ interval; checkpoint, layer, site); ``mir`` (+ interval;
        checkpoint, layer) and ``mir_total`` (+ interval; checkpoint); ``sigma``; ``{m}_boot``
        the cluster-bootstrap draws of every cell (paired across cells: :mod:`driftlens.compare`).
        Intervals and p-values of one run cover probe sampling only (attrs ``intervals_cover``).
        With runs: a leading ``run`` dim and ``{v}_runs``, ``{v}_runs_lo`` / ``_hi`` / ``_sd`` (and
        for contrasts ``_runs_p``, ``_runs_needed``) across runs.
    """
    from driftlens.store import VERIFY_LEVELS

    if verify not in VERIFY_LEVELS:
        raise DriftError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    if client is not None:
        from driftlens.scaleout import check_client

        check_client(client)          # a closed client, or a cluster without workers: refused, never a hang
    if out is not None:
        runs = ds.values() if isinstance(ds, Mapping) and not hasattr(ds, "data_vars") else [ds]
        stores = [d if not hasattr(d, "data_vars") else d.attrs.get("store_path") for d in runs]
        out = check_report_path(out, [("activation store", store) for store in stores])
    settings = Settings(n_permutations=n_permutations, n_bootstrap=n_bootstrap, level=level, correction=correction,
                        transport_resamples=transport_resamples, mir_bootstrap=mir_bootstrap, seed=seed,
                        device=device, blur=blur, n_projections=n_projections, bandwidth_scale=bandwidth_scale)
    options = dict(reference=reference, metrics=metrics, sites=sites, modalities=modalities, settings=settings,
                   progress=progress, verify=verify, client=client)
    if isinstance(ds, Mapping) and not hasattr(ds, "data_vars"):      # (an xarray Dataset is a Mapping too)
        report = _drift_runs(ds, options)
    else:
        report = _drift_one(ds, options)
    report = compare_report(report, contrasts=contrasts, layer_contrasts=layer_contrasts, min_effect=min_effect)
    if out is not None:
        save_report(report, out)
    return report


def compare_report(report: xr.Dataset, *, contrasts=None, layer_contrasts=None, min_effect=None) -> xr.Dataset:
    """A report with its contrasts, minimum-effect tests and (with a ``run`` dim) across-run inference added.

    What :func:`drift` does after the cells are computed; call it on a report read from disk (or
    combined with :func:`driftlens.compare.combine_runs`) to add contrasts later. Parameters as
    :func:`drift`.
    """
    from driftlens import compare as C

    if min_effect is not None:
        report = report.merge(C.cell_pmin(report, min_effect))
    if contrasts:
        report = report.merge(C.contrasts(report, contrasts, along="checkpoint", min_effect=min_effect))
    if layer_contrasts:
        report = report.merge(C.contrasts(report, layer_contrasts, along="layer", min_effect=min_effect))
    if "run" in report.dims and report.sizes["run"] >= 2:
        report = report.merge(C.across_runs(report, min_effect=min_effect))
        report.attrs["intervals_cover"] = (
            f"{{v}}_lo / {{v}}_hi / {{v}}_p: {C.WITHIN}, per run; {{v}}_runs_*: {C.ACROSS}")
    return report


def _drift_runs(runs: Mapping, options: dict) -> xr.Dataset:
    """One report per training run, stacked on a ``run`` dim (runs must share probes and labels)."""
    from driftlens.compare import combine_runs

    if len(runs) < 1:
        raise DriftError("runs: the mapping of run label -> store is empty")
    reports = {}
    for label, ds in runs.items():
        if isinstance(ds, Mapping) and not hasattr(ds, "data_vars"):
            raise DriftError(f"run {label!r}: a run is one store or Dataset, not a mapping")
        reports[str(label)] = _drift_one(ds, options)
    return combine_runs(reports)


def _drift_one(ds, options: dict) -> xr.Dataset:
    """The report of one store or Dataset (no contrasts)."""
    from driftlens.store import open_store

    options = dict(options)
    verify, client, progress = options.pop("verify"), options.pop("client"), options.pop("progress")
    device = options["settings"].device
    blocks = None
    if not hasattr(ds, "data_vars"):
        path = ds
        ds = open_store(path, verify=verify)
        checked, notes = verify, list(ds.attrs.get("store_notes", []))
        blocks = StoreBlocks.of_store(path)          # reads block by block from the store's own files
    elif ds.attrs.get("store_path"):
        checked, notes = _check_opened_store(ds, verify)
    else:
        checked, notes = "not a store", []             # an in-memory Dataset: nothing on disk to verify
    if checked == "none":
        warnings.warn(UNCHECKED, stacklevel=4)
        notes.append(UNCHECKED)
    plan = make_plan(ds, **options)
    if client is None:
        from driftlens.devices import resolve_device

        resolve_device(device)      # an unavailable device is refused here, before any task runs
    results = run_grid(plan, blocks or DatasetBlocks(ds), client=client, progress=progress)
    report = with_merge_alpha(assemble(plan, results), merge_alphas(ds))    # merged checkpoints: their alpha
    report.attrs["verify"] = checked
    report.attrs["warnings"] = "\n".join(w for w in [report.attrs.get("warnings", ""), *notes] if w)
    for w in tuple(plan.notes) + tuple(task_notes(results)):
        warnings.warn(w, stacklevel=4)   # the caller of drift(), past its error wrapper
    return report


__all__ = ["ALIASES", "ALL_METRICS", "CORRECTIONS", "DEFAULT_METRICS", "DISTRIBUTIONAL", "METRICS", "DriftError",
           "compare_report", "drift"]
