"""The grounding contrast on the organism's tiny LLaVA (random init): log-probs, text-only batch, bounds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from driftlens import organism
from driftlens.organism import shapes
from driftlens.train.grounding import GroundingContrast, grounding_contrast, label_logprobs, text_only_batch


@pytest.fixture(scope="module")
def tiny_organism():
    recipe = organism.Recipe()
    processor = organism.make_processor(recipe)
    torch.manual_seed(0)
    model = organism.make_model(recipe, processor.tokenizer).eval()
    scenes = shapes.split_scenes(seed=0)[0][:3]
    images = [shapes.render(s, size=recipe.image_size, seed=1) for s in scenes]
    batch = organism.encode_image_examples(processor, images, ["What color is the shape?"] * 3,
                                           ["red", "dark blue", "green"])
    return model, processor, batch


def test_label_logprobs_match_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 1, 2, -100, -100, -100]])
    got = label_logprobs(logits, labels)
    for b in range(2):
        vals = [torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item() for t in range(1, 6) if labels[b, t] >= 0]
        assert float(got[b]) == pytest.approx(np.mean(vals), rel=1e-6)
    assert float(label_logprobs(logits, labels, reduce="sum")[0]) == pytest.approx(
        3 * float(got[0]), rel=1e-6)


def test_text_only_batch_drops_the_image_and_keeps_the_answer(tiny_organism):
    model, processor, batch = tiny_organism
    image_id = model.config.image_token_id
    text = text_only_batch(batch, image_id, processor.tokenizer.pad_token_id)
    assert set(text) == {"input_ids", "attention_mask", "labels"}
    assert not (text["input_ids"] == image_id).any()
    for j in range(3):
        full = batch["labels"][j][batch["labels"][j] >= 0].tolist()
        assert text["labels"][j][text["labels"][j] >= 0].tolist() == full        # the same answer tokens
        kept = batch["input_ids"][j][(batch["input_ids"][j] != image_id) & (batch["attention_mask"][j] > 0)]
        assert text["input_ids"][j][text["attention_mask"][j] > 0].tolist() == kept.tolist()
    out = model(**{k: v for k, v in text.items() if k != "labels"})             # runs without pixels
    assert torch.isfinite(out.logits).all()


def test_contrast_is_bounded_and_differentiable(tiny_organism):
    model, processor, batch = tiny_organism
    term = GroundingContrast(model.config.image_token_id, processor.tokenizer.pad_token_id, margin=1.0)
    model.zero_grad()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    value = term(model, batch, logits)
    assert 0.0 <= float(value.detach()) and np.isfinite(term.last["delta"])
    value.backward()
    grads = [p.grad for n, p in model.named_parameters() if "language_model" in n and p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)
    # the hinge: no reward once the image helps by the margin, never below 0
    lp_t = torch.zeros(4)
    assert float(grounding_contrast(torch.tensor([2.0, 3.0, 1.5, 10.0]), lp_t, margin=1.0)) == 0.0
    assert float(grounding_contrast(torch.tensor([0.0, 0.0, 0.0, 0.0]), lp_t, margin=1.0)) == 1.0
