"""Training with the drift regularizer: one objective, a plain-loop step, a ``Trainer``, a callback.

The objective adds to the model's LM loss the anchor drift term (:class:`AnchorDriftLoss` on the
visual-token states that :class:`~driftlens.training.VisualTap` reads during the training
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

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from driftlens.errors import UsageError, check_count


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
        from driftlens.regularizer import GroundingContrast
        from driftlens.specs import load_spec, unwrap
        from driftlens.training import VisualTap

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


def _trainer_base():
    from transformers import Trainer

    return Trainer


class _TermLog:
    """Running means of the objective's terms between two logs."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, terms: Mapping[str, float]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def flush(self) -> dict[str, float]:
        out = {k: v / self.n for k, v in self.sums.items()} if self.n else {}
        self.sums, self.n = {}, 0
        return out


def make_drift_trainer():
    """The :class:`DriftTrainer` class (built on first use: importing driftlens does not import transformers)."""
    Trainer = _trainer_base()

    class DriftTrainer(Trainer):
        """A ``transformers.Trainer`` whose loss is a :class:`DriftObjective` and whose logs carry each term.

        Pass ``objective=`` besides the usual arguments. Each log adds ``lm_loss``, ``drift_loss``
        (and per layer), ``contrast_loss``, averaged over the steps since the previous log.
        """

        def __init__(self, *args, objective: DriftObjective, **kwargs):
            super().__init__(*args, **kwargs)
            self.objective = objective
            self._terms = _TermLog()
            for callback in self.callback_handler.callbacks:      # drift callbacks log through this trainer
                if hasattr(callback, "attach"):
                    callback.trainer = self

        def add_callback(self, callback):
            super().add_callback(callback)
            if hasattr(callback, "attach") and not isinstance(callback, type):
                callback.trainer = self

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, terms, out = self.objective(model, inputs)
            if model.training:
                self._terms.add(terms)
            return (loss, out) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            logs = {**logs, **self._terms.flush()} if "loss" in logs else logs
            return super().log(logs, *args, **kwargs)

    return DriftTrainer


def __getattr__(name):
    if name == "DriftTrainer":
        return make_drift_trainer()
    if name == "DriftCallback":
        return make_drift_callback()
    raise AttributeError(name)


# ----------------------------------------------------------------------------- drift while training

def probe_batches(probes, processor, spec, config, batch_size: int = 8) -> tuple[list[dict], np.ndarray]:
    """Model inputs of a probe set in batches, and the cluster of every visual row the tap reads.

    The tap reads visual rows in (batch, position) order; the clusters follow the same order.
    """
    from driftlens.inputs import check_positions, model_inputs

    batch_size = check_count("batch_size", batch_size)
    image_id = spec.image_token_id(config)
    batches, clusters = [], []
    items = list(probes)
    for b0 in range(0, len(items), batch_size):
        part = items[b0:b0 + batch_size]
        inputs = dict(model_inputs(processor, spec, [probes.image(p) for p in part], [p.prompt for p in part]))
        check_positions(inputs, config, part)
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        for j, p in enumerate(part):
            clusters += [p.cluster] * int(((ids[j] == image_id) & (mask[j] > 0)).sum())
        batches.append(inputs)
    return batches, np.asarray(clusters)


def visual_states(model, batches: Sequence[Mapping], layers: Sequence[int], spec=None) -> dict[int, torch.Tensor]:
    """Visual-token states per layer over a list of batches (no grad), concatenated ``[rows, d]``."""
    from driftlens.training import VisualTap

    out: dict[int, list] = {la: [] for la in layers}
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with torch.no_grad(), VisualTap(model, list(layers), spec=spec) as tap:
        for batch in batches:
            moved = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                     if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            model(**moved, use_cache=False)
            for la in layers:
                out[la].append(tap.visual[la].float().cpu())
            tap.clear()
    model.train(was_training)
    return {la: torch.cat(v) for la, v in out.items()}


def drift_now(reference: Mapping[int, torch.Tensor], current: Mapping[int, torch.Tensor], clusters: np.ndarray,
              n_bootstrap: int = 200, n_permutations: int = 200, level: float = 0.95, seed: int = 0) -> dict:
    """Per layer: paired cluster MMD^2 of the probe rows now vs at the reference, with interval and p."""
    from driftlens.inference import paired_mmd

    out = {}
    for la, ref in reference.items():
        inf = paired_mmd(ref, current[la], clusters, n_permutations=n_permutations, n_bootstrap=n_bootstrap,
                         level=level, seed=seed)
        out[la] = {"effect": inf.effect, "lo": inf.lo, "hi": inf.hi, "p": inf.p}
    return out


