"""The drift engine: the report as one pure task per (site, layer) block, mapped over the grid.

Data flow::

    make_plan(ds, ...)            -> GridPlan   coordinates and options only; no activation read
    run_grid(plan, blocks, client) -> results   one run_task(plan, task, blocks) per (site, layer)
    assemble(plan, results)        -> report    the xarray Dataset :func:`driftlens.drift` returns

A task reads the reference's block of its (site, layer), then streams the checkpoints' blocks
one at a time (:class:`BlockSource`), so memory holds two blocks whatever the store's size.
Every cell of every task uses the same resampling draws -- functions of (number of clusters,
number of draws, seed) only -- so a task's result does not depend on which process runs it or
when: the single-process run, a Dask cluster and a GPU give the same report. With a Dask
``client`` the tasks are Dask tasks (a worker that dies has its tasks rerun elsewhere).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from driftlens.errors import DriftError, SelectionError, raise_if_interrupted
from driftlens.registry import ALIASES, DEFAULT_METRICS, METRICS, base_metric, of_kind
from driftlens.schema import REPORT_DIMS, ROUTE_SITE
from driftlens.select import cluster_labels, reference_of
from driftlens.stats.kernels import median_sigma
from driftlens.stats.kinds import cells_of
from driftlens.stats.resampling import (
    Inference,
    Rows,
    adjust_pvalues,
    check_clusters,
    cluster_codes,
)
from driftlens.stats.routing import top_k_members
from driftlens.stats.settings import CORRECTIONS, Cell, Settings  # noqa: F401  (CORRECTIONS: drift's import)
from driftlens.stats.transport import SINKHORN_SCALING
from driftlens.store import BlockSource, DatasetBlocks, StoreBlocks  # the block readers: the store owns its format

if TYPE_CHECKING:
    import torch
    import xarray as xr

FEW_CLUSTERS = 10   # below this, percentile intervals are rough; said in the report's warnings
MMD_CACHE_ROWS = 4096   # the reference's kernel tile is kept across a task's checkpoints up to this size
#: an expert's cell needs tokens routed to it from this many clusters (else NaN, and the report says why)
EXPERT_MIN_CLUSTERS = 5
EXPERT_CLUSTERS = "expert_clusters"     # the report variable counting them, per (layer, modality, expert)
#: What a report records of the store it was computed from: the probe set's fingerprint, the token
#: selection's hash and the store's path (``AnchorDriftLoss.from_store(weights=report)`` compares them).
IDENTITY_ATTRS = ("probe_fingerprint", "token_selection", "store_path")


@dataclass(frozen=True)
class Task:
    """One (site, layer) block of the grid and what to compute there."""

    site: str                 # a report site, or ``route`` (the routing metrics' task at a sparse layer)
    site_index: int | None    # index on the report's ``site`` dim; None: the site only feeds ``mir`` or routing
    layer: int
    layer_index: int
    mir: bool                 # compute the layer's MIR term here (site ``hidden``)

    @property
    def name(self) -> str:
        """A readable task name, e.g. ``hidden-layer3``."""
        return f"{self.site}-layer{self.layer}"


@dataclass(frozen=True, eq=False)
class GridPlan:
    """Everything a task needs besides its blocks: plain data, picklable, no activation values."""

    labels: tuple[str, ...]
    reference: str
    layers: tuple[int, ...]
    sites: tuple[str, ...]
    modalities: tuple[str, ...]
    metrics: tuple[str, ...]
    cluster: np.ndarray            # [token] cluster label (str)
    modality: np.ndarray           # [token] "visual" / "text"
    text_after: np.ndarray         # [token] bool: text tokens after the image
    settings: Settings             # the report's options (resampling counts, level, seed, device ...), validated
    do_mir: bool
    final_state: bool              # the last layer's MIR term from site ``final``
    last_layer: int
    tasks: tuple[Task, ...]
    notes: tuple[str, ...]
    n_clusters: dict[str, int]     # "all" and per modality
    attrs: dict = field(default_factory=dict)
    route_layers: tuple[int, ...] = ()   # sparse (mixture-of-experts) layers among ``layers`` (site ``route``)
    route_top_k: int = 1           # experts per token: a token belongs to its top-k experts' cells
    n_experts: int = 0             # length of the report's ``expert`` dim
    expert_min_clusters: int = EXPERT_MIN_CLUSTERS

    def of_grain(self, grain: str) -> list[str]:
        """The plan's metrics whose kind is computed at ``grain`` (:mod:`driftlens.stats.kinds`), in the given order."""
        return [m for m in self.metrics if cells_of(METRICS[m].kind).grain == grain]

    def of_kind(self, *kinds) -> list[str]:
        """The plan's metrics of these kinds (:mod:`driftlens.registry`), in the caller's order."""
        return [m for m in self.metrics if METRICS[m].kind in kinds]

    def n_draws(self, metric: str) -> int:
        """Cluster-bootstrap draws of one metric's cells (its ``{metric}_boot`` variable; ``mir_total`` as ``mir``)."""
        return self.resamples(metric)[1]

    def resamples(self, metric: str) -> tuple[int, int]:
        """(sign flips, bootstrap draws) of one metric's cells, from its registry ``draws``."""
        spec = METRICS.get(metric) or base_metric(metric)
        return self.settings.resamples(spec.draws)

    @property
    def max_draws(self) -> int:
        """Length of the report's ``draw`` dim: the most draws any of its metrics has."""
        names = list(self.metrics) + (["mir"] if self.do_mir else [])
        return max([self.n_draws(m) for m in names if m in METRICS] or [self.settings.n_bootstrap])


