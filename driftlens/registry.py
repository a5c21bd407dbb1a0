"""The drift metrics, each described once: name, kind, long name, units, definition, outputs.

Everything that needs to know about a metric -- the report's validation of ``metrics=``, the
engine that computes a cell, the variables' attributes, the CLI's choices, the plots -- reads
:data:`METRICS`. It imports no driftlens module but ``errors``, and no torch.

Kinds
-----
``kernel``
    A U-statistic over clusters (the paired cluster MMD): effect, interval, p-value from one
    K x K pair-term matrix (:func:`driftlens.inference.u_statistic_inference`).
``transport``
    A plug-in distance between the reference's and the checkpoint's tokens, recomputed per
    resample; effect = excess over the mean of its sign-flip null.
``paired``
    A paired displacement of the same token rows; interval, no p-value.
``cross_modal``
    Visual tokens against the text tokens after the image, at one checkpoint (no reference):
    ``gap`` per (checkpoint, layer, site), ``mir`` per (checkpoint, layer) on ``hidden``.
``routing``
    The reference's and the checkpoint's per-token routing distributions over experts (the store
    site ``route`` of a mixture-of-experts decoder), paired by token: ``route_js`` (per-token
    divergence; interval) and ``route_load`` (expert-load shift, a cluster U-statistic like
    ``mmd``; interval and sign-flip p-value), per (checkpoint, sparse layer, modality).
``expert``
    A kernel metric restricted to the tokens the reference routes to one expert: ``expert_mmd``
    per (checkpoint, sparse layer, site, modality, expert); NaN with a reason in the report's
    warnings where too few clusters have such tokens.

``MetricSpec.site`` names the store site a metric reads when it is not the report's ``site``
(``route`` for the routing kind, ``hidden`` for ``mir``); the engine reads kinds and sites from here,
never metric names, and computes a kind's cells with the function :mod:`driftlens.stats.kinds` lists
for it. Labels, "vs reference", figures and the default set are read by the plots, the explorer
and the CLI.

Adding a metric: :func:`register` (and, for a new kind, :func:`driftlens.stats.kinds.register_kind`);
:func:`unregister` removes it. The built-in metrics are :data:`BUILTIN`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from driftlens.errors import UsageError

Kind = Literal["kernel", "transport", "paired", "cross_modal", "routing", "expert"]
#: the names :func:`driftlens.drift` accepts in ``metrics=`` (the registry's names and aliases; a test checks)
Metric = Literal["mmd", "sinkhorn", "sliced_w", "gauss_w2", "paired_shift", "shift", "gap", "mir", "route_js",
                 "route_load", "expert_mmd"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the report.

    Attributes
    ----------
    name : str
        Variable name in the report.
    kind : {"kernel", "transport", "paired", "cross_modal", "routing", "expert"}
        How the engine computes it (see the module docstring).
    long_name, units, definition : str
        The report variable's attributes.
    dims : tuple of str
        The report variable's dimensions.
    outputs : tuple of str
        Suffixes of the variables a cell fills: ``""`` (effect), ``"_lo"``, ``"_hi"``, ``"_p"``.
    site : str or None
        The store site the metric reads where it is not the report's ``site`` dim (``"route"``:
        the routing distributions; ``"hidden"``: MIR); None for the others.
    label : str
        Short label of plots (matplotlib mathtext); default the name.
    html_label : str
        Short label of the explorer (plain unicode); default ``label``.
    vs_reference : bool
        Drawn as a change from the reference checkpoint: plots leave out its row (0 by construction) and
        title the figure "vs REFERENCE" (the routing and expert metrics are drawn with it).
    draws : {"bootstrap", "transport", "mir"}
        Which of the report's resampling counts its cells use (``n_bootstrap`` / ``n_permutations``,
        the capped ``transport_resamples``, ``mir_bootstrap``).
    figures : tuple of str
        What :func:`driftlens.plot.plot_report` draws of it: ``"cell"`` (a heatmap and lines by layer per
        site and modality, and contrasts), ``"vs_alpha"`` (against a merge's alpha), ``"gap_lines"``,
        ``"mir_lines"``.
    default : bool
        In the report's default metric set (:data:`DEFAULT_METRICS`).
    """

    name: str
    kind: str
    long_name: str
    units: str
    definition: str
    dims: tuple[str, ...] = ("checkpoint", "layer", "site", "modality")
    outputs: tuple[str, ...] = ("", "_lo", "_hi", "_p")
    site: str | None = None
    label: str = ""
    html_label: str = ""
    vs_reference: bool = True
    draws: str = "bootstrap"
    figures: tuple[str, ...] = ()
    default: bool = False

    @property
    def tested(self) -> bool:
        """Whether the metric has a p-value (and so an adjusted ``_q`` over the grid)."""
        return "_p" in self.outputs


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec(
        "mmd", "kernel", "squared maximum mean discrepancy (paired cluster estimate)", "1",
        "mean over pairs of distinct clusters a != b of <D_a, D_b>, D_a the difference between the mean kernel "
        "embeddings of cluster a's tokens at the reference and at the checkpoint; Gaussian kernel "
        "exp(-|x-y|^2/(2 sigma^2)), sigma = the reference tokens' median heuristic (variable `sigma`). "
        "Unbiased for MMD^2 between the two token distributions, clusters weighted equally",
        label='MMD$^2$', html_label='MMD²', figures=('cell', 'vs_alpha'), default=True),
    MetricSpec(
        "sinkhorn", "transport", "debiased Sinkhorn divergence, excess over the no-change null", "model units^2",
        "geomloss SamplesLoss('sinkhorn', p=2) (cost |x-y|^2/2, blur = attrs sinkhorn_blur x sigma) between the "
        "reference's and the checkpoint's tokens, minus the mean of the same under cluster sign flips",
        label='Sinkhorn divergence', draws='transport', figures=('cell',)),
    MetricSpec(
        "sliced_w", "transport", "sliced Wasserstein-2 distance, excess over the no-change null", "model units",
        "(mean over random unit projections of W_2^2)^(1/2) between the reference's and the checkpoint's tokens, "
        "minus the mean of the same under cluster sign flips",
        label='sliced $W_2$', html_label='sliced W₂', draws='transport', figures=('cell',)),
    MetricSpec(
        "gauss_w2", "transport", "Gaussian Wasserstein-2 distance, excess over the no-change null", "model units",
        "closed-form W2 between Gaussians fitted to the reference's and the checkpoint's tokens (unbiased "
        "covariances, exact square roots), minus the mean of the same under cluster sign flips",
        label='Gaussian $W_2$', html_label='Gaussian W₂', draws='transport', figures=('cell',)),
    MetricSpec(
        "paired_shift", "paired", "paired token displacement, relative to the spread between clusters", "1",
        "sqrt(mean over clusters of mean |c_i - r_i|^2 / mean over token pairs of distinct clusters of "
        "|r_i - r_j|^2): same token rows at the checkpoint (c) and the reference (r)",
        outputs=("", "_lo", "_hi"),
        label='paired token shift', figures=('cell',), default=True),
    MetricSpec(
        "gap", "cross_modal", "modality gap", "1",
        "|mean(normalize(visual)) - mean(normalize(text))| over the tokens of the checkpoint (Liang et al. 2022); "
        "text = the text tokens after the image",
        dims=("checkpoint", "layer", "site"), outputs=("", "_lo", "_hi"),
        label='modality gap', vs_reference=False, figures=('gap_lines',), default=True),
    MetricSpec(
        "mir", "cross_modal", "modality integration rate, per-layer term", "1",
        "Frechet distance between visual tokens and the text tokens after the image, both scaled by 1/mean "
        "text-token norm, 3-std norm outliers replaced by the per-dimension median, unbiased covariances, exact "
        "square root (Huang et al. 2025); the last layer after the model's final norm",
        dims=("checkpoint", "layer"), outputs=("", "_lo", "_hi"),
        label='MIR (per-layer term)', vs_reference=False, draws='mir', figures=('mir_lines',), default=True,
        site='hidden'),
    MetricSpec(
        "route_js", "routing", "routing divergence per token (Jensen-Shannon)", "bits",
        "mean over clusters of the mean over the cluster's tokens of JS(p_i, q_i) = (KL(p_i|m_i) + KL(q_i|m_i)) / 2, "
        "m_i = (p_i + q_i) / 2, log base 2 (0 = the token is routed the same, 1 = to disjoint experts): p_i and q_i "
        "the routing distributions over experts of the same token at the reference and at the checkpoint (site "
        "`route`). A per-token change of a deterministic model: interval, no p-value (see route_load)",
        dims=("checkpoint", "layer", "modality"), outputs=("", "_lo", "_hi"), site="route",
        vs_reference=False),
    MetricSpec(
        "route_load", "routing", "expert-load shift (paired cluster estimate)", "probability^2",
        "mean over pairs of distinct clusters a != b of <D_a, D_b>, D_a the mean over cluster a's tokens of q_i - p_i "
        "(checkpoint minus reference routing distribution over experts): unbiased for |E q - E p|^2, the squared L2 "
        "distance between the expert loads (mean routing distributions) of the token population, clusters weighted "
        "equally; the MMD^2 of the routing distributions with a linear kernel, with the same sign-flip null",
        dims=("checkpoint", "layer", "modality"), site="route",
        vs_reference=False),
    MetricSpec(
        "expert_mmd", "expert", "squared MMD of the tokens routed to one expert (paired cluster estimate)", "1",
        "the paired cluster MMD^2 (as `mmd`, same kernel bandwidth `sigma`) restricted to the tokens the reference "
        "routes to the expert at this layer (its top-k experts, k = attrs route_top_k): how the tokens that expert "
        "serves drifted, at the cell's site; U-statistic over the clusters that have such tokens (attrs "
        "expert_min_clusters; NaN below, with the reason in the report's warnings)",
        dims=("checkpoint", "layer", "site", "modality", "expert"),
        vs_reference=False),
)}