def drift_log_names(layer: int) -> dict[str, str]:
    """The metric names :class:`DriftCallback` logs for ``layer``: effect, interval bounds, p-value.

    ``{"effect": "drift_mmd/layer_{l}", "lo": "drift_mmd/layer_{l}_lo", "hi": "..._hi", "p": "..._p"}``;
    the ``drift_mmd/`` prefix groups them in W&B and TensorBoard.
    """
    base = f"drift_mmd/layer_{int(layer)}"
    return {"effect": base, "lo": f"{base}_lo", "hi": f"{base}_hi", "p": f"{base}_p"}


def make_drift_callback():
    """The :class:`DriftCallback` class (built on first use, like :func:`make_drift_trainer`)."""
    from transformers import TrainerCallback

    class DriftCallback(TrainerCallback):
        """Every ``every`` steps, the drift of a probe set's visual tokens against the start of training.

        Parameters
        ----------
        batches, clusters
            From :func:`probe_batches`.
        layers : sequence of int
            Decoder layers to measure.
        every : int
            Steps between measurements (also at the first and the last step).
        n_bootstrap : int
            Cluster-bootstrap draws (and sign flips) per layer.

        Attributes
        ----------
        history : list of dict
            ``{"step": s, "layer": l, "effect": ..., "lo": ..., "hi": ..., "p": ...}`` rows.
        trainer : transformers.Trainer or None
            The trainer whose ``log`` each measurement goes through (see :meth:`attach`).

        Notes
        -----
        Each measurement is logged through ``Trainer.log`` -- so ``report_to`` integrations (W&B,
        TensorBoard, MLflow ...) and ``state.log_history`` receive it at the current step -- under
        stable names (:func:`drift_log_names`): ``drift_mmd/layer_{l}`` (the effect, paired cluster
        MMD^2 against the start of training), ``drift_mmd/layer_{l}_lo`` / ``_hi`` (its
        cluster-bootstrap interval, probe sampling only) and ``drift_mmd/layer_{l}_p``. A
        :func:`make_drift_trainer` trainer attaches its drift callbacks itself; with a plain
        ``transformers.Trainer`` call ``callback.attach(trainer)`` (instead of passing it in
        ``callbacks=``). An unattached callback can only append to ``state.log_history``, which
        no dashboard reads: it warns once.
        """

        def __init__(self, batches, clusters, layers: Sequence[int], every: int = 50, n_bootstrap: int = 200,
                     spec=None, seed: int = 0):
            every = check_count("every", every)
            n_bootstrap = check_count("n_bootstrap", n_bootstrap)   # at construction, not at the first measurement
            self.batches, self.clusters = list(batches), np.asarray(clusters)
            self.layers, self.every, self.n_bootstrap = list(layers), every, n_bootstrap
            self.spec, self.seed = spec, seed
            self.reference = None
            self.history: list[dict] = []
            self.trainer = None
            self._warned = False

        def attach(self, trainer):
            """Add this callback to ``trainer`` and log through its ``log`` (returns the trainer)."""
            if self not in trainer.callback_handler.callbacks:
                trainer.add_callback(self)
            self.trainer = trainer
            return trainer

        def _measure(self, model, state, control):
            cur = visual_states(model, self.batches, self.layers, self.spec)
            if len(self.clusters) != next(iter(cur.values())).shape[0]:
                raise UsageError(f"{len(self.clusters)} cluster labels for {next(iter(cur.values())).shape[0]} "
                                 f"visual rows: build batches and clusters with probe_batches()")
            res = drift_now(self.reference, cur, self.clusters, self.n_bootstrap, self.n_bootstrap, seed=self.seed)
            entry = {}
            for la, r in res.items():
                self.history.append({"step": state.global_step, "layer": la, **r})
                names = drift_log_names(la)
                entry.update({names[key]: float(r[key]) for key in ("effect", "lo", "hi", "p")})
            if self.trainer is not None:
                should_log = control.should_log   # Trainer's own log of this step must still happen
                self.trainer.log(entry)           # report_to integrations and state.log_history, at this step
                control.should_log = self.trainer.control.should_log = should_log
                return
            if not self._warned:
                import warnings

                warnings.warn("DriftCallback is not attached to its trainer: its drift goes to state.log_history "
                              "only, not to report_to dashboards; use make_drift_trainer() or "
                              "callback.attach(trainer)", stacklevel=2)
                self._warned = True
            state.log_history.append({**entry, "step": state.global_step})

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.reference = visual_states(model, self.batches, self.layers, self.spec)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % self.every == 0 or state.global_step == state.max_steps:
                self._measure(model, state, control)

    return DriftCallback
