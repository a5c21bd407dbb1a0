"""The anchor drift regularizer: a differentiable MMD^2 that keeps visual tokens in distribution.

While the LLM of a VLM adapts (to a new language), its visual tokens drift out of the
distribution they had at the reference checkpoint (the drift report measures where and how much).
:class:`AnchorDriftLoss` adds, for chosen decoder layers, the MMD^2 between the current batch's
visual-token hidden states and *anchor* visual tokens of the reference checkpoint, read from an
activation store::

    loss_fn = dl.AnchorDriftLoss.from_store(ds, checkpoint="base", layers=[1, 2, 3], mode="tracking")
    with VisualTap(model, loss_fn.layers) as tap:        # driftlens.train.tap: hooks, no 2nd forward
        out = model(**batch)
        loss = out.loss + lam * loss_fn(tap.visual, tap.text)

Two modes
---------
``fixed``
    The current visual tokens are compared with the anchors as they were: the regularizer pulls
    them back to where the reference model had them (freezing, in distribution).
``tracking``
    Both sides are first expressed in their own model's *text frame*: ``z = (x - mu_t) / s_t``,
    with ``mu_t`` the mean of the text tokens of the same layer and ``s_t`` their mean L2 distance
    to ``mu_t`` (MIR's text-centric scaling, Huang et al. 2025, with centering added so that a shift
    of the whole space does not count as drift). The anchors use the reference's text tokens, the
    current batch uses its own (detached: the regularizer moves visual tokens relative to the
    text, it does not move the text to meet them). Visual tokens may then follow the LLM's moving
    embedding space -- a translation and an isotropic rescaling of the layer cost nothing -- but
    must keep their place relative to text: co-adaptation, not freezing.

Estimator
---------
The unbiased MMD^2 (U-statistic): ``mean_{i != j} k(x_i, x_j) + mean_{a != b} k(y_a, y_b) -
2 mean_{i, a} k(x_i, y_a)`` with ``k = exp(-|x - y|^2 / (2 sigma^2))``. Its expectation is the
population MMD^2, zero exactly when the batch's visual tokens are distributed as the anchors, so
the minimizer of the expected loss is the anchor distribution and each step's gradient is an
unbiased estimate of the population gradient. The biased V-statistic (diagonals kept) is >= 0 but
adds ``(1 - mean k) / m`` terms that weight the batch's self-similarity by ``(m - 1) / m``: its
expected minimizer is more concentrated than the anchors, by an amount that depends on the batch
size. The U-statistic can be slightly negative near the optimum; that is noise around 0, not a
bug, and it does not push anything (its expected gradient there is 0).

Bounded memory and a fixed kernel
---------------------------------
The anchors are a fixed-size sample (``n_anchors``, stratified by cluster: equal shares of the
probe set's independent units, rows drawn at random within each). Kernel sums are computed in
row blocks of ``block_size``; with gradients, each block is recomputed in the backward pass
(activation checkpointing), so memory is O(block_size x max(m, n)) whatever the batch. The
bandwidths are fixed once from the anchors and kept for the whole run, so the loss's scale does
not move with the batch: the kernel is the mean of Gaussian kernels at 0.5, 1, 2, 4 and 8 times
the anchors' median-heuristic sigma (``sqrt(median(d^2) / 2)`` over anchor pairs, alibi-detect's
convention). One median-heuristic kernel alone has vanishing gradients once the visual tokens
have moved several sigmas away (every cross term ~ 0); the wider kernels of the mixture keep a
gradient pointing back, the narrow ones keep it sharp near the anchors. Each kernel is
characteristic, so the mixture's MMD^2 is still 0 only at the anchor distribution. Measured once
(one seed, bench/RESULTS.md): the organism's random-init LLaVA with its LLM weights perturbed by
N(0, 0.02^2), 40 Adam steps on this loss alone: the single kernel kept 91% of its initial value,
the mixture 33%; after a perturbation of 0.05 both stalled (99%, 95%) -- a drift that large is
beyond what an MMD penalty pulls back in 40 steps.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from driftlens.errors import UsageError, check_count
from driftlens.schema import Modality, Site
from driftlens.select import (
    checkpoint_labels,
    cluster_labels,
    pick_checkpoint,
    pick_layers,
    pick_site,
    reference_of,
)
from driftlens.stats.kernels import kernel_sum, mmd2_unbiased

AnchorMode = Literal["fixed", "tracking"]
MODES: tuple[AnchorMode, ...] = ("fixed", "tracking")
DEFAULT_BLOCK = 2048
DEFAULT_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)    # bandwidths, in units of the anchors' median-heuristic sigma


# ----------------------------------------------------------------------------- pure functions

def text_frame(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-centric frame of one layer: mean ``[d]`` and scale (mean L2 distance to the mean, scalar).

    Parameters
    ----------
    text : tensor [n_t, d]
        Text-token states of one layer (at least two rows, not all equal).
    """
    if text.ndim != 2 or text.shape[0] < 2:
        raise UsageError(f"text frame: expected [n_text >= 2, d] text states, got shape {tuple(text.shape)}")
    mean = text.mean(0)                                     # [d]
    scale = (text - mean).norm(dim=1).mean()                # []
    if not bool(scale > 0):
        raise UsageError("text frame: every text token has the same state; the scale is undefined")
    return mean, scale