ALIASES = {"shift": "paired_shift"}


#: the built-in metrics (:func:`register` adds others)
BUILTIN = tuple(METRICS)
#: the report's default metric set
DEFAULT_METRICS = tuple(name for name, spec in METRICS.items() if spec.default)


def register(spec: MetricSpec) -> None:
    """Add a metric to the registry: the report computes it (by its ``kind``), the CLI offers it, the plots
    draw it (by its ``figures``). A new kind also needs its cell function
    (:func:`driftlens.stats.kinds.register_kind`). :func:`unregister` removes it again.

    The module-level tuples (:data:`ALL_METRICS`, :data:`DISTRIBUTIONAL`) are snapshots of the built-in
    metrics; read :data:`METRICS` (or call :func:`of_kind`) to see registered ones.
    """
    if spec.name in METRICS or spec.name in ALIASES:
        raise UsageError(f"metric {spec.name!r} is already registered")
    if any(spec.name.startswith(m + "_") or m.startswith(spec.name + "_") for m in METRICS):
        raise UsageError(f"metric {spec.name!r} would make report variable names ambiguous with "
                         f"{[m for m in METRICS if spec.name.startswith(m + '_') or m.startswith(spec.name + '_')]}")
    METRICS[spec.name] = spec


def unregister(name: str) -> None:
    """Remove a metric added by :func:`register` (built-in metrics stay)."""
    if name in BUILTIN:
        raise UsageError(f"metric {name!r} is built in")
    METRICS.pop(name, None)


def short_label(name: str) -> str:
    """A metric's (or report variable's) short plot label: the registry's ``label``, else the name."""
    spec = METRICS.get(name)
    return (spec.label or spec.name) if spec is not None else name


def of_kind(*kinds: Kind) -> tuple[str, ...]:
    """Names of the metrics of these kinds, in registry order."""
    return tuple(name for name, spec in METRICS.items() if spec.kind in kinds)


ALL_METRICS = tuple(METRICS)
DISTRIBUTIONAL = of_kind("kernel", "transport")     # reference vs checkpoint, with a p-value


def base_metric(variable: str) -> MetricSpec:
    """The metric a report variable belongs to (``mmd_lo`` -> mmd); KeyError when none."""
    for name in sorted(METRICS, key=len, reverse=True):
        if variable == name or variable.startswith(name + "_"):
            return METRICS[name]
    raise KeyError(variable)