# ----------------------------------------------------------------------------- the plan


def normalize_metrics(metrics) -> list[str]:
    """Metric names in the caller's order, aliases resolved; unknown names refused."""
    out = []
    for m in metrics:
        m = ALIASES.get(m, m)
        if m not in METRICS:
            raise DriftError(f"unknown metric {m!r}; choose from {tuple(METRICS)} ('shift' = 'paired_shift')")
        if m not in out:
            out.append(m)
    return out


def _cluster_labels(ds) -> tuple[np.ndarray, str, list[str]]:
    """Per-token cluster labels, the coordinate they came from (:func:`driftlens.select.cluster_unit`), and warnings."""
    cluster, name = cluster_labels(ds)
    notes = [] if name == "cluster" else [
        f"the store has no `cluster` coordinate (captured before clusters existed); resampling "
        f"units are its `{name}` values, which treats renders or twins of one scene as independent; "
        f"recapture with a probe set that declares clusters"]
    return cluster, name, notes


def _text_after_image(ds) -> np.ndarray:
    """Rows that are text tokens placed after the last image token of their probe."""
    sample = ds["sample"].values.astype(str)
    pos = ds["position"].values
    vis = ds["modality"].values.astype(str) == "visual"
    last: dict[str, int] = {}
    for s, p, v in zip(sample, pos, vis):
        if v:
            last[s] = max(last.get(s, -1), int(p))
    return np.array([(not v) and p > last.get(s, -1) for s, p, v in zip(sample, pos, vis)])


def make_plan(ds: xr.Dataset, reference: str | None = None, metrics=DEFAULT_METRICS, sites=None,
              modalities=("visual", "text"), settings: Settings | None = None, **options) -> GridPlan:
    """Validate the options against ``ds`` and lay out the grid's tasks.

    Reads ``ds``'s coordinates (checkpoint, layer, per-token sample / cluster / position /
    modality), attributes and which variables exist -- never an activation value. ``settings``
    carries the report's options (:class:`driftlens.stats.settings.Settings`); ``options`` are its
    fields by name where no ``settings`` is given (parameters as :func:`driftlens.drift`).
    """
    if settings is None:
        try:
            settings = Settings(**options)
        except TypeError as exc:
            raise DriftError(f"make_plan: {exc}") from None
    elif options:
        raise DriftError(f"make_plan: pass the options {sorted(options)} in settings, not beside it")
    settings = settings.validated()
    metrics = normalize_metrics(metrics)
    labels = [str(c) for c in ds.checkpoint.values.astype(str)]
    if not labels:
        raise DriftError("the store holds no completed checkpoint")
    try:
        reference = reference_of(ds, reference, among=labels, where="the store")
    except SelectionError as exc:
        if reference in ds.attrs.get("checkpoints", []) and reference not in ds.attrs.get("completed", []):
            raise DriftError(f"reference {reference!r} was started but its capture did not finish (the store hides "
                             f"unfinished checkpoints); rerun the capture to complete it, or choose a completed "
                             f"reference among {labels}") from None
        raise DriftError(str(exc)) from None
    if sites is None:
        sites = [s for s in ("hidden", "key", "query") if s in ds.data_vars]
    if ROUTE_SITE in sites:
        raise DriftError(f"site {ROUTE_SITE!r} holds routing distributions, read by the routing metrics "
                         f"({', '.join(of_kind('routing'))}), not a site of the distributional ones; leave it out of "
                         f"sites and add the routing metrics to metrics")
    missing = [s for s in sites if s not in ds.data_vars]
    if missing or not sites:
        raise DriftError(f"site(s) {missing or list(sites)} not in the store; it has {list(ds.data_vars)}")
    layers = [int(v) for v in ds.layer.values]
    modality = ds["modality"].values.astype(str)
    cluster, cluster_coord, notes = _cluster_labels(ds)
    unfinished = [c for c in ds.attrs.get("checkpoints", [])
                  if c not in ds.attrs.get("completed", [c]) and c not in labels]   # not opened with include_incomplete
    if unfinished:
        notes.append(f"checkpoint(s) {unfinished} were started but their capture did not finish; the report "
                     f"leaves them out (rerun the capture to complete them)")
    if len(labels) < 2:
        notes.append(f"the store holds only the reference checkpoint {labels}: there is no drift to report")
    _check_token_rows(modality, modalities, metrics, notes)
    n_clusters = {"all": len(cluster_codes(cluster)[1])}
    for mod in modalities:
        rows = np.flatnonzero(modality == mod)
        if not rows.size:
            continue
        k = len(cluster_codes(cluster[rows])[1])
        try:
            check_clusters(k, f"{mod} tokens")
        except ValueError as exc:
            raise DriftError(f"{exc} (the store's `{cluster_coord}` coordinate; add probes of more "
                             f"scenes / source images)") from None
        if k < FEW_CLUSTERS:
            notes.append(f"{mod} tokens come from {k} clusters (< {FEW_CLUSTERS}): intervals and p-values are rough")
        n_clusters[mod] = k
    do_mir = "mir" in metrics and "hidden" in ds.data_vars
    if "mir" in metrics and not do_mir:
        notes.append("mir needs the `hidden` site, which the store does not have; mir was skipped")
    last_layer = int(ds.attrs.get("n_layers", max(layers) + 1)) - 1
    final_state = do_mir and last_layer in layers and "final" in ds.data_vars
    if do_mir and last_layer in layers and not final_state:
        notes.append(f"mir at the last layer ({last_layer}) uses the block output before the model's final "
                     f"norm: the store has no `final` site (Huang et al. use the post-norm state); recapture "
                     f"with sites including 'final'")
    tasks = [Task(site, si, layer, li, do_mir and site == "hidden")
             for si, site in enumerate(sites) for li, layer in enumerate(layers)]
    if do_mir and "hidden" not in sites:
        tasks += [Task("hidden", None, layer, li, True) for li, layer in enumerate(layers)]
    metrics, route = _route_plan(ds, metrics, layers, notes)
    tasks += [Task(ROUTE_SITE, None, layer, layers.index(layer), False) for layer in route.get("route_layers", ())
              if of_kind_in(metrics, "routing")]
    return GridPlan(
        labels=tuple(labels), reference=reference, layers=tuple(layers), sites=tuple(sites),
        modalities=tuple(modalities), metrics=tuple(metrics), cluster=cluster, modality=modality,
        text_after=_text_after_image(ds), settings=settings, do_mir=do_mir, final_state=final_state,
        last_layer=last_layer, tasks=tuple(tasks), notes=tuple(notes), n_clusters=n_clusters,
        attrs={"model_type": str(ds.attrs.get("model_type", "")), "family": str(ds.attrs.get("family", "")),
               "n_layers": int(ds.attrs.get("n_layers", len(layers))),
               "probe_set": str(ds.attrs.get("probe_set", "")), "cluster_coord": cluster_coord,
               **_identity_attrs(ds.attrs)},
        **route)


