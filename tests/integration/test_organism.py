"""The model organism: its machinery on a quick recipe, and the done-when figures of the real
recipe (``slow``: builds the default recipe into the user cache, which test_demo then reuses)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from driftlens import organism, shapes
from driftlens.inputs import model_inputs
from driftlens.specs import load_spec

QUICK = dataclasses.replace(organism.Recipe(), base_steps=6, ko_steps=10, n_ko_checkpoints=5, batch_size=4)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return organism.build(out=tmp_path_factory.mktemp("org") / "traj", recipe=QUICK, progress=False)


def test_trajectory_layout_and_loading(quick):
    assert list(quick.checkpoints) == ["base", "ko-1", "ko-2", "ko-3", "ko-4", "ko-5"]
    model, processor = organism.load_checkpoint(quick.checkpoints["ko-3"])
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    spec = load_spec(model)
    spec.validate(model)
    assert spec.num_layers(model) >= 4
    # training/evaluation encoding == the capture path's encoding (chat template, image tokens)
    img = shapes.render(shapes.Scene("red", "circle", "top left"), 32)
    enc = organism.encode_image_examples(processor, [img], ["What color is the shape?"], ["red"])
    ref = model_inputs(processor, spec, [img], ["What color is the shape?"])
    n = int(ref["attention_mask"][0].sum())
    assert enc["input_ids"][0, :n].tolist() == ref["input_ids"][0, :n].tolist()
    assert torch.equal(enc["pixel_values"], ref["pixel_values"])


def test_cache_hit_and_determinism(quick, tmp_path):
    again = organism.build(out=quick.root, recipe=QUICK, progress=False)
    assert again.build_seconds == quick.build_seconds          # read from trajectory.json, not retrained
    other = organism.build(out=tmp_path / "again", recipe=QUICK, progress=False)
    a, _ = organism.load_checkpoint(quick.checkpoints["ko-5"])
    b, _ = organism.load_checkpoint(other.checkpoints["ko-5"])
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # the adaptation stage leaves the vision tower and projector alone
    base, _ = organism.load_checkpoint(quick.checkpoints["base"])
    sd = base.state_dict()
    for name, p in a.state_dict().items():
        if "vision_tower" in name or "multi_modal_projector" in name:
            assert torch.equal(p, sd[name]), name
    assert any(not torch.equal(p, sd[n]) for n, p in a.state_dict().items() if "language_model" in n)


def test_checkpoints_load_through_plain_from_pretrained(quick):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = quick.checkpoints["ko-1"]
    assert (path / "model.safetensors").exists() and not list(path.glob("*.bin"))
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    assert type(processor).__name__ == "LlavaProcessor" and processor.chat_template
    assert "<image>" in processor.tokenizer.get_vocab()
    # Hangul is covered by the vocabulary: no unknown tokens, and the text round-trips
    text = organism.heldout_ko_texts()[0]
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids
    assert processor.tokenizer.decode(ids).replace(" ", "") == text.replace(" ", "")
    # image-token count of the processor == visual features of the model
    img = shapes.render(shapes.Scene("red", "circle", "top left"), QUICK.image_size)
    enc = organism.encode_image_examples(processor, [img], ["What color is the shape?"], ["red"])
    n_img = int((enc["input_ids"] == model.config.image_token_id).sum())
    assert n_img == (QUICK.image_size // QUICK.patch_size) ** 2
    with torch.no_grad():
        out = model(**{k: v for k, v in enc.items() if k != "labels"})
    assert out.logits.shape[:2] == enc["input_ids"].shape


def test_scoring_matches_a_manual_log_likelihood(quick):
    """Candidate scores == an independent log-likelihood, one candidate at a time, token by token."""
    model, processor = organism.load_checkpoint(quick.checkpoints["base"])
    scene = shapes.split_scenes(seed=0)[1][0]
    img = shapes.render(scene, QUICK.image_size, seed=organism.TRAIN_SEEDS)
    q = shapes.questions(scene, "en")[0]
    tok = processor.tokenizer
    scores = []
    for cand in q.candidates:
        enc = organism.encode_image_examples(processor, [img], [q.prompt], [cand], eos=False)
        n_ans = len(tok(" " + cand, add_special_tokens=False)["input_ids"])
        ids = enc["input_ids"][0]
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           pixel_values=enc["pixel_values"]).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        start = len(ids) - n_ans
        scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids))))
    got = organism.answer_scores(model, processor, img, q)
    assert got.tolist() == pytest.approx(scores, rel=1e-4, abs=1e-4)


def test_ko_lm_loss_is_the_mean_token_cross_entropy(quick):
    model, processor = organism.load_checkpoint(quick.checkpoints["ko-2"])
    texts = organism.heldout_ko_texts()[:3]
    tok = processor.tokenizer
    total, n = 0.0, 0
    for t in texts:
        ids = tok(t + tok.eos_token, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        total -= sum(float(logp[i - 1, ids[0, i]]) for i in range(1, ids.shape[1]))
        n += ids.shape[1] - 1
    assert organism.ko_lm_loss(model, processor, texts) == pytest.approx(total / n, rel=1e-4)


def test_interrupted_build_leaves_no_cache_and_recipe_change_rebuilds(tmp_path, monkeypatch):
    calls = []

    def fake(recipe, tmp, progress):
        calls.append(recipe)
        (tmp / "base").mkdir()
        if recipe.seed == 1:
            raise KeyboardInterrupt                      # interrupted mid-build
        (tmp / "base" / "config.json").write_text("{}")
        return {"base": tmp / "base"}, {}

    monkeypatch.setattr(organism, "_train_trajectory", fake)
    root = tmp_path / "traj"
    (tmp_path / ".traj-building-killed").mkdir()                         # a build killed without cleanup
    with pytest.raises(KeyboardInterrupt):
        organism.build(out=root, recipe=dataclasses.replace(QUICK, seed=1), progress=False)
    left = [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"]
    assert not root.exists() and left == []                              # nothing half-written
    organism.build(out=root, recipe=QUICK, progress=False)
    organism.build(out=root, recipe=QUICK, progress=False)               # cache hit
    assert len(calls) == 2
    other = dataclasses.replace(QUICK, seed=2)
    t = organism.build(out=root, recipe=other, progress=False)           # same folder, new recipe
    assert len(calls) == 3 and t.recipe == other
    assert json.loads((root / "trajectory.json").read_text())["recipe"]["seed"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == ["traj"]


def test_concurrent_builds_of_one_folder_train_once(tmp_path, monkeypatch):
    import threading
    import time

    calls = []

    def fake(recipe, tmp, progress):
        calls.append(recipe)
        time.sleep(0.5)
        (tmp / "base").mkdir()
        (tmp / "base" / "config.json").write_text("{}")
        return {"base": tmp / "base"}, {}

    monkeypatch.setattr(organism, "_train_trajectory", fake)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        organism.build(out=tmp_path / "traj", recipe=QUICK, progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2
    assert results[0].checkpoints == results[1].checkpoints


def test_cache_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DRIFTLENS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert organism.cache_root() == tmp_path / "xdg" / "driftlens"
    monkeypatch.setenv("DRIFTLENS_CACHE", str(tmp_path / "dl"))
    assert organism.cache_root() == tmp_path / "dl"


def test_recipe_change_builds_elsewhere():
    assert organism.Recipe().key() != dataclasses.replace(organism.Recipe(), ko_lr=2e-3).key()


def test_evaluation_shape(quick):
    ev = organism.evaluate(quick, progress=False)
    assert set(ev["grounding_accuracy"]) == set(quick.checkpoints)
    assert abs(ev["chance_accuracy"] - (1 / 6 + 1 / 3 + 1 / 4) / 3) < 1e-9
    for acc in ev["grounding_accuracy"].values():
        assert set(acc) == {"en", "ko"} and all(0 <= v <= 1 for v in acc.values())
    assert (quick.root / "evaluation.json").exists()
    assert organism.evaluate(quick, progress=False) == ev          # cached


@pytest.mark.slow
def test_default_recipe_done_when():
    """The issue's done-when, measured on the default recipe (built once into the organism cache)."""
    traj = organism.build(progress=False)
    ev = organism.evaluate(traj, progress=False)
    labels = list(traj.checkpoints)
    assert labels[0] == "base" and len(labels) >= 6
    acc, loss = ev["grounding_accuracy"], ev["ko_lm_loss"]
    assert acc["base"]["en"] >= 0.90
    assert acc["base"]["en"] - acc[labels[-1]]["en"] >= 0.20
    # Korean LM loss falls along the adaptation, not only at its first checkpoint
    assert loss[labels[-1]] < loss[labels[1]] < loss["base"]
    assert 0.2 < ev["chance_accuracy"] < 0.3
    assert traj.build_seconds < 600          # recorded by the build that made the cache
