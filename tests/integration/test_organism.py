"""The model organism: its machinery on a quick recipe, and what holds for every seed of the real
recipe (``slow``: builds three seeds into a session-wide temporary cache, see conftest.py).

The slow assertions are facts that hold for every seed and CPU with margin (measured spreads in
bench/RESULTS.md), never a threshold read off one build."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from driftlens import organism
from driftlens.cli import parse_seeds
from driftlens.inputs import model_inputs
from driftlens.organism import shapes
from driftlens.specs import load_spec

QUICK = dataclasses.replace(organism.Recipe(), base_steps=6, base_check_every=3, adapt_steps=10, n_checkpoints=5,
                            batch_size=4, render_pool=2)
# the build machinery alone (cache, parallel processes): three checkpoints, so the build's own
# evaluation -- most of a quick build's time -- covers 3 checkpoints instead of 11
TINY = dataclasses.replace(QUICK, base_steps=2, base_check_every=2, adapt_steps=2, n_checkpoints=1)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return organism.build(out=tmp_path_factory.mktemp("org") / "traj", recipe=QUICK, progress=False)


def test_trajectory_layout_and_loading(quick):
    assert list(quick.checkpoints) == ["base", "ko-1", "ko-2", "ko-3", "ko-4", "ko-5"]
    assert list(quick.control) == ["base", "en-1", "en-2", "en-3", "en-4", "en-5"]
    assert quick.control["base"] == quick.checkpoints["base"]
    assert list(quick.all_checkpoints)[6:] == ["en-1", "en-2", "en-3", "en-4", "en-5"]
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


def test_cache_hit_and_determinism(quick, tmp_path, monkeypatch):
    again = organism.build(out=quick.root, recipe=QUICK, progress=False)
    assert again.build_seconds == quick.build_seconds          # read from trajectory.json, not retrained
    # the weights are what must reproduce; the rebuild's evaluation (tested above) is skipped
    monkeypatch.setattr(organism.evaluation, "evaluate_all", lambda traj, progress: {"ko_lm_loss": {}})
    other = organism.build(out=tmp_path / "again", recipe=QUICK, progress=False)
    a, _ = organism.load_checkpoint(quick.checkpoints["ko-5"])
    b, _ = organism.load_checkpoint(other.checkpoints["ko-5"])
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # both continuation stages leave the vision tower and projector alone and move the LLM,
    # differently (Korean vs English data from the same base)
    base, _ = organism.load_checkpoint(quick.checkpoints["base"])
    en, _ = organism.load_checkpoint(quick.control["en-5"])
    sd = base.state_dict()
    for m in (a, en):
        for name, p in m.state_dict().items():
            if "vision_tower" in name or "multi_modal_projector" in name:
                assert torch.equal(p, sd[name]), name
        assert any(not torch.equal(p, sd[n]) for n, p in m.state_dict().items() if "language_model" in n)
    assert any(not torch.equal(p, en.state_dict()[n]) for n, p in a.state_dict().items() if "language_model" in n)


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
    scene = shapes.heldout_scenes()[0]
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


def test_banked_batches_equal_the_processor_path(quick):
    """Pre-encoded training / evaluation batches == encode_image_examples on the same images."""
    _, processor = organism.load_checkpoint(quick.checkpoints["base"])
    seeds = organism.render_seed(QUICK)
    bank = organism.ImageBank(processor, QUICK.image_size, seeds, 2)
    scenes = bank.scenes
    assert scenes == shapes.seen_scenes()                    # a training bank holds the seen scenes only
    items = [(0, 1, "What color is the shape?", "red"), (5, 0, "도형은 어디에 있나요?", "왼쪽 위"),
             (7, 1, "Describe the image.", shapes.caption(scenes[7], "en"))]
    got = bank.batch(items)
    imgs = [shapes.render(scenes[k], QUICK.image_size, seed=seeds(k, j)) for k, j, _, _ in items]
    ref = organism.encode_image_examples(processor, imgs, [p for _, _, p, _ in items], [a for *_, a in items])
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_batched_evaluation_equals_one_question_at_a_time(quick):
    model, processor = organism.load_checkpoint(quick.checkpoints["ko-2"])
    ev = organism.EvalSet(processor, QUICK.image_size, langs=("ko",), batch_rows=50)
    scores = ev.scores(model, "ko")
    right = 0
    for q, start, n in ev.questions["ko"][:12]:
        k = start // 13                                   # 13 candidate rows per scene (6 + 3 + 4)
        img = shapes.render(shapes.all_scenes()[k], QUICK.image_size, seed=organism.TRAIN_SEEDS + k)
        single = organism.answer_scores(model, processor, img, q)
        assert scores[start:start + n].tolist() == pytest.approx(single.tolist(), rel=1e-4, abs=1e-4)
    acc = ev.accuracy(model, "ko")
    assert acc["n"] == 216 and 0 <= acc["lo"] <= acc["accuracy"] <= acc["hi"] <= 1
    for q, start, n in ev.questions["ko"]:
        right += int(q.candidates[int(scores[start:start + n].argmax())] == q.answer)
    assert acc["correct"] == right


def test_image_conditions_equal_the_processor_path(quick):
    """Mismatched and no-image outcomes == each question scored alone through the processor with the
    other scene's rendering / a blank background image; the gains are true minus mismatched."""
    from PIL import Image

    model, processor = organism.load_checkpoint(quick.control["en-3"])
    ev = organism.EvalSet(processor, QUICK.image_size, langs=("en",), batch_rows=40)
    out = ev.outcomes(model, "en")
    per, scenes = out["per_scene"], shapes.all_scenes()
    blank = Image.new("RGB", (QUICK.image_size,) * 2, shapes.BACKGROUND)
    for k in (0, 5, 40, 71):
        other = shapes.mismatched_scene(scenes[k])
        m = scenes.index(other)
        images = {"": shapes.render(scenes[k], QUICK.image_size, seed=organism.TRAIN_SEEDS + k),
                  "_mismatched": shapes.render(other, QUICK.image_size, seed=organism.TRAIN_SEEDS + m),
                  "_none": blank}
        for a, q in enumerate(shapes.questions(scenes[k], "en")):
            for suffix, img in images.items():
                sc = organism.answer_scores(model, processor, img, q)
                ans = q.candidates.index(q.answer)
                assert per["logprob" + suffix][k][a] == pytest.approx(float(sc[ans]), abs=2e-4)
                assert per["correct" + suffix][k][a] == int(int(sc.argmax()) == ans)
        assert per["gain_logprob"][k] == pytest.approx(sum(per["logprob"][k]) / 3 - sum(per["logprob_mismatched"][k]) / 3,
                                                       abs=1e-4)
    r = out["image_reliance"]
    assert r["accuracy"] == pytest.approx(out["grounding"]["accuracy"])
    held = [shapes.is_heldout(s) for s in scenes]
    assert r["accuracy_heldout"] == pytest.approx(sum(sum(c) for c, h in zip(per["correct"], held) if h) / 54)
    assert r["gain"] == pytest.approx(r["accuracy"] - r["accuracy_mismatched"])
    assert 18 * r["gain_heldout"] + 54 * r["gain_seen"] == pytest.approx(72 * r["gain"])