def to_frame(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / scale`` -- states expressed in a text frame."""
    return (x - mean) / scale


# ----------------------------------------------------------------------------- anchors from a store

def stratified_rows(clusters: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """At most ``n`` row indices spread evenly over clusters (round robin over shuffled clusters,
    random rows within each), sorted."""
    rng = np.random.default_rng(seed)
    uniq, codes = np.unique(clusters, return_inverse=True)
    order = np.argsort(codes.reshape(-1), kind="stable")                 # rows grouped by cluster
    groups = np.split(order, np.cumsum(np.bincount(codes.reshape(-1), minlength=len(uniq)))[:-1])
    pools = [list(rng.permutation(groups[i])) for i in rng.permutation(len(uniq))]
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(p) for p in pools):
        for p in pools:
            if depth < len(p) and len(out) < n:
                out.append(int(p[depth]))
        depth += 1
    return np.sort(np.asarray(out, dtype=np.int64))


def report_weights(report, layers: Sequence[int], var: str = "mmd", checkpoint=None, site: Site = "hidden",
                   modality: Modality = "visual") -> dict[int, float]:
    """Per-layer weights from a drift report: the effect at ``checkpoint``, clipped at 0 and
    normalized to sum 1 (equal weights when every effect is <= 0).

    ``checkpoint`` may be left out when the report holds one trajectory besides its reference (its
    last checkpoint is used): a report over a trajectory and its control (``ko-1 .. ko-5, en-1 ..
    en-5``) has no "last" checkpoint that is obviously the one meant, so it is refused rather than
    guessed (:func:`driftlens.select.pick_checkpoint`). A report with several runs: the mean over runs.
    """
    if var not in report.data_vars:
        raise UsageError(f"the report has no {var!r}; it has {sorted(report.data_vars)}")
    da = report[var]
    if "run" in da.dims:
        da = da.mean("run")
    labels = checkpoint_labels(report)
    ck = pick_checkpoint(labels, checkpoint, reference=reference_of(report) if labels else "",
                         what="the layer weights", flag="checkpoint")
    sel = {"checkpoint": ck}
    sel.update({k: v for k, v in (("site", site), ("modality", modality)) if k in da.dims})
    prof = da.sel(sel)
    layers = pick_layers(prof, layers, where="the report")
    vals = np.array([float(prof.sel(layer=layer)) for layer in layers])
    if not np.isfinite(vals).all():
        raise UsageError(f"the report's {var} at {ck!r} is not finite at layers "
                         f"{[la for la, v in zip(layers, vals) if not np.isfinite(v)]}")
    vals = np.clip(vals, 0.0, None)
    vals = np.ones_like(vals) if vals.sum() <= 0 else vals
    return {int(la): float(v) for la, v in zip(layers, vals / vals.sum())}


def _same_store(report, ds) -> None:
    """Refuse layer weights from a report of another probe set, token selection or architecture than ``ds``.

    A report records the identity of the store it was computed from (probe fingerprint, token selection,
    model type, layer count); a report without those records (written before driftlens kept them) is
    checked on what it has, with a warning that the probe set could not be compared.
    """
    import warnings

    checked = []
    for key, what in (("probe_fingerprint", "probe set"), ("token_selection", "token selection"),
                      ("model_type", "model type"), ("n_layers", "layer count")):
        mine, theirs = ds.attrs.get(key), report.attrs.get(key)
        if mine is None or theirs is None or str(theirs) == "":
            continue
        checked.append(key)
        if str(mine) != str(theirs):
            raise UsageError(f"weights: the drift report was computed from another {what} than this store "
                             f"({key} {theirs!r} in the report, {mine!r} in {ds.attrs.get('store_path', 'the store')}"
                             f"; report of {report.attrs.get('store_path', 'an unrecorded store')}): its layer "
                             f"weights do not describe these anchors -- compute the report from this store")
    if "probe_fingerprint" not in checked:
        warnings.warn("weights: the drift report does not record its probe set (written by an older driftlens); "
                      "it is assumed to come from this store", stacklevel=3)


# ----------------------------------------------------------------------------- the module

class AnchorDriftLoss(torch.nn.Module):
    """Weighted sum over layers of the unbiased MMD^2 between current visual tokens and anchors.

    Parameters
    ----------
    anchors : mapping layer -> tensor [n, d]
        Reference visual-token states per decoder layer.
    mode : {"fixed", "tracking"}
        See the module docstring.
    anchor_text : mapping layer -> tensor [n_t, d], optional
        Reference text-token states per layer (needed for ``tracking``: their text frame).
    weights : mapping layer -> float, optional
        Per-layer weights (default ``1 / n_layers`` each).
    block_size : int
        Rows per kernel block (memory bound, see the module docstring).
    scales : sequence of float
        Bandwidths of the kernel mixture in units of the anchors' median-heuristic sigma
        (default 0.5, 1, 2, 4, 8; ``(1.0,)`` gives the single median-heuristic kernel).
    site : {"hidden", "key"}
        What the anchors are, and so what the training tap must read
        (:class:`~driftlens.train.objective.DriftObjective` taps this site): decoder-block outputs, or the
        attention keys (the key projection's output, the seed method's key-space view).

    Attributes
    ----------
    layers : list of int
    sigma : dict layer -> float
        The median-heuristic bandwidth per layer (over anchor pairs, in the mode's frame).
    sigmas : dict layer -> tuple of float
        The kernel mixture's fixed bandwidths per layer (``sigma`` times ``scales``).
    last : dict layer -> float
        The per-layer terms of the last call (detached; for logging).
    """

    def __init__(self, anchors: Mapping[int, torch.Tensor], mode: AnchorMode = "fixed",
                 anchor_text: Mapping[int, torch.Tensor] | None = None,
                 weights: Mapping[int, float] | None = None, block_size: int = DEFAULT_BLOCK,
                 scales: Sequence[float] = DEFAULT_SCALES, site: Site = "hidden"):
        super().__init__()
        from driftlens.metrics import median_sigma
        from driftlens.train.tap import SITES

        if mode not in MODES:
            raise UsageError(f"mode must be one of {MODES}, got {mode!r}")
        if site not in SITES:
            raise UsageError(f"site must be one of {SITES} (what a VisualTap reads during training), got {site!r}")
        self.site = site
        if not anchors:
            raise UsageError("anchors is empty: give at least one layer")
        if block_size < 1:
            raise UsageError(f"block_size must be >= 1, got {block_size}")
        self.mode, self.block_size = mode, int(block_size)
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or any(not (np.isfinite(s) and s > 0) for s in self.scales):
            raise UsageError(f"scales must be finite and > 0, got {scales!r}")
        self.layers = sorted(int(k) for k in anchors)
        weights = {la: 1.0 / len(self.layers) for la in self.layers} if weights is None else dict(weights)
        unknown = sorted(set(map(int, weights)) - set(self.layers))
        if unknown or any(la not in weights for la in self.layers):
            raise UsageError(f"weights must name exactly the anchor layers {self.layers}, got {sorted(weights)}")
        if any(not np.isfinite(w) or w < 0 for w in weights.values()):
            raise UsageError(f"weights must be finite and >= 0, got {weights}")
        self.weights = {int(k): float(v) for k, v in weights.items()}
        if mode == "tracking" and (anchor_text is None or any(la not in anchor_text for la in self.layers)):
            raise UsageError("mode='tracking' needs anchor_text (the reference's text-token states) for every layer")
        self.sigma: dict[int, float] = {}
        self.sigmas: dict[int, tuple[float, ...]] = {}
        self.last: dict[int, float] = {}
        for la in self.layers:
            a = torch.as_tensor(anchors[la])                # [n, d]
            if a.ndim != 2 or a.shape[0] < 2:
                raise UsageError(f"anchors of layer {la}: expected [n >= 2, d], got {tuple(a.shape)}")
            if not bool(torch.isfinite(a).all()):
                raise UsageError(f"anchors of layer {la} hold NaN/Inf")
            if mode == "tracking":
                mean, scale = text_frame(torch.as_tensor(anchor_text[la]).to(a.dtype))
                a = to_frame(a, mean, scale)
            a = a.detach()
            base = median_sigma(a, pairs="reference", max_points=None)
            sigmas = tuple(float(base) * s for s in self.scales)
            yy = kernel_sum(a, a, sigmas, within=True, block_size=self.block_size) / (a.shape[0] * (a.shape[0] - 1))
            self.register_buffer(f"anchor_{la}", a)
            self.register_buffer(f"anchor_yy_{la}", yy.detach())
            self.sigma[la] = float(base)
            self.sigmas[la] = sigmas

    def extra_repr(self) -> str:
        """Mode, layers, anchor counts and block size (for ``repr``)."""
        n = {la: int(getattr(self, f"anchor_{la}").shape[0]) for la in self.layers}
        return (f"mode={self.mode!r}, site={self.site!r}, layers={self.layers}, anchors={n}, "
                f"block_size={self.block_size}")

    def anchors(self, layer: int) -> torch.Tensor:
        """The anchor states of ``layer`` in the mode's frame ``[n, d]``."""
        return getattr(self, f"anchor_{layer}")

    def term(self, layer: int, visual: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Unbiased MMD^2 of one layer between ``visual`` [m, d] and the anchors (differentiable)."""
        a = self.anchors(layer)
        x = visual.to(a.dtype) if visual.dtype != a.dtype else visual
        if self.mode == "tracking":
            if text is None:
                raise UsageError(f"mode='tracking' needs the current text-token states of layer {layer}")
            mean, scale = text_frame(text.detach().to(a.dtype))
            x = to_frame(x, mean, scale)
        if x.shape[-1] != a.shape[-1]:
            raise UsageError(f"layer {layer}: current states have {x.shape[-1]} features, anchors {a.shape[-1]}")
        return mmd2_unbiased(x, a, self.sigmas[layer], yy=getattr(self, f"anchor_yy_{layer}"),
                             block_size=self.block_size)

    def forward(self, visual: Mapping[int, torch.Tensor],
                text: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """``sum_l w_l MMD^2_l``; ``visual`` / ``text`` map each anchor layer to ``[rows, d]`` states
        (``VisualTap.visual`` / ``.text``). The per-layer terms are kept in :attr:`last`."""
        missing = [la for la in self.layers if la not in visual]
        if missing:
            raise UsageError(f"no current visual states for layer(s) {missing} (the tap must read {self.layers})")
        total = None
        self.last = {}
        for la in self.layers:
            t = self.term(la, visual[la], None if text is None else text.get(la))
            self.last[la] = float(t.detach())
            total = self.weights[la] * t if total is None else total + self.weights[la] * t
        return total

    # ------------------------------------------------------------------ construction from a store
    @classmethod
    def from_store(cls, ds, checkpoint: str | None = None, layers: Sequence[int] | None = None,
                   mode: AnchorMode = "fixed", n_anchors: int = 1024, weights=None,
                   weights_checkpoint: str | None = None, site: Site = "hidden",
                   seed: int = 0, dtype=torch.float32, device=None,
                   block_size: int = DEFAULT_BLOCK, scales: Sequence[float] = DEFAULT_SCALES) -> AnchorDriftLoss:
        """Anchors from a reference checkpoint of an activation store.

        Parameters
        ----------
        ds : xarray.Dataset or path
            An activation store (:func:`driftlens.open_store`).
        checkpoint : str, optional
            The reference checkpoint (default: :func:`driftlens.select.reference_of`'s rule: the store's
            recorded reference, else its first checkpoint).
        layers : sequence of int, optional
            Decoder layers (default: every captured layer).
        mode : {"fixed", "tracking"}
        n_anchors : int
            Anchor visual tokens per layer (the same rows for every layer), stratified by cluster.
        weights : mapping layer -> float, or a drift report (xarray.Dataset), optional
            Per-layer weights; a report gives :func:`report_weights` (its visual ``mmd`` at
            ``weights_checkpoint``, clipped at 0, normalized). Default equal weights summing to 1.
        weights_checkpoint : str, optional
            The report checkpoint whose drift weighs the layers (e.g. the end of the adaptation being
            regularized); needed when the report has more than one checkpoint besides its reference.
        site : str
            Store variable (default ``hidden``).
        seed : int
            Seed of the anchor sample.
        """
        from driftlens.store import open_store

        if not hasattr(ds, "data_vars"):
            ds = open_store(ds)
        n_anchors = check_count("n_anchors", n_anchors, least=2)
        pick_site(ds, site, layered=True)
        labels = checkpoint_labels(ds)
        if not labels:
            raise UsageError("the store holds no completed checkpoint")
        checkpoint = reference_of(ds, checkpoint, among=labels, where="the store")
        layers = pick_layers(ds, layers, where="the store")
        if weights is not None and hasattr(weights, "data_vars"):
            _same_store(weights, ds)
            weights = report_weights(weights, layers, checkpoint=weights_checkpoint, site=site)
        modality = np.asarray(ds["modality"].values).astype(str)
        vis_rows = np.flatnonzero(modality == "visual")
        txt_rows = np.flatnonzero(modality == "text")
        if vis_rows.size < 2:
            raise UsageError("the store has fewer than 2 visual tokens")
        rows = vis_rows[stratified_rows(cluster_labels(ds)[0][vis_rows], int(n_anchors), seed)]
        data = ds[site].sel(checkpoint=checkpoint)
        anchors, text = {}, {}
        for la in layers:
            block = np.asarray(data.sel(layer=la).values)                    # [T, d]
            anchors[la] = torch.as_tensor(block[rows], dtype=dtype, device=device)
            if mode == "tracking":
                text[la] = torch.as_tensor(block[txt_rows], dtype=dtype, device=device)
        loss = cls(anchors, mode=mode, anchor_text=text or None, weights=weights, block_size=block_size,
                   scales=scales, site=site)
        loss.source = {"checkpoint": checkpoint, "site": site, "n_anchors": int(rows.size),
                       "n_clusters": int(np.unique(cluster_labels(ds)[0][rows]).size), "seed": int(seed)}
        return loss
