"""`driftlens experiment regularizer` on the real organism, a few steps per arm (session cache and demo).

The experiment's numbers come from the full run (bench/RESULTS.md); this checks the machinery: every
arm trains and freezes what it declares, each arm's realized configuration differs from its parent's
in exactly its declared factor, the anchor and contrast terms are active (non-zero gradients where
they should be, none where they cannot be), and the command writes its files and resumes.
"""
from __future__ import annotations

import json

import pytest
import torch

from driftlens import organism
from driftlens.cli import main
from driftlens.organism import experiment as E


def _image_step(objective, batches, start: int = 0) -> dict:
    for step in range(start, start + 40):
        b = batches(step)
        if objective.has_image(b):
            return b
    raise AssertionError("no image batch in 40 steps")


def _realized(p: E.Prepared, korean) -> E.ArmConfig:
    """What an arm actually is, read off the prepared objects (not its declaration)."""
    lora = p.schedule is not None
    ranks = "none" if not lora else ("uniform" if len(set(p.schedule.ranks.values())) == 1 else "contrast")
    drift = p.objective.drift if p.objective.tap is not None else None
    replay = any(not torch.equal(p.batches(s)["input_ids"], korean(s)["input_ids"])
                 if p.batches(s)["input_ids"].shape == korean(s)["input_ids"].shape else True for s in range(40))
    return E.ArmConfig(tuning="lora" if lora else "full", ranks=ranks,
                       anchor="none" if drift is None else f"{drift.mode}@{drift.site}",
                       contrast=p.objective.contrast is not None, viral=p.viral is not None, replay=replay)


def _grads(model, part: str) -> list[torch.Tensor | None]:
    return [q.grad for n, q in model.named_parameters() if part in n]


def _nonzero(grads) -> bool:
    return bool(grads) and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def _zero(grads) -> bool:
    return bool(grads) and all(g is None or not bool(g.abs().any()) for g in grads)


