"""Every spec'd VLM family end to end on a tiny random-weight model: spec, inputs, forward,
image-token / visual-feature agreement, determinism, and an offline save/load round trip."""
from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch
from PIL import Image

from driftlens.inputs import model_inputs
from driftlens.specs import load_spec
from driftlens.testing import tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["What color is the shape in the picture?", "도형은 무슨 색인가요?", "Where?"]
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1234)
    # a square, a wide and a tall image: exercises anyres tiles, Qwen grids, Idefics3 splitting
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            [(64, 64), (40, 72), (50, 30)]]


def image_features(model, batch) -> list[torch.Tensor]:
    """The model's visual features, flattened to rows ``[n, hidden]`` per returned group."""
    params = inspect.signature(model.get_image_features).parameters
    kw = {k: v for k, v in batch.items() if k not in TEXT_KEYS and k in params}
    with torch.no_grad():
        pooled = model.get_image_features(**kw).pooler_output
    groups = pooled if isinstance(pooled, (list, tuple)) else list(pooled)
    return [g.reshape(-1, g.shape[-1]) for g in groups]


def lm_inputs_embeds(model, spec, batch) -> torch.Tensor:
    """``inputs_embeds`` the language model receives (visual features already scattered in)."""
    lm = model.get_submodule(spec.decoder_layers.rsplit(".", 1)[0])
    got = {}

    def hook(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        handle.remove()
    return got["embeds"]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_family(family, images, tmp_path):
    model, processor = tiny.build(family, seed=0, n_layers=2)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    spec = load_spec(model)
    assert spec.family == family
    spec.validate(model)
    assert spec.num_layers(model) == 2

    batch = model_inputs(processor, spec, images, PROMPTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]           # [B, S]
    image_id = spec.image_token_id(model.config)
    tok = processor.tokenizer
    assert ids.shape[0] == len(PROMPTS)
    # right padding: every row is 1...1 0...0, padding holds the pad token
    assert torch.all(mask[:, :-1] >= mask[:, 1:])
    assert torch.all(ids[mask == 0] == tok.pad_token_id)
    assert int(mask.sum(1).max()) == mask.shape[1]                    # padded to the longest row
    assert not (ids == tok.unk_token_id).any(), "Korean/English text must be byte-level encodable"
    assert "도형은 무슨 색인가요?" in tok.decode(ids[1], skip_special_tokens=False)
    n_img = (ids == image_id).sum(1)                                   # [B]
    assert torch.all(n_img > 0)

    # forward with hidden states
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, use_cache=False)
    assert out.logits.shape[:2] == ids.shape
    assert len(out.hidden_states) == 3
    assert all(h.shape == (*ids.shape, tiny.HIDDEN) for h in out.hidden_states)
    assert torch.isfinite(out.logits).all()

    # exactly one visual feature per image-placeholder token, scattered in order
    feats = image_features(model, batch)
    total = sum(f.shape[0] for f in feats)
    assert total == int(n_img.sum()), (total, n_img.tolist())
    if len(feats) == len(PROMPTS):                                     # one group per image
        assert [f.shape[0] for f in feats] == n_img.tolist()
    embeds = lm_inputs_embeds(model, spec, batch)                      # [B, S, H]
    torch.testing.assert_close(embeds[ids == image_id], torch.cat(feats), rtol=0, atol=1e-6)

    # deterministic for a seed, different across seeds
    same, _ = tiny.build(family, seed=0, n_layers=2)
    other, _ = tiny.build(family, seed=1, n_layers=2)
    sd, sd_same, sd_other = model.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_same[k]) for k in sd)
    assert any(not torch.equal(sd[k], sd_other[k]) for k in sd if sd[k].is_floating_point())

    # offline round trip: save -> from_pretrained gives the same inputs and identical logits
    from transformers import AutoModelForImageTextToText

    path = tiny.save(family, tmp_path / family, seed=0, n_layers=2)
    assert (path / "model.safetensors").is_file()
    loaded = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    assert type(loaded) is type(model)
    loaded_proc = tiny.load_processor(path)
    assert type(loaded_proc).__name__ == type(processor).__name__
    batch2 = model_inputs(loaded_proc, load_spec(loaded), images, PROMPTS)
    assert batch2.keys() == batch.keys()
    for k in batch:
        assert torch.equal(batch[k], batch2[k]), k
    with torch.no_grad():
        logits2 = loaded(**batch2, use_cache=False).logits
    torch.testing.assert_close(logits2, out.logits, rtol=0, atol=1e-6)


def test_overrides_and_depth():
    model, _ = tiny.build("llava", seed=0, n_layers=3, hidden_size=32, vision_config={"num_hidden_layers": 3},
                          top_config={"projector_hidden_act": "relu"})
    spec = load_spec(model)
    assert spec.num_layers(model) == 3
    assert model.config.text_config.hidden_size == 32
    assert model.config.vision_config.num_hidden_layers == 3
    assert model.config.projector_hidden_act == "relu"
    with pytest.raises(ValueError, match="unknown tiny family 'blip2'"):
        tiny.build("blip2")


def test_validate_accepts_peft_model():
    from peft import LoraConfig, get_peft_model

    model, _ = tiny.build("qwen2_vl", seed=0)
    spec = load_spec(model)
    targets = [spec.module_path(i, t) for i in range(spec.num_layers(model)) for t in spec.lora_targets]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    assert load_spec(peft_model).family == "qwen2_vl"
    spec.validate(peft_model)
    assert spec.num_layers(peft_model) == 2
