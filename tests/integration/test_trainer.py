"""Training with the regularizer on the organism's tiny LLaVA (random init, a few steps, CPU).

A plain loop and a transformers ``Trainer`` run: every loss term is logged, the drift term is
read from the training forward itself (text-only batches skip it), and the callback logs the
probe set's drift per layer with its interval.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from driftlens import organism
from driftlens.organism.probe_sets import make_shapes_probes
from driftlens.probes import ProbeSet
from driftlens.specs import load_spec
from driftlens.train.anchor import AnchorDriftLoss
from driftlens.train.hf import probe_batches, visual_states
from driftlens.train.objective import DriftObjective, train_steps

LAYERS = [1, 3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    recipe = organism.Recipe()
    processor = organism.make_processor(recipe)
    torch.manual_seed(0)
    model = organism.make_model(recipe, processor.tokenizer)
    spec = load_spec(model)
    probes = ProbeSet.load(make_shapes_probes(tmp_path_factory.mktemp("probes"), seed=0, n_scenes=6,
                                              size=recipe.image_size, kinds=("caption",), renders=2))
    batches, clusters = probe_batches(probes, processor, spec, model.config, batch_size=6)
    bank = organism.ImageBank(processor, recipe.image_size, organism.render_seed(recipe), 2)
    return {"recipe": recipe, "processor": processor, "model": model, "spec": spec, "batches": batches,
            "clusters": clusters, "bank": bank}


def _anchor_loss(s, mode="tracking", batches=None):
    from driftlens.train.tap import VisualTap

    vis, txt = {la: [] for la in LAYERS}, {la: [] for la in LAYERS}
    s["model"].eval()
    with torch.no_grad(), VisualTap(s["model"], LAYERS) as tap:
        for b in s["batches"] if batches is None else batches:
            s["model"](**b, use_cache=False)
            for la in LAYERS:
                vis[la].append(tap.visual[la])
                txt[la].append(tap.text[la])
    return AnchorDriftLoss({la: torch.cat(vis[la]) for la in LAYERS}, mode=mode,
                           anchor_text={la: torch.cat(txt[la]) for la in LAYERS})


def _mixed_batches(s, seed=0):
    rng = random.Random(seed)

    def batch(step):
        if step % 2 == 0:
            return s["bank"].question_batch(rng, "ko", 4)
        return organism.encode_text(s["processor"], ["빨간 원이 있다.", "파란 네모가 있다."])
    return batch


def test_plain_loop_logs_every_term_and_skips_drift_on_text_batches(setup):
    import copy

    s = dict(setup, model=copy.deepcopy(setup["model"]))
    objective = DriftObjective(s["model"], drift=_anchor_loss(s), drift_weight=1.0, contrast_weight=0.5)
    opt = torch.optim.AdamW([p for p in s["model"].parameters() if p.requires_grad], lr=1e-3)
    history = train_steps(s["model"], _mixed_batches(s), objective, opt, steps=4)
    objective.detach()
    assert [("drift_loss" in h) for h in history] == [True, False, True, False]
    assert [("contrast_loss" in h) for h in history] == [True, False, True, False]
    for h in history:
        assert np.isfinite(h["lm_loss"]) and np.isfinite(h["loss"])
    img = history[0]
    assert img["loss"] == pytest.approx(img["lm_loss"] + img["drift_loss"] + 0.5 * img["contrast_loss"], rel=1e-5)
    assert all(f"drift_loss/layer_{la}" in img for la in LAYERS)


def test_drift_term_pulls_visual_tokens_back(setup):
    """With the regularizer alone (no LM loss gradient on the LLM), drift toward the anchors shrinks."""
    import copy

    s = dict(setup, model=copy.deepcopy(setup["model"]))
    loss_fn = _anchor_loss(s, mode="fixed", batches=s["batches"][:1])   # anchors: these very images
    torch.manual_seed(1)
    with torch.no_grad():                      # move the LLM away from the anchors first
        for name, p in s["model"].named_parameters():
            if "language_model" in name and p.dim() == 2:
                p.add_(0.02 * torch.randn_like(p))
    objective = DriftObjective(s["model"], drift=loss_fn, drift_weight=1.0)
    params = [p for n, p in s["model"].named_parameters() if "language_model" in n]
    opt = torch.optim.Adam(params, lr=3e-3)
    values = []
    for _ in range(40):             # the anchors' own images: the minimum (the unperturbed LLM) is 0
        batch = s["batches"][0]
        s["model"].train()
        s["model"](**batch, use_cache=False)            # the tap reads this forward
        d = loss_fn(objective.tap.visual, objective.tap.text)
        opt.zero_grad()
        d.backward()
        opt.step()
        objective.tap.clear()
        values.append(float(d.detach()))
    objective.detach()
    assert np.mean(values[-5:]) < 0.6 * np.mean(values[:5]), np.round(values, 3).tolist()     # gradients reach the LLM through the tap


def test_trainer_logs_terms_and_the_callbacks_drift(setup, tmp_path):
    import copy

    from transformers import TrainingArguments

    from driftlens.train.hf import make_drift_callback, make_drift_trainer

    s = dict(setup, model=copy.deepcopy(setup["model"]))
    objective = DriftObjective(s["model"], drift=_anchor_loss(s), drift_weight=1.0, contrast_weight=0.2)
    batch = _mixed_batches(s)
    data = [batch(i) for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, logging_steps=1, learning_rate=1e-3,
                             per_device_train_batch_size=1, report_to=[], save_strategy="no", use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True)
    callback = make_drift_callback()(s["batches"], s["clusters"], layers=LAYERS, every=2, n_bootstrap=50)
    dashboard = recording_integration()
    trainer = make_drift_trainer()(model=s["model"], args=args, train_dataset=data, data_collator=lambda xs: xs[0],
                                   objective=objective, callbacks=[dashboard, callback])
    trainer.train()
    objective.detach()
    logs = trainer.state.log_history
    seen = [(step, e) for step, e in dashboard.calls if "drift_mmd/layer_1" in e]
    assert [step for step, _ in seen] == [2, 4]             # a report_to integration sees the drift, at its step
    for _, e in seen:
        for la in LAYERS:
            assert {f"drift_mmd/layer_{la}{suf}" for suf in ("", "_lo", "_hi", "_p")} <= set(e)
            assert e[f"drift_mmd/layer_{la}_lo"] <= e[f"drift_mmd/layer_{la}_hi"]
    steps = [entry for entry in logs if "lm_loss" in entry]
    assert len(steps) == 4
    assert any("drift_loss" in e for e in steps) and any("contrast_loss" in e for e in steps)
    drift_logs = [e for e in logs if "drift_mmd/layer_1" in e]
    assert [e["step"] for e in drift_logs] == [2, 4]
    for e in drift_logs:
        for la in LAYERS:
            lo, eff, hi = (e[f"drift_mmd/layer_{la}{suf}"] for suf in ("_lo", "", "_hi"))
            assert np.isfinite([lo, eff, hi]).all()
    assert len(callback.history) == 2 * len(LAYERS)


def recording_integration():
    """A stand-in for a ``report_to`` integration (W&B, TensorBoard): a callback that records ``on_log``.

    Trainer puts the integrations before the user's callbacks, so this one goes first too."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.calls = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.calls.append((state.global_step, dict(logs or {})))

    return Recorder()