def test_evaluation_text_is_never_trained_on():
    for lang, held in (("ko", organism.heldout_ko_texts()), ("en", organism.heldout_en_texts())):
        train = set(organism.text_pool(lang))
        assert len(held) == 18 and not set(held) & train
        assert set(organism.seen_texts(lang)) <= train
        # image questions answer with one word: no caption is ever a training target
        words = {q.answer for s in shapes.all_scenes() for q in shapes.questions(s, lang)}
        assert not set(held) & words
    assert not set(organism.new_form_ko_texts()) & set(organism.text_pool("ko"))
    assert len(set(organism.text_pool("en")) & set(organism.text_pool("ko"))) == 0


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in ((81, 100), (0, 10), (10, 10), (150, 216)):
        ref = binomtest(k, n).proportion_ci(method="wilson")
        assert organism.wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


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
        save_file({"w": torch.zeros(1)}, str(tmp / "base" / "model.safetensors"))     # a whole (tiny) weights file
        return {"base": tmp / "base"}, {"base": tmp / "base"}, {}

    monkeypatch.setattr(organism.train, "_train_trajectory", fake)
    monkeypatch.setattr(organism.evaluation, "evaluate_all", lambda traj, progress: {"ko_lm_loss": {}})
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
        save_file({"w": torch.zeros(1)}, str(tmp / "base" / "model.safetensors"))     # a whole (tiny) weights file
        return {"base": tmp / "base"}, {"base": tmp / "base"}, {}

    monkeypatch.setattr(organism.train, "_train_trajectory", fake)
    monkeypatch.setattr(organism.evaluation, "evaluate_all", lambda traj, progress: {"ko_lm_loss": {}})
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
    assert organism.Recipe().key() != dataclasses.replace(organism.Recipe(), adapt_lr=2e-3).key()
    assert organism.Recipe().key() != organism.Recipe(seed=1).key()