def of_kind_in(metrics, *kinds) -> list[str]:
    """The names among ``metrics`` whose registry kind is one of ``kinds``."""
    return [m for m in metrics if METRICS[m].kind in kinds]


def _route_plan(ds, metrics: list[str], layers: list[int], notes: list) -> tuple[list[str], dict]:
    """The routing and expert metrics' part of the plan: the sparse layers, top-k and number of experts.

    Without the store site ``route`` those metrics are left out, with a note; a store that does not say
    which layers are sparse (root attribute ``route_layers``) or how many experts a token goes to
    (``route_top_k``) gets every layer / top-1, with a note.
    """
    wanted = of_kind_in(metrics, "routing", "expert")
    if not wanted:
        return metrics, {}
    if ROUTE_SITE not in ds.data_vars:
        notes.append(f"{wanted} need the site {ROUTE_SITE!r} (per-token routing distributions of a mixture-of-experts "
                     f"decoder: capture with sites including 'route' on a model whose spec names its router); "
                     f"they were skipped")
        return [m for m in metrics if m not in wanted], {}
    sparse = ds.attrs.get("route_layers")
    if sparse is None:
        notes.append("the store does not record its sparse layers (attribute route_layers): every layer is read as "
                     "sparse")
        sparse = layers
    top_k = ds.attrs.get("route_top_k")
    if not (isinstance(top_k, int) and top_k > 0):
        notes.append("the store does not record the experts per token (attribute route_top_k): expert cells use "
                     "each token's top-1 expert")
        top_k = 1
    return metrics, {"route_layers": tuple(int(v) for v in sparse if int(v) in layers), "route_top_k": int(top_k),
                     "n_experts": int(ds.sizes[str(ds[ROUTE_SITE].dims[-1])])}


def _check_token_rows(modality: np.ndarray, modalities, metrics, notes: list) -> None:
    """Refuse a dataset without a token row of any requested modality (its report would be all NaN), and
    a cross-modal metric without both modalities; note a requested modality that has no rows."""
    bad = [m for m in modalities if m not in ("visual", "text")]
    if bad or not modalities:
        raise DriftError(f"modalities {list(modalities)}: each must be 'visual' or 'text' (at least one)")
    have = {m: int((modality == m).sum()) for m in ("visual", "text")}
    if not any(have.get(m, 0) for m in modalities):
        raise DriftError(f"the dataset has no {' or '.join(modalities)} token rows ({len(modality)} tokens in all): "
                         f"an empty token selection gives no drift to measure -- check the selection "
                         f"(e.g. ds.sel / ds.isel on `token`)")
    cross = [m for m in metrics if METRICS[m].kind == "cross_modal"]
    missing = [m for m in ("visual", "text") if not have[m]]
    if cross and missing:
        raise DriftError(f"{cross} compare visual and text tokens, but the dataset has no {missing[0]} token rows; "
                         f"leave {cross} out of metrics, or keep both modalities in the selection")
    for m in modalities:
        if not have.get(m, 0):
            notes.append(f"the dataset has no {m} token rows: every {m} cell of the report is NaN (pass "
                         f"modalities without {m!r} to leave them out)")


