"""The Hugging Face ``Trainer`` integration: a trainer that optimizes a :class:`DriftObjective`, a drift callback.

``make_drift_trainer()`` (or ``DriftTrainer``) gives a ``transformers.Trainer`` subclass whose loss
is the objective's and which logs each term; ``make_drift_callback()`` (or ``DriftCallback``)
measures, every ``every`` steps, the drift of a probe set's visual tokens against their states at
the start of training, with the report's statistic, and logs it through ``Trainer.log``.
transformers is imported only when one of them is asked for.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from driftlens.errors import UsageError, check_count
from driftlens.train.objective import DriftObjective


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
    from driftlens.inputs import check_positions, model_inputs, token_rows

    batch_size = check_count("batch_size", batch_size)
    image_id = spec.image_token_id(config)
    batches, clusters = [], []
    items = list(probes)
    for b0 in range(0, len(items), batch_size):
        part = items[b0:b0 + batch_size]
        inputs = dict(model_inputs(processor, spec, [probes.image(p) for p in part], [p.prompt for p in part]))
        check_positions(inputs, config, part)
        visual, _ = token_rows(inputs["input_ids"], inputs.get("attention_mask"), image_id)    # [B, S]
        for j, p in enumerate(part):
            clusters += [p.cluster] * int(visual[j].sum())
        batches.append(inputs)
    return batches, np.asarray(clusters)


def visual_states(model, batches: Sequence[Mapping], layers: Sequence[int], spec=None) -> dict[int, torch.Tensor]:
    """Visual-token states per layer over a list of batches (no grad), concatenated ``[rows, d]``."""
    from driftlens.train.tap import VisualTap

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
