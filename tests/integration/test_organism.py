"""The model organism's machinery on a quick recipe (the real recipe is checked by test_demo)."""
from __future__ import annotations

import dataclasses

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


def test_recipe_change_builds_elsewhere():
    assert organism.Recipe().key() != dataclasses.replace(organism.Recipe(), ko_lr=1e-3).key()


def test_evaluation_shape(quick):
    ev = organism.evaluate(quick, progress=False)
    assert set(ev["grounding_accuracy"]) == set(quick.checkpoints)
    assert 0.2 < ev["chance_accuracy"] < 0.25
    for acc in ev["grounding_accuracy"].values():
        assert set(acc) == {"en", "ko"} and all(0 <= v <= 1 for v in acc.values())
    assert (quick.root / "evaluation.json").exists()
    assert organism.evaluate(quick, progress=False) == ev          # cached
