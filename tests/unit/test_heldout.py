"""Held out means held out: replays every seed's training streams (no model) and fails if a held-out
scene, or an evaluation, validation or probe image, reaches any training batch of any stage.

organism-8's recipe fails these checks (bench/RESULTS.md, organism-9): its image bank covered all 72
scenes, so 1425 of 5792 Korean image-question examples of seed 0 were about held-out scenes (and
~9,500 of 38,400 base examples), and 12 / 12 / 13 of the 72 evaluation renders of seeds 0 / 1 / 2
were byte-identical to a training render (8-19 validation renders, 19-30 of the demo's probe images).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from driftlens import organism
from driftlens.organism import data, shapes
from driftlens.organism.probe_sets import make_shapes_probes

# what `driftlens organism build --seeds 0-7` builds (seeds 1-7 in the heavy tier: 1.5 s each)
SEEDS = [0, *(pytest.param(s, marks=pytest.mark.heavy) for s in range(1, 8))]
SIZE = organism.Recipe().image_size


def _hash(img) -> str:
    """An independent pixel hash (not data.pixel_hash): the RGB bytes and the size."""
    a = np.asarray(img.convert("RGB"))
    return hashlib.md5(a.tobytes() + str(a.shape).encode()).hexdigest()


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    """Pixel hashes of every image no training batch may show, computed without data.reserved_images."""
    ev = {_hash(shapes.render(s, SIZE, seed=organism.TRAIN_SEEDS + k)) for k, s in enumerate(shapes.all_scenes())}
    val = {_hash(shapes.render(s, SIZE, seed=seed))
           for s, seed in zip(shapes.seen_scenes(), data.validation_render_seeds(SIZE))}
    folder = tmp_path_factory.mktemp("probes")
    make_shapes_probes(folder, size=SIZE, n_scenes=72, renders=2, kinds=("caption",), alternate_langs=True)  # demo's
    probes = {_hash(Image.open(p)) for p in (folder / "images").glob("*.png")}
    return {"evaluation": ev, "validation": val, "probe": probes}


def test_the_heldout_rule():
    held, seen = shapes.heldout_scenes(), shapes.seen_scenes()
    assert len(held) == 18 and len(seen) == 54 and set(held).isdisjoint(seen)
    assert set(held) | set(seen) == set(shapes.all_scenes())
    idx = [(list(shapes.COLORS).index(s.color), list(shapes.SHAPES).index(s.shape),
            list(shapes.POSITIONS).index(s.position)) for s in held]
    assert all(sum(i) % 4 == 0 for i in idx)                            # the stated rule
    assert Counter((s.color, s.shape) for s in held) == Counter({(c, s): 1 for c in shapes.COLORS
                                                                 for s in shapes.SHAPES})
    # every pair of attribute values is trained with at least two scenes: no held-out scene's answer
    # is implied by the other two attributes
    for a, b in itertools.combinations(("color", "shape", "position"), 2):
        trained = Counter((getattr(s, a), getattr(s, b)) for s in seen)
        assert min(trained.values()) >= 2 and len(trained) == len({(getattr(s, a), getattr(s, b))
                                                                    for s in shapes.all_scenes()})
    # the mismatched image differs in every attribute, and the map is a bijection
    mm = [shapes.mismatched_scene(s) for s in shapes.all_scenes()]
    assert len(set(mm)) == 72
    assert all(m.color != s.color and m.shape != s.shape and m.position != s.position
               for s, m in zip(shapes.all_scenes(), mm))


@pytest.mark.parametrize("seed", SEEDS)
def test_no_heldout_scene_or_protected_image_reaches_training(seed, protected):
    recipe = dataclasses.replace(organism.Recipe(), seed=seed)
    held = set(shapes.heldout_scenes())
    held_text = {shapes.caption(s, lang) for s in held for lang in shapes.LANGS}
    seen = shapes.seen_scenes()
    counts = Counter()
    renders = data.TrainingRenders(seed, SIZE)
    for stage, _, step in data.training_plan(recipe):
        counts[stage] += 1
        assert step.lang == ("ko" if stage == "ko" else "en")
        about = [s for s in step.scenes if s is not None]
        counts[stage, "heldout"] += sum(s in held for s in about)
        if step.kind == "image":
            assert [seen[k] for k, *_ in step.items] == list(step.scenes)      # the image shown is the scene named
            assert all(0 <= j < recipe.render_pool for _, j, _, _ in step.items)
        else:
            counts[stage, "heldout"] += sum(t in held_text for t in step.items)
    steps = (recipe.adapt_steps // recipe.n_checkpoints) * recipe.n_checkpoints
    assert counts["base"] == recipe.base_steps and counts["ko"] == counts["en"] == steps
    assert {k: v for k, v in counts.items() if isinstance(k, tuple)} == \
        {("base", "heldout"): 0, ("ko", "heldout"): 0, ("en", "heldout"): 0}
    shown = {_hash(shapes.render(s, SIZE, seed=renders(k, j))) for k, s in enumerate(seen)
             for j in range(recipe.render_pool)}
    overlap = {what: len(hashes & shown) for what, hashes in protected.items()}
    assert overlap == {"evaluation": 0, "validation": 0, "probe": 0}


def test_evaluation_and_validation_images_differ(protected):
    assert len(protected["evaluation"]) == 72 and len(protected["validation"]) == 54
    assert not protected["evaluation"] & protected["validation"]


def test_the_build_trains_on_the_replayed_streams(monkeypatch):
    """The streams the tests replay are the ones training draws: the continuation batches the build's
    code makes are the plan's steps, encoded (the base stage draws base_plan the same way; integration
    test in test_organism.py)."""
    recipe = organism.Recipe(seed=3)
    seen_steps = []

    class Bank:
        scenes = shapes.seen_scenes()
        n_renders = recipe.render_pool

        def encode(self, step):
            seen_steps.append(step)
            return step

    batches = organism.continuation_batches(None, Bank(), recipe, "ko")
    got = [batches(i) for i in range(40)]
    assert got == list(itertools.islice(data.continuation_plan(recipe, "ko"), 40)) == seen_steps
    ko = list(itertools.islice(data.continuation_plan(recipe, "ko"), 200))
    en = list(itertools.islice(data.continuation_plan(recipe, "en"), 200))
    # the Korean stage and its English control: the same kinds of batches about the same scenes
    assert [(a.kind, a.scenes) for a in ko] == [(b.kind, b.scenes) for b in en]


def test_tokenizer_corpus_holds_nothing_held_out():
    corpus = " ".join(organism.corpus())
    for s in shapes.heldout_scenes():
        for lang in shapes.LANGS:
            assert shapes.caption(s, lang) not in corpus
    assert not any(t in corpus for t in organism.HELDOUT_KO_SENTENCES)