def test_a_plain_trainer_with_an_attached_callback_reaches_report_to(setup, tmp_path):
    import copy

    from transformers import Trainer, TrainingArguments

    from driftlens.train.hf import drift_log_names, make_drift_callback

    s = dict(setup, model=copy.deepcopy(setup["model"]))
    batch = _mixed_batches(s)
    data = [batch(2 * i) for i in range(3)]                 # image batches: the model's own LM loss
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, logging_steps=10, learning_rate=1e-3,
                             per_device_train_batch_size=1, report_to=[], save_strategy="no", use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True)
    dashboard = recording_integration()
    trainer = Trainer(model=s["model"], args=args, train_dataset=data, data_collator=lambda xs: xs[0],
                      callbacks=[dashboard])
    callback = make_drift_callback()(s["batches"], s["clusters"], layers=LAYERS, every=2, n_bootstrap=30)
    assert callback.attach(trainer) is trainer and callback.trainer is trainer
    trainer.train()
    names = drift_log_names(3)
    assert names == {"effect": "drift_mmd/layer_3", "lo": "drift_mmd/layer_3_lo", "hi": "drift_mmd/layer_3_hi",
                     "p": "drift_mmd/layer_3_p"}
    seen = [step for step, e in dashboard.calls if set(names.values()) <= set(e)]
    assert seen == [2, 3]                                   # every 2 steps and the last
    assert [e["step"] for e in trainer.state.log_history if names["effect"] in e] == [2, 3]

    unattached = make_drift_callback()(s["batches"], s["clusters"], layers=LAYERS, every=1, n_bootstrap=30)
    args.max_steps = 1
    plain = Trainer(model=s["model"], args=args, train_dataset=data, data_collator=lambda xs: xs[0],
                    callbacks=[unattached])
    with pytest.warns(UserWarning, match="not attached to its trainer"):
        plain.train()
    assert any(names["effect"] in e for e in plain.state.log_history)


def test_visual_states_match_the_tapped_rows_and_clusters(setup):
    states = visual_states(setup["model"], setup["batches"], LAYERS)
    assert states[1].shape[0] == len(setup["clusters"]) > 0
    assert len(np.unique(setup["clusters"])) == 6
