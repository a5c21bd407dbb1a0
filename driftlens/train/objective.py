"""Training with the drift regularizer: one objective, a plain-loop step, a ``Trainer``, a callback.

The objective adds to the model's LM loss the anchor drift term (:class:`AnchorDriftLoss` on the
visual-token states that :class:`~driftlens.train.tap.VisualTap` reads during the training
forward itself -- no second forward) and, optionally, the grounding contrast (one extra,
text-only forward)::

    objective = DriftObjective(model, drift=dl.AnchorDriftLoss.from_store(ds, layers=[1, 2, 3]),
                               drift_weight=1.0, contrast_weight=0.1)
    for batch in loader:                                   # a plain PyTorch loop
        loss, terms, _ = objective(model, batch)           # terms: lm, drift, contrast, total (floats)
        loss.backward(); opt.step(); opt.zero_grad()

    trainer = DriftTrainer(model=model, args=args, train_dataset=ds, objective=objective,
                           callbacks=[DriftCallback(probe_batches, clusters, layers=[1, 2, 3], every=50)])

:class:`DriftTrainer` logs every term (``lm_loss``, ``drift_loss``, ``contrast_loss``, averaged
over the steps since the last log); :class:`DriftCallback` measures, every ``every`` steps, the
drift of a small probe set's visual tokens against their states at the start of training, per
layer, with the report's statistic (paired cluster MMD^2, cluster-bootstrap interval), and logs
it through ``Trainer.log`` (``drift_mmd/layer_{l}``, ``_lo``, ``_hi``, ``_p``) -- so a user sees drift
while training, in whatever dashboard ``report_to`` feeds, not after.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from driftlens.errors import UsageError


def _labels_free(batch: Mapping) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


class ObjectiveStep(NamedTuple):
    """What one :class:`DriftObjective` call returns."""

    loss: torch.Tensor          # the total loss to backpropagate (0-d)
    terms: dict[str, float]     # lm_loss, drift_loss (+ per layer), contrast_loss, loss
    outputs: Any                # the model's outputs of the training forward


class DriftObjective:
    """LM loss + ``drift_weight`` x anchor drift + ``contrast_weight`` x grounding contrast.

    Parameters
    ----------
    model : torch.nn.Module
        The model being trained (plain or PEFT-wrapped); the tap's hooks are placed on it now.
    drift : AnchorDriftLoss, optional
        The drift term (its ``layers`` are tapped).
    drift_weight, contrast_weight : float
        Weights of the two terms (a term with weight 0 costs nothing).
    margin : float
        The grounding contrast's hinge margin (nats per answer token).
    spec : Spec, optional
        Architecture spec (default: by the model's ``model_type``).
    """

    def __init__(self, model, drift=None, drift_weight: float = 1.0, contrast_weight: float = 0.0,
                 margin: float = 1.0, spec=None):
        from driftlens.specs import load_spec, unwrap
        from driftlens.train.grounding import GroundingContrast
        from driftlens.train.tap import VisualTap

        for name, w in (("drift_weight", drift_weight), ("contrast_weight", contrast_weight)):
            if not (np.isfinite(w) and w >= 0):
                raise UsageError(f"{name} must be finite and >= 0, got {w}")
        base = unwrap(model)
        self.spec = spec or load_spec(base)
        self.image_token_id = int(self.spec.image_token_id(base.config))
        self.drift, self.drift_weight = drift, float(drift_weight)
        self.contrast_weight = float(contrast_weight)
        self.tap = None
        if drift is not None and self.drift_weight > 0:
            self.tap = VisualTap(model, drift.layers, spec=self.spec, site=getattr(drift, "site", "hidden")).attach()
        self.contrast = None
        if self.contrast_weight > 0:
            pad = getattr(base.config, "pad_token_id", None)
            pad = getattr(base.config.get_text_config(), "pad_token_id", None) if pad is None else pad
            self.contrast = GroundingContrast(self.image_token_id, 0 if pad is None else pad, margin)

    def has_image(self, batch: Mapping) -> bool:
        """Whether ``batch`` holds image tokens (text-only batches skip both terms)."""
        ids = batch.get("input_ids")
        return ids is not None and bool((ids == self.image_token_id).any())

    def _tap_paused(self, pause: bool):
        import contextlib

        return self.tap.paused() if (pause and self.tap is not None) else contextlib.nullcontext()

    def detach(self) -> None:
        """Remove the tap's hooks from the model."""
        if self.tap is not None:
            self.tap.detach()

    def __call__(self, model, batch: Mapping) -> ObjectiveStep:
        """One training forward: ``ObjectiveStep(loss, terms, outputs)`` (unpacks as a 3-tuple)."""
        if "labels" not in batch:
            raise UsageError("the batch has no `labels`: the LM loss needs them")
        image = self.has_image(batch)
        with self._tap_paused(not image):          # a text-only batch: no visual tokens to read
            out = model(**batch, use_cache=False)
        loss = out.loss
        terms = {"lm_loss": float(loss.detach())}
        if self.tap is not None and image:
            drift = self.drift(self.tap.visual, self.tap.text)
            loss = loss + self.drift_weight * drift
            terms["drift_loss"] = float(drift.detach())
            terms.update({f"drift_loss/layer_{la}": v for la, v in self.drift.last.items()})
            self.tap.clear()
        if self.contrast is not None and image:
            with self._tap_paused(True):           # the text-only pass is not read
                c = self.contrast(model, batch, out.logits)
            loss = loss + self.contrast_weight * c
            terms["contrast_loss"] = float(c.detach())
            terms["contrast_delta"] = self.contrast.last["delta"]
        terms["loss"] = float(loss.detach())
        return ObjectiveStep(loss, terms, out)


def train_steps(model, batches, objective: DriftObjective, optimizer, steps: int, on_step=None) -> list[dict]:
    """A plain training loop: ``steps`` batches from ``batches(step)``; returns every step's terms.

    ``on_step(step, terms)`` is called after each optimizer step (return True to stop).
    """
    history = []
    model.train()
    for step in range(steps):
        loss, terms, _ = objective(model, batches(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(terms)
        if on_step is not None and on_step(step + 1, terms):
            break
    return history