@pytest.fixture(scope="module")
def plan(organisms, organism_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    p = E.prepare(out, [0, 1], organisms[:2], E.ARMS, E.Settings(steps=10), organism_cache, False)
    return out, p


@pytest.mark.slow
def test_each_arm_is_what_it_declares_and_its_terms_are_active(organisms, plan):
    _, p = plan
    traj = organisms[0]
    recipe = traj.recipe
    _, processor = organism.load_checkpoint(traj.checkpoints["base"])
    bank = organism.training_bank(processor, recipe)
    settings = E.Settings(**p["settings"])
    assert p["layer_ranks"]["uniform"] == [32] * recipe.n_layers and sum(p["layer_ranks"]["contrast"]) == p["budget"]
    assert len(set(p["layer_ranks"]["contrast"])) > 1
    realized, last = {}, recipe.n_layers - 1
    for name in E.ARMS:
        korean = organism.continuation_batches(processor, bank, recipe, "ko")
        prep = E.prepare_arm(name, traj.checkpoints["base"], recipe, bank, p, settings)
        realized[name] = _realized(prep, korean)
        assert realized[name] == E.arm(name).config, name
        model = prep.model
        trainable = {n for n, q in model.named_parameters() if q.requires_grad}
        assert not any("vision_tower" in n for n in trainable), name
        if name == "full":
            assert not any("multi_modal_projector" in n for n in trainable) and any("q_proj" in n for n in trainable)
        else:
            assert all(("lora_" in n or any(k in n for k in ("multi_modal_projector", "embed_tokens", "lm_head")))
                       for n in trainable), name
            assert any("multi_modal_projector" in n for n in trainable) and any("lora_B" in n for n in trainable)
        batch = _image_step(prep.objective, organism.continuation_batches(processor, bank, recipe, "ko"))
        obj = prep.objective
        if obj.tap is not None:                                   # the anchor term alone
            model(**batch, use_cache=False)
            term = obj.drift(obj.tap.visual, obj.tap.text)
            model.zero_grad(set_to_none=True)
            term.backward()
            key_b = _grads(model, f"layers.{last}.self_attn.k_proj.lora_B")
            query_b = _grads(model, f"layers.{last}.self_attn.q_proj.lora_B")
            assert _nonzero(key_b) and _nonzero(_grads(model, "layers.0.self_attn.v_proj.lora_B")), name
            # keys of the last layer do not depend on its query projection; its hidden output does
            assert (_zero(query_b) if obj.drift.site == "key" else _nonzero(query_b)), name
            obj.tap.clear()
        if obj.contrast is not None:                              # the grounding contrast alone
            with obj.tap.paused() if obj.tap is not None else _null():
                out = model(**batch, use_cache=False)
                hinge = obj.contrast(model, batch, out.logits)
            assert float(hinge) > 0, "the margin keeps the hinge active at the base"
            model.zero_grad(set_to_none=True)
            hinge.backward()
            assert _nonzero(_grads(model, "lora_B")[:4]) and _nonzero(_grads(model, "lm_head")), name
        if prep.viral is not None:
            with obj.tap.paused() if obj.tap is not None else _null():
                model(**batch, use_cache=False)
            v = prep.viral.loss()
            model.zero_grad(set_to_none=True)
            v.backward()
            assert all(q.grad is not None and bool(q.grad.abs().sum() > 0) for q in prep.viral.head.parameters())
            assert _nonzero(_grads(model, f"layers.{recipe.n_layers // 2}.self_attn.v_proj.lora_B"))
            prep.viral.detach()
        obj.detach()
    for a in E.TREE:                                              # one factor, read off what was built
        if a.parent is not None:
            assert E.config_diff(realized[a.name], realized[a.parent]) == [a.factor], a.name


def _null():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.slow
def test_a_few_steps_of_every_arm_train_what_they_say(organisms, plan):
    out, _ = plan
    base = organisms[0].checkpoints["base"]
    from safetensors.torch import load_file

    w0 = load_file(str(base / "model.safetensors"))
    for name in E.ARMS:
        res = E.run_unit(name, 0, out, cache=None)
        assert res["steps"] == 10 and res["image_steps"] > 0 and res["seconds_per_step"] > 0
        assert set(res["grounding"]) == {"en", "ko"}
        assert len(res["per_scene"]["en"]["gain_accuracy"]) == 72 and res["ko_lm_loss_new_forms"] > 0
        w = load_file(str(E.result_path(out, 0, name).parent / "model" / "model.safetensors"))
        assert set(w) == set(w0), name                              # merged back to the plain architecture
        changed = {k for k in w0 if not torch.equal(w0[k], w[k])}
        assert not any("vision_tower" in k for k in changed), name
        assert any("multi_modal_projector" in k for k in changed) == (name != "full"), name
        assert any("layers.0.self_attn.q_proj" in k for k in changed), name


@pytest.mark.slow
def test_the_command_writes_the_tree_and_resumes(organisms, organism_cache, tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["experiment", "regularizer", "--out", str(out), "--seeds", "0,1", "--steps", "2", "--arms",
            "replay", "--jobs", "1", "--cache", str(organism_cache), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "replay - lora_uniform" in printed and "regularizer.png" in printed
    res = json.loads((out / "regularizer.json").read_text())
    assert res["seeds"] == [0, 1] and list(res["arms"]) == ["lora_uniform", "replay"]
    assert [t["arm"] for t in res["tree"]] == ["lora_uniform", "replay"]
    assert res["settings"]["steps"] == 2 and res["settings"]["settings"]["margin"] == E.Settings().margin
    c = res["contrasts"]["replay - lora_uniform"]
    assert c["factor"] == "replay" and set(c["outcomes"]) == set(res["outcomes"])
    o = c["outcomes"]["en_gain"]
    assert len(o["per_seed"]) == 2 and o["lo"] <= o["mean"] <= o["hi"]
    for a in res["arms"]:
        assert len(res["arms"][a]["visual_drift_by_layer"][0]) == organisms[0].recipe.n_layers
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("seed-*/*/result.json")}
    assert len(stamps) == 4
    assert main(args) == 0                                     # a rerun trains nothing again
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("seed-*/*/result.json")}
    assert main(["3" if a == "2" else a for a in args]) == 2    # other settings in the same folder: refused
    assert "before the first arm ran" in capsys.readouterr().err


@pytest.mark.slow
def test_replay_keeps_the_korean_stream(organisms):
    """`replay` replaces some steps' batches by English image questions; the other steps' batches are
    exactly the Korean stream every other arm sees."""
    traj = organisms[0]
    recipe = traj.recipe
    _, processor = organism.load_checkpoint(traj.checkpoints["base"])
    bank = organism.ImageBank(processor, recipe.image_size, organism.render_seed(recipe), 2)
    settings = E.Settings(replay_fraction=0.3)
    korean = E._batches("lora_uniform", processor, bank, recipe, settings)
    replay = E._batches("replay", processor, bank, recipe, settings)
    en_prompts = {q.prompt for s in bank.scenes for q in organism.shapes.questions(s, "en")}
    replaced = 0
    for step in range(30):
        k, r = korean(step), replay(step)
        if set(k) == set(r) and all(torch.equal(k[key], r[key]) for key in k):
            continue
        replaced += 1                  # a replaced step: an English image-question batch
        text = processor.tokenizer.decode(r["input_ids"][0], skip_special_tokens=True)
        assert "pixel_values" in r and any(p in text for p in en_prompts), (step, text)
    assert 0 < replaced < 30
