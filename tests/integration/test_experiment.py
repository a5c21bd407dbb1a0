"""`driftlens experiment regularizer` on the real organism, a few steps per arm (session cache and demo).

The experiment's numbers come from the full run (bench/RESULTS.md); this checks the machinery: every
arm trains what it says and nothing else, the output has the issue's schema, a rerun resumes.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from driftlens import organism
from driftlens.cli import main
from driftlens.organism.experiment import ARMS, Settings, _batches

KEYS = ("en_acc", "ko_acc", "ko_lm_loss", "drift_effect_mean", "seconds_per_step")


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _changed(a: dict, b: dict, part: str) -> bool:
    keys = [k for k in a if part in k]
    assert keys, part
    return any(not torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.slow
def test_experiment_arms_train_what_they_say(organisms, organism_cache, demo_run, tmp_path, capsys):
    demo_out, _ = demo_run
    out = tmp_path / "exp"
    args = ["experiment", "regularizer", "--out", str(out), "--demo", str(demo_out), "--seeds", "0", "--steps", "10",
            "--cache", str(organism_cache), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| lora_uniform |" in printed and "regularizer.png" in printed
    res = json.loads((out / "regularizer.json").read_text())
    assert res["seeds"] == [0] and res["steps"] == 10 and res["budget"] == 8 * 4 * 4
    assert set(res["base"]) == {"en_acc", "ko_acc", "ko_lm_loss"} and isinstance(res["drift_metric"], str)
    assert list(res["arms"]) == list(ARMS)
    for arm, a in res["arms"].items():
        for key in KEYS:
            assert len(a[key]) == 1 and math.isfinite(a[key][0]), (arm, key)
        assert 0 <= a["en_acc"][0] <= 1 and 0 <= a["ko_acc"][0] <= 1 and a["seconds_per_step"][0] > 0
        assert isinstance(a["trainable"], str) and "vision tower frozen" in a["trainable"]
    info = {arm: json.loads((out / "seed-0" / arm / "result.json").read_text()) for arm in ARMS}
    assert all(info[arm]["image_steps"] == info["lora_uniform"]["image_steps"] > 0 for arm in ARMS if arm != "replay")
    terms = {arm: res["arms"][arm]["mean_terms"][0] for arm in ARMS}
    assert "drift_loss" in terms["lora_schedule_anchor_fixed"] and "drift_loss" in terms["lora_schedule_anchor_tracking"]
    assert "contrast_loss" in terms["lora_schedule_contrast"] and "viral_loss" in terms["viral"]
    assert not any(k in terms["lora_uniform"] for k in ("drift_loss", "contrast_loss", "viral_loss"))

    # the vision tower is frozen in every arm; `full` trains the LLM only, the LoRA arms also the projector
    base = _weights(organisms[0].checkpoints["base"])
    for arm in ARMS:
        w = _weights(out / "seed-0" / arm / "model")
        assert set(w) == set(base), arm                       # merged back to the plain architecture
        assert not _changed(base, w, "vision_tower"), arm
        assert _changed(base, w, "layers.0.self_attn.q_proj"), arm
        assert _changed(base, w, "multi_modal_projector") == (arm != "full"), arm
        assert _changed(base, w, "lm_head"), arm

    # ranks: uniform 8 everywhere; the schedule spends the same budget by the report
    assert set(info["lora_uniform"]["ranks"].values()) == {8}
    assert sum(info["lora_schedule"]["ranks"].values()) == res["budget"]
    assert info["lora_schedule"]["ranks"] == info["lora_schedule_anchor_fixed"]["ranks"]

    # an interrupted or repeated run resumes: finished arms are read back, not retrained
    stamps = {arm: (out / "seed-0" / arm / "result.json").stat().st_mtime_ns for arm in ARMS}
    assert main(args) == 0
    assert stamps == {arm: (out / "seed-0" / arm / "result.json").stat().st_mtime_ns for arm in ARMS}
    assert (out / "regularizer.md").read_text(encoding="utf-8").count("\n| ") >= len(ARMS) + 1


@pytest.mark.slow
def test_replay_keeps_the_korean_stream(organisms):
    """`replay` replaces some steps' batches by English image questions; the other steps' batches are
    exactly the Korean stream every other arm sees."""
    traj = organisms[0]
    recipe = traj.recipe
    _, processor = organism.load_checkpoint(traj.checkpoints["base"])
    bank = organism.ImageBank(processor, recipe.image_size, organism.render_seed(recipe), 2)
    settings = Settings(replay_fraction=0.3)
    korean = _batches("lora_uniform", processor, bank, recipe, settings)
    replay = _batches("replay", processor, bank, recipe, settings)
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