def test_evaluation_shape(quick):
    ev = organism.evaluate(quick, progress=False)
    labels = set(quick.all_checkpoints)
    assert set(ev["grounding_accuracy"]) == labels
    assert abs(ev["chance_accuracy"] - (1 / 6 + 1 / 3 + 1 / 4) / 3) < 1e-9
    assert ev["scenes"] == [s.key for s in shapes.all_scenes()] and len(ev["heldout_scenes"]) == 18
    assert ev["mismatched_scene"][0] == shapes.mismatched_scene(shapes.all_scenes()[0]).key
    for acc in ev["grounding"].values():
        assert set(acc) == {"en", "ko"}
        for g in acc.values():
            assert g["n"] == 216 and 0 <= g["lo"] <= g["accuracy"] <= g["hi"] <= 1
            assert set(g["by_attribute"]) == {"color", "shape", "position"}
    for label in labels:
        for lang in ("en", "ko"):
            per = ev["per_scene"][label][lang]
            assert {len(v) for v in per.values()} == {72}
            assert all(len(v) == 3 for key in ("correct", "logprob_none") for v in per[key])
            r = ev["image_reliance"][label][lang]
            assert {"accuracy_seen", "accuracy_heldout", "gain", "gain_heldout", "logprob_none"} <= set(r)
            assert r["accuracy"] == ev["grounding_accuracy"][label][lang]
    for key in ("ko_lm_loss", "ko_lm_loss_new_forms", "ko_lm_loss_seen", "en_lm_loss", "en_lm_loss_seen"):
        assert set(ev[key]) == labels
    assert (quick.root / "evaluation.json").exists()
    assert organism.evaluate(quick, progress=False) == ev          # written by the build, read back


def test_build_trains_on_the_replayed_streams(tmp_path, monkeypatch):
    """Every batch a build encodes is the next step of data.base_plan / continuation_plan (the streams
    tests/unit/test_heldout.py replays for every seed), in stage order."""
    import itertools

    from driftlens.organism import data

    recorded = []
    encode = organism.ImageBank.encode

    def record(self, step):
        recorded.append(step)
        return encode(self, step)

    monkeypatch.setattr(organism.ImageBank, "encode", record)
    monkeypatch.setattr(organism.evaluation, "evaluate_all", lambda traj, progress: {"ko_lm_loss": {}})
    recipe = dataclasses.replace(TINY, base_steps=4, base_check_every=4, seed=5)
    organism.build(out=tmp_path / "traj", recipe=recipe, progress=False)
    n = recipe.adapt_steps
    assert len(recorded) == recipe.base_steps + 2 * n
    assert recorded[:4] == list(itertools.islice(data.base_plan(recipe), 4))
    assert recorded[4:4 + n] == list(itertools.islice(data.continuation_plan(recipe, "ko"), n))
    assert recorded[4 + n:] == list(itertools.islice(data.continuation_plan(recipe, "en"), n))