def _identity_attrs(attrs) -> dict:
    """The store identity a report records (:data:`IDENTITY_ATTRS`); a local store path made absolute."""
    import os

    out = {k: str(attrs[k]) for k in IDENTITY_ATTRS if attrs.get(k)}
    if "store_path" in out and "://" not in out["store_path"]:
        out["store_path"] = os.path.abspath(out["store_path"])
    return out


# ----------------------------------------------------------------------------- one task


def _read(blocks: BlockSource, label: str, site: str, layer: int | None, dev) -> torch.Tensor:
    """One block [T, d] float32 on ``dev``; non-finite rows refused with the cell named."""
    import torch

    arr = blocks.read(site, label, layer)
    t = arr.to(device=dev, dtype=torch.float32) if isinstance(arr, torch.Tensor) else \
        torch.as_tensor(np.asarray(arr, dtype=np.float32), device=dev)
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        where = f"checkpoint {label!r}, site {site!r}" + (f", layer {layer}" if layer is not None else "")
        raise DriftError(f"{where}: {int(bad.sum())} token row(s) hold NaN/Inf (first at row "
                         f"{int(torch.nonzero(bad)[0, 0])}); the store is damaged or the model overflowed "
                         f"(recapture that checkpoint)")
    return t


def run_task(plan: GridPlan, task: Task, blocks: BlockSource) -> dict:
    """Every cell of one (site, layer) block, for every checkpoint.

    Returns
    -------
    dict
        ``task``; ``values``: variable name -> array [checkpoint, modality] (distributional and
        paired metrics) or [checkpoint] (``gap``, ``mir``); ``sigma`` [modality];
        ``mir_boot`` [checkpoint, n_mir] (the layer's MIR bootstrap draws) or None.
    """
    import torch

    from driftlens.devices import resolve_device

    s = plan.settings
    dev = resolve_device(s.device)
    if task.site == ROUTE_SITE:
        return _run_route_task(plan, task, blocks, dev)
    C, Mo = len(plan.labels), len(plan.modalities)
    main = task.site_index is not None
    # the kinds computed per (checkpoint, modality) cell from the paired rows, by their registry kind
    per_cell = [(m, cells_of(METRICS[m].kind).fn) for m in plan.of_grain("cell")] if main else []
    # cross-modal metrics: at every report site (registry site None) or at their own site only (``mir``)
    cross = [m for m in plan.of_kind("cross_modal") if (main and METRICS[m].site is None)
             or (task.mir and METRICS[m].site is not None)]
    values = {m + suf: np.full((C, Mo), np.nan) for m, _ in per_cell for suf in METRICS[m].outputs}
    values.update({m + "_boot": np.full((C, Mo, plan.n_draws(m)), np.nan) for m, _ in per_cell})
    for m in cross:
        values.update({m + suf: np.full(C, np.nan) for suf in METRICS[m].outputs})
        if METRICS[m].site is None:
            values[m + "_boot"] = np.full((C, plan.n_draws(m)), np.nan)
    sigma = np.full(Mo, np.nan)
    mir_boot = np.zeros((C, s.n_mir)) if task.mir else None

    all_codes_np, uniq = cluster_codes(plan.cluster)
    k_all = len(uniq)
    all_codes = torch.as_tensor(all_codes_np, device=dev)
    vis = torch.as_tensor(plan.modality == "visual", device=dev)
    txt = torch.as_tensor(plan.text_after, device=dev)
    use_final = task.mir and plan.final_state and task.layer == plan.last_layer
    cache_kernel = any(METRICS[m].kind == "kernel" for m, _ in per_cell)

    ref_raw = _read(blocks, plan.reference, task.site, task.layer, dev)          # [T, d]
    centre = ref_raw.mean(0, dtype=torch.float64).to(ref_raw.dtype)
    per_mod = {}
    for mi, mod in enumerate(plan.modalities):
        rows_np = np.flatnonzero(plan.modality == mod)
        if not main or not rows_np.size:
            continue
        rows = Rows(rows_np, plan.cluster, dev)
        # kernels and distances are translation-invariant; centring keeps float32 exact. Only the
        # modality's rows are centred (a copy); no centred copy of the whole block is kept
        r = ref_raw[rows.rows] - centre
        sigma[mi] = median_sigma(r, pairs="reference", seed=s.seed) * s.bandwidth_scale
        per_mod[mi] = {"rows": rows, "r": r, "sigma": sigma[mi],
                       "cache": {} if cache_kernel and r.shape[0] <= MMD_CACHE_ROWS else None}
    experts = _expert_setup(plan, task, blocks, dev, per_mod) if main else None
    where = f"site {task.site!r}, layer {task.layer}"
    for ci, label in enumerate(plan.labels):
        raise_if_interrupted()
        cur_raw = ref_raw if label == plan.reference else _read(blocks, label, task.site, task.layer, dev)
        for mi, pm in per_mod.items():
            if label == plan.reference:        # not tested: effect 0 by definition, no p-value
                for m, _ in per_cell:
                    for suf in ("", "_lo", "_hi", "_boot"):
                        if m + suf in values:
                            values[m + suf][ci, mi] = 0.0
                if experts is not None:
                    _expert_cells(plan, experts, ci, mi, pm, None, "")
                continue
            rows, r = pm["rows"], pm["r"]
            c = cur_raw[rows.rows] - centre
            cell = Cell(r, c, rows, pm["sigma"], pm["cache"],
                        f"checkpoint {label!r}, {where}, {plan.modalities[mi]} tokens")
            for m, fn in per_cell:
                _put(values, m, (ci, mi), *fn(m, cell, s))
            if experts is not None:
                _expert_cells(plan, experts, ci, mi, pm, c, cell.where)
        for m in cross:
            state = _read(blocks, label, "final", None, dev) if use_final and METRICS[m].site else cur_raw
            value, lo, hi, boot = cells_of("cross_modal").fn(m, state[vis], state[txt], all_codes[vis],
                                                              all_codes[txt], k_all, plan.n_draws(m), s)
            if METRICS[m].site is not None:
                if not np.isfinite(value):
                    raise DriftError(f"{m} is not finite at checkpoint {label!r}, layer {task.layer}")
                mir_boot[ci] = boot
                boot = None
            for suf, v in zip(("", "_lo", "_hi", "_boot"), (value, lo, hi, boot)):
                if m + suf in values:
                    values[m + suf][ci] = v
    out = {"task": task, "values": values, "sigma": sigma, "mir_boot": mir_boot}
    if experts is not None:
        out["cells"] = {name: ({"layer": task.layer_index, "site": task.site_index}, arr)
                        for name, arr in experts["values"].items()}
        out["notes"] = experts["notes"]
    return out