def test_build_seeds_in_parallel_processes_with_progress(tmp_path):
    """Two seeds in two worker processes, their progress in the parent's stderr (not a terminal):
    whole lines, the first within 30 s, then at least every 30 s until the build ends."""
    import subprocess
    import sys
    import time

    code = ("import dataclasses, json, sys\n"
            "from driftlens import organism\n"
            "recipe = organism.Recipe(**json.loads(sys.argv[1]))\n"
            "organism.build_seeds([3, 4], recipe=recipe, cache=sys.argv[2], progress=True, jobs=2)\n")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(dataclasses.asdict(TINY)), str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = [(time.monotonic(), line) for line in proc.stderr]
    proc.wait()
    t1 = time.monotonic()
    text = "".join(line for _, line in lines)
    assert proc.returncode == 0, text
    times = [t0] + [t for t, _ in lines] + [t1]
    assert max(b - a for a, b in zip(times, times[1:])) < 30, text
    assert "\r" not in text
    for seed in (3, 4):
        for stage in ("English base", "Korean adaptation", "English control", "evaluation"):
            assert f"organism seed {seed}: {stage}" in text, text
        assert f"organism seed {seed}: built in" in text
    trajs = organism.build_seeds([3, 4], recipe=TINY, cache=tmp_path, progress=False)       # built: cache hits
    assert [t.seed for t in trajs] == [3, 4] and trajs[0].root != trajs[1].root
    assert all(t.root.parent == tmp_path / "organism" for t in trajs)
    info = json.loads((trajs[0].root / "trajectory.json").read_text())
    assert info["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)
    again = organism.build_seeds([4, 3], recipe=TINY, cache=tmp_path, progress=False)    # cache hits
    assert [t.build_seconds for t in again] == [trajs[1].build_seconds, trajs[0].build_seconds]
    with pytest.raises(ValueError, match="distinct"):
        organism.build_seeds([1, 1], recipe=TINY, cache=tmp_path)
    assert parse_seeds("0,2-4") == [0, 2, 3, 4]
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("a")


# ----------------------------------------------------------------------------- the real recipe (slow)

@pytest.mark.slow
def test_every_seed_of_the_default_recipe(organisms):
    """Facts that hold for every seed with margin (organism-9's eight seeds: bench/RESULTS.md)."""
    chance = organism.chance_accuracy()
    assert len(organisms) == 3
    last_ko, last_en, gap = [], [], []
    for traj in organisms:
        ev = organism.evaluate(traj, progress=False)
        acc, loss, new_forms = ev["grounding_accuracy"], ev["ko_lm_loss"], ev["ko_lm_loss_new_forms"]
        rel = ev["image_reliance"]
        ko, en = list(traj.checkpoints), list(traj.control)
        assert ko[0] == "base" and len(ko) == 6 and len(en) == 6
        assert acc["base"]["en"] >= chance + 0.4                      # English grounding learned (8 seeds: >= 0.875)
        assert rel["base"]["en"]["gain"] >= 0.6                       # ... from the image (0.83-0.87)
        assert rel["base"]["ko"]["gain"] <= 0.3                       # and no Korean (-0.04-0.12)
        assert loss[ko[-1]] < loss["base"] - 5                        # Korean text learned (drop 9.5-11.1 nats)
        assert rel[ko[-1]]["ko"]["gain"] >= 0.5                       # Korean grounding from the image (0.78-0.89)
        assert acc[en[-1]]["en"] >= acc["base"]["en"] - 0.1           # the control keeps English (-0.03-+0.03)
        # the Korean adaptation costs English image use, the control does not (en-5 - ko-5: 0.12-0.66)
        assert rel[ko[-1]]["en"]["gain"] < rel[en[-1]]["en"]["gain"] - 0.05
        # Korean in new sentence forms: best at ko-1, worse by ko-5 (+1.5-2.1 nats), while the held-out
        # scenes' captions (a trained form) stay learned (0.53-0.60): the adaptation learns its templates
        assert new_forms[ko[-1]] > new_forms[ko[1]] + 0.5 and loss[ko[-1]] < 1.5
        last_ko.append(acc[ko[-1]])
        last_en.append(acc[en[-1]])
        gap.append(rel["base"]["en"]["accuracy_seen"] - rel["base"]["en"]["accuracy_heldout"])
    # over seeds: the Korean trajectory learns Korean grounding and loses English grounding
    assert sum(a["ko"] for a in last_ko) / 3 >= chance + 0.3
    assert sum(a["en"] for a in last_en) / 3 - sum(a["en"] for a in last_ko) / 3 >= 0.10   # organism-9: 0.23
    # held-out scenes (new combinations, never trained on) are harder than seen ones (8 seeds: 0.10-0.17)
    assert sum(gap) / 3 >= 0.05


@pytest.mark.slow
def test_float_rounding_is_not_drift(organisms, tmp_path):
    """The base captured again at another batch size, and with its activations' last bits flipped
    at random (what another reduction order does): no cell is significant after correction."""
    import numpy as np
    import xarray as xr

    import driftlens as dl
    from driftlens.organism.demo import DEMO_PROBES
    from driftlens.organism.probe_sets import make_shapes_probes
    from driftlens.probes import ProbeSet

    base = organisms[0].checkpoints["base"]
    probes = ProbeSet.load(make_shapes_probes(tmp_path / "probes", size=32, **DEMO_PROBES))
    stores = [dl.capture(base, probes, {label: base}, out=tmp_path / f"{label}.zarr", batch_size=bs, progress=False)
              for label, bs in (("base", 16), ("base-bs5", 5))]
    a, b = (dl.open_store(s).load() for s in stores)
    rng = np.random.default_rng(0)
    ulp = a.copy(deep=True).assign_coords(checkpoint=["base-ulp"])
    for site in ("hidden", "key"):
        v = ulp[site].values
        ulp[site].values = np.nextafter(v, np.where(rng.random(v.shape) < 0.5, np.inf, -np.inf)).astype(v.dtype)
    ds = xr.concat([a, b, ulp], "checkpoint")
    rep = dl.drift(ds, reference="base", metrics=("mmd",), progress=False)
    assert rep.attrs["n_tests"] == 2 * 4 * 2 * 2            # 2 checkpoints x 4 layers x 2 sites x 2 modalities
    assert float(rep.mmd_q.sel(checkpoint=["base-bs5", "base-ulp"]).min()) > 0.05