def _put(values, m, idx, inf: Inference, draws: np.ndarray) -> None:
    for suf, v in zip(("", "_lo", "_hi", "_p", "_boot"), (inf.effect, inf.lo, inf.hi, inf.p, draws)):
        if m + suf in values:
            values[m + suf][idx] = v


# ----------------------------------------------------------------------------- mixture of experts


def _metric_values(plan: GridPlan, names, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """NaN arrays ``shape`` for every output of ``names`` and ``shape + (draws,)`` for their ``_boot``."""
    out = {m + suf: np.full(shape, np.nan) for m in names for suf in METRICS[m].outputs}
    out.update({m + "_boot": np.full(shape + (plan.n_draws(m),), np.nan) for m in names})
    return out


def _run_route_task(plan: GridPlan, task: Task, blocks: BlockSource, dev) -> dict:
    """The routing metrics of one sparse layer (site ``route``), for every checkpoint and modality.

    Returns a task result whose ``cells`` map each variable to ``({"layer": index}, array [checkpoint,
    modality(, draw)])`` (see :func:`assemble`).
    """
    names = plan.of_kind("routing")
    C, Mo = len(plan.labels), len(plan.modalities)
    values = _metric_values(plan, names, (C, Mo))
    ref = _read(blocks, plan.reference, ROUTE_SITE, task.layer, dev)                     # [T, E]
    mods = {mi: Rows(np.flatnonzero(plan.modality == mod), plan.cluster, dev)
            for mi, mod in enumerate(plan.modalities) if (plan.modality == mod).any()}
    for ci, label in enumerate(plan.labels):
        raise_if_interrupted()
        cur = ref if label == plan.reference else _read(blocks, label, ROUTE_SITE, task.layer, dev)
        for mi, rows in mods.items():
            if label == plan.reference:         # not tested: effect 0 by definition
                for m in names:
                    for suf in ("", "_lo", "_hi", "_boot"):
                        values[m + suf][ci, mi] = 0.0
                continue
            got = cells_of("routing").fn(names, ref[rows.rows], cur[rows.rows], rows, plan.settings)
            for m, (inf, draws) in got.items():
                _put(values, m, (ci, mi), inf, draws)
    return {"task": task, "values": {}, "sigma": None, "mir_boot": None,
            "cells": {name: ({"layer": task.layer_index}, arr) for name, arr in values.items()}, "notes": []}


def _expert_setup(plan: GridPlan, task: Task, blocks: BlockSource, dev, per_mod: dict) -> dict | None:
    """Per modality, which rows the reference routes to each expert at this (sparse) layer, and the cells to fill.

    None when the plan has no expert metric or the layer is dense.
    """
    names = plan.of_kind("expert")
    if not names or task.layer not in plan.route_layers:
        return None
    C, Mo, E = len(plan.labels), len(plan.modalities), plan.n_experts
    ref = _read(blocks, plan.reference, ROUTE_SITE, task.layer, dev)                     # [T, E]
    values = _metric_values(plan, names, (C, Mo, E))
    clusters = np.full((Mo, E), np.nan)                                                   # clusters with such tokens
    members, notes = {}, []
    for mi, pm in per_mod.items():
        rows = pm["rows"]
        member = top_k_members(ref[rows.rows], plan.route_top_k)                   # [n, E]
        members[mi] = {}
        for e in range(E):
            k_e = int((np.bincount(rows.codes[member[:, e]].cpu().numpy(), minlength=rows.k) > 0).sum())
            clusters[mi, e] = k_e
            if k_e >= plan.expert_min_clusters:
                members[mi][e] = member[:, e]
        small = [e for e in range(E) if clusters[mi, e] < plan.expert_min_clusters]
        if small:
            notes.append(f"expert_mmd at layer {task.layer}, site {task.site!r}, {plan.modalities[mi]} tokens: "
                         f"expert(s) {small} receive tokens from fewer than {plan.expert_min_clusters} clusters "
                         f"(counts {[int(clusters[mi, e]) for e in small]}): NaN")
    values[EXPERT_CLUSTERS] = clusters
    return {"names": names, "values": values, "members": members, "notes": notes}


def _expert_cells(plan: GridPlan, experts: dict, ci: int, mi: int, pm: dict, c, where: str) -> None:
    """Fill the expert cells of one (checkpoint, modality) from its centred rows ``c``."""
    rows, r = pm["rows"], pm["r"]
    for e, member in experts["members"].get(mi, {}).items():
        if plan.labels[ci] == plan.reference:
            for m in experts["names"]:
                for suf in ("", "_lo", "_hi", "_boot"):
                    experts["values"][m + suf][ci, mi, e] = 0.0
            continue
        cell = Cell(r, c, rows, pm["sigma"], None, f"{where}, expert {e}")
        for m in experts["names"]:       # the expert kind: a kernel cell restricted to one expert's tokens
            _put(experts["values"], m, (ci, mi, e), *cells_of(METRICS[m].kind).fn(m, cell, member, plan.settings))


# ----------------------------------------------------------------------------- the grid


def run_grid(plan: GridPlan, blocks: BlockSource, client=None, progress: bool = True) -> list[dict]:
    """Run every task of the plan: in this process, or as Dask tasks on ``client``'s cluster.

    Results come back in the plan's task order whatever order the tasks ran in. On Dask, a
    task lost with its worker is rerun by the scheduler (``distributed``'s ``allowed-failures``);
    an interruption cancels the tasks still queued.
    """
    from tqdm.auto import tqdm

    from driftlens.threads import serial_torch

    C = len(plan.labels)
    bar = tqdm(total=len(plan.tasks) * C, desc="drift", disable=not progress, unit="cell")
    try:
        if client is None:
            out = []
            with serial_torch():         # one intra-op thread where OpenMP spins (driftlens.threads)
                for task in plan.tasks:
                    raise_if_interrupted()
                    out.append(run_task(plan, task, blocks))
                    bar.update(C)
            return out
        return _run_on_dask(plan, blocks, client, bar)
    finally:
        bar.close()


def _task_first(task: Task, plan: GridPlan, blocks: BlockSource) -> dict:
    """:func:`run_task` with the task first, as ``Client.map`` passes it."""
    return run_task(plan, task, blocks)


def _run_on_dask(plan: GridPlan, blocks: BlockSource, client, bar) -> list[dict]:
    from driftlens.scaleout import gather

    run = uuid.uuid4().hex[:8]
    futures = client.map(_task_first, plan.tasks, plan=plan, blocks=blocks, pure=False,
                         key=[f"driftlens-{t.name}-{run}" for t in plan.tasks])
    return gather(client, futures, bar, step=len(plan.labels))


# ----------------------------------------------------------------------------- the report


def assemble(plan: GridPlan, results: list[dict]) -> xr.Dataset:
    """The report Dataset from the tasks' results (any order)."""
    import xarray as xr

    from driftlens._version import __version__

    C, L, S, Mo = len(plan.labels), len(plan.layers), len(plan.sites), len(plan.modalities)
    cell_metrics = plan.of_grain("cell")
    res = {m + suf: np.full((C, L, S, Mo), np.nan) for m in cell_metrics for suf in METRICS[m].outputs}
    gap = {"gap" + suf: np.full((C, L, S), np.nan) for suf in ("", "_lo", "_hi")} if "gap" in plan.metrics else {}
    mir = {"mir" + suf: np.full((C, L), np.nan) for suf in ("", "_lo", "_hi")} if plan.do_mir else {}
    mir_boot = np.zeros((C, plan.settings.n_mir))
    sigmas = np.full((L, S, Mo), np.nan)
    B = plan.max_draws
    boots = {m: np.full((C, L, S, Mo, B), np.nan) for m in cell_metrics}         # [..., draw]
    if gap:
        boots["gap"] = np.full((C, L, S, B), np.nan)
    if mir:
        boots["mir"] = np.full((C, L, B), np.nan)
    ext = _extra_arrays(plan)
    for out in results:
        _fill_cells(ext, out.get("cells", {}))
        t = out["task"]
        for name, arr in out["values"].items():
            if name.endswith("_boot"):
                m = name[:-len("_boot")]
                if m == "gap":
                    boots[m][:, t.layer_index, t.site_index, :arr.shape[-1]] = arr
                else:
                    boots[m][:, t.layer_index, t.site_index, :, :arr.shape[-1]] = arr
            elif name in res:
                res[name][:, t.layer_index, t.site_index, :] = arr
            elif name in gap:
                gap[name][:, t.layer_index, t.site_index] = arr
            elif name in mir:
                mir[name][:, t.layer_index] = arr
        if t.site_index is not None:
            sigmas[t.layer_index, t.site_index] = out["sigma"]
        if out["mir_boot"] is not None:
            mir_boot += out["mir_boot"]
            boots["mir"][:, t.layer_index, :plan.settings.n_mir] = out["mir_boot"]

    level = plan.settings.level
    data = {name: (REPORT_DIMS, arr, _attrs(plan, name)) for name, arr in res.items()}
    for name, (dims, arr) in ext.items():
        if name == EXPERT_CLUSTERS:
            attrs = {"long_name": "clusters with tokens routed to the expert", "units": "clusters",
                     "definition": f"number of probe clusters with at least one token the reference routes to the "
                                   f"expert (among its top {plan.route_top_k}) at this layer; expert_mmd is NaN below "
                                   f"{plan.expert_min_clusters}"}
        else:
            attrs = _boot_attrs(plan, name[:-len("_boot")]) if name.endswith("_boot") else _attrs(plan, name)
        data[name] = (dims, arr, attrs)
    n_tests = {}
    if plan.settings.correction is not None:
        not_ref = np.array([lab != plan.reference for lab in plan.labels])
        for m in plan.metrics:
            if not METRICS[m].tested:
                continue
            dims, p = (REPORT_DIMS, res[m + "_p"]) if m + "_p" in res else ext[m + "_p"]
            p = np.where(not_ref.reshape((-1,) + (1,) * (p.ndim - 1)), p, np.nan)
            n_tests[m] = int(np.isfinite(p).sum())
            data[m + "_q"] = (dims, adjust_pvalues(p, plan.settings.correction), {
                "long_name": f"{METRICS[m].long_name}, adjusted p-value", "units": "1",
                "correction": plan.settings.correction,
                "n_tests": n_tests[m],
                "definition": f"{'Benjamini-Hochberg' if plan.settings.correction == 'bh' else 'Holm'} adjustment of "
                              f"{m}_p over the {n_tests[m]} cells that are not the reference"})
    for name, arr in gap.items():
        data[name] = (METRICS["gap"].dims, arr, _attrs(plan, name))
    if plan.do_mir:
        for name, arr in mir.items():
            data[name] = (METRICS["mir"].dims, arr, {
                **_attrs(plan, name), "site": "hidden",
                "last_layer_state": "post-final-norm (site `final`)" if plan.final_state else "block output, pre-norm"})
        total = np.log10(mir["mir"].sum(axis=1))
        tlo, thi = (np.log10(np.quantile(mir_boot, q, axis=1)) for q in ((1 - level) / 2, (1 + level) / 2))
        tot_attrs = {"long_name": "modality integration rate", "units": "log10",
                     "definition": f"log10 of the sum over layers {list(plan.layers)} of the per-layer MIR term "
                                   f"(site hidden; " + ("the last layer's term from site `final`, post-final-norm)"
                                                        if plan.final_state
                                                        else "the last layer's term from the pre-norm block output)")}
        data["mir_total"] = (("checkpoint",), total, tot_attrs)
        data["mir_total_lo"] = (("checkpoint",), tlo, {**tot_attrs, "long_name": "mir_total, interval low"})
        data["mir_total_hi"] = (("checkpoint",), thi, {**tot_attrs, "long_name": "mir_total, interval high"})
        total_boot = np.full((C, B), np.nan)
        total_boot[:, :plan.settings.n_mir] = np.log10(mir_boot)
        data["mir_total_boot"] = (("checkpoint", "draw"), total_boot, _boot_attrs(plan, "mir_total"))
    for m, arr in boots.items():
        dims = (REPORT_DIMS if m in cell_metrics else METRICS[m].dims) + ("draw",)
        data[m + "_boot"] = (dims, arr, _boot_attrs(plan, m))
    data["sigma"] = (("layer", "site", "modality"), sigmas,
                     {"long_name": "kernel bandwidth", "units": "model units",
                      "bandwidth_scale": plan.settings.bandwidth_scale,
                      "definition": f"{plan.settings.bandwidth_scale:g} x the median-heuristic sigma of the "
                                    f"reference's tokens "
                                    f"(unique pairs), per layer, site and modality: the MMD bandwidth for every "
                                    f"checkpoint and resample (so cells of one layer share their units); the "
                                    f"Sinkhorn blur is a fraction of the median-heuristic sigma itself"})
    coords = {"checkpoint": list(plan.labels), "layer": list(plan.layers), "site": list(plan.sites),
              "modality": list(plan.modalities)}
    if ext:
        coords["expert"] = list(range(plan.n_experts))
    report = xr.Dataset(data, coords=coords)
    report.attrs.update({
        "reference": plan.reference,
        **plan.attrs,
        "n_clusters": int(plan.n_clusters["all"]),
        **{f"n_clusters_{mod}": int(k) for mod, k in plan.n_clusters.items() if mod != "all"},
        "n_permutations": plan.settings.n_permutations,
        "n_bootstrap": plan.settings.n_bootstrap,
        "transport_resamples": plan.settings.transport_resamples,
        "mir_bootstrap": plan.settings.n_mir if plan.do_mir else 0,
        "level": level,
        "correction": str(plan.settings.correction),
        "n_tests": int(sum(n_tests.values())),
        "sinkhorn_blur": plan.settings.blur,
        "sinkhorn_scaling": SINKHORN_SCALING,
        "bandwidth_scale": plan.settings.bandwidth_scale,
        "seed": plan.settings.seed,
        "inference": "paired design; units of resampling are clusters: p-values from cluster sign flips "
                     "(swap reference and checkpoint tokens of whole clusters), intervals from a cluster "
                     "bootstrap (percentile)",
        "intervals_cover": "probe sampling only: the clusters of this run's probe set are resampled; the variation "
                           "between training runs (seeds) is not covered (combine runs: driftlens.compare)",
        "warnings": "\n".join(plan.notes + task_notes(results)),
        "driftlens_version": __version__,
    })
    if ext:
        report.attrs.update({"route_layers": list(plan.route_layers), "route_top_k": plan.route_top_k,
                             "expert_min_clusters": plan.expert_min_clusters})
    return report


def task_notes(results: list[dict]) -> tuple[str, ...]:
    """The notes the tasks found in the data (e.g. expert cells left NaN, and why), in task order."""
    return tuple(n for out in results for n in out.get("notes", ()))


def _extra_arrays(plan: GridPlan) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """NaN arrays of the registry-described variables of the routing and expert kinds: name -> (dims, array).

    Their shapes come from each metric's registry ``dims`` (plus ``draw`` for ``{m}_boot``), so a new
    metric of these kinds needs no code here.
    """
    sizes = {"checkpoint": len(plan.labels), "layer": len(plan.layers), "site": len(plan.sites),
             "modality": len(plan.modalities), "expert": plan.n_experts}
    out = {}
    for m in plan.of_kind("routing", "expert"):
        dims = METRICS[m].dims
        for suf in METRICS[m].outputs:
            out[m + suf] = (dims, np.full(tuple(sizes[d] for d in dims), np.nan))
        out[m + "_boot"] = (dims + ("draw",), np.full(tuple(sizes[d] for d in dims) + (plan.max_draws,), np.nan))
    if plan.of_kind("expert"):
        dims = ("layer", "modality", "expert")
        out[EXPERT_CLUSTERS] = (dims, np.full(tuple(sizes[d] for d in dims), np.nan))
    return out


def _fill_cells(ext: dict, cells_out: dict) -> None:
    """Write a task's ``cells`` -- name -> (fixed dim positions, array over the other dims) -- into ``ext``."""
    for name, (fixed, arr) in cells_out.items():
        dims, target = ext[name]
        idx = tuple(fixed[d] if d in fixed else slice(None) for d in dims)
        if name.endswith("_boot"):
            idx = idx[:-1] + (slice(0, arr.shape[-1]),)
        target[idx] = arr


def _boot_attrs(plan: GridPlan, metric: str) -> dict:
    n = plan.n_draws(metric)
    return {"long_name": f"{metric}, cluster-bootstrap draws", "units": "1" if metric == "mir_total" else
            METRICS[metric].units, "n_draws": n,
            "definition": f"the {metric} effect recomputed on {n} cluster-bootstrap draws (clusters drawn with "
                          f"replacement; entries past {n} are NaN). Draw b resamples the same clusters in every cell "
                          f"of this report (and of every report with the same seed and probe set), so the draws of two "
                          f"cells are paired: their difference is the bootstrap of the cells' difference "
                          f"(driftlens.compare); probe sampling only"}


def _attrs(plan: GridPlan, name: str) -> dict:
    spec = base_metric(name)
    suffix = name[len(spec.name) + 1:]
    perm, boot = plan.resamples(spec.name)
    if suffix in ("lo", "hi"):
        end = "low" if suffix == "lo" else "high"
        return {"long_name": f"{spec.long_name}, {plan.settings.level:.0%} interval {end} end",
                "units": spec.units, "level": plan.settings.level, "n_bootstrap": boot,
                "definition": f"percentile interval over {boot} cluster-bootstrap draws (clusters drawn with "
                              f"replacement)"}
    if suffix == "p":
        return {"long_name": f"{spec.long_name}, permutation p-value", "units": "1", "n_permutations": perm,
                "definition": f"(1 + k) / (1 + {perm}), k cluster sign flips (reference and checkpoint tokens of "
                              f"whole clusters swapped) whose statistic is >= the observed one; one-sided"}
    return {"long_name": spec.long_name, "units": spec.units, "definition": spec.definition}


__all__ = ["BlockSource", "DatasetBlocks", "GridPlan", "StoreBlocks", "Task", "assemble", "make_plan",
           "normalize_metrics", "run_grid", "run_task"]
