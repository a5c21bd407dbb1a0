"""VisualTap: the rows a training forward's hooks read are the capture engine's rows, with autograd.

Tiny random-weight models of every spec'd family: the tap's visual / text states of one forward
(grad enabled) equal the store's ``hidden`` rows of the same probes, and gradients flow from them
into the LLM (and, under PEFT, into the LoRA parameters).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import driftlens as dl
from driftlens.errors import UsageError
from driftlens.inputs import model_inputs
from driftlens.specs import load_spec, unwrap
from driftlens.testing import tiny
from driftlens.train.tap import VisualTap

from .test_capture import subset

TOL = {"rtol": 1e-4, "atol": 1e-5}
PEFT_FAMILIES = ("llava", "qwen2_vl", "idefics3")


def _batch(processor, spec, probes) -> dict:
    """All probes in one batch, as the capture engine builds it (float32 model: no cast needed)."""
    items = list(probes)
    return dict(model_inputs(processor, spec, [probes.image(p) for p in items], [p.prompt for p in items]))


def _tap_forward(model, inputs, layers=(0, 1)) -> VisualTap:
    with torch.enable_grad(), VisualTap(model, list(layers)) as tap:
        model(**inputs, use_cache=False)
    return tap


@pytest.fixture
def llava(tmp_path):
    model, processor = tiny.build("llava", seed=0, n_layers=2)
    spec = load_spec(model)
    probes = subset("shapes-bilingual", 2, tmp_path / "probes")
    return model, spec, _batch(processor, spec, probes), processor


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_tap_reads_the_captured_rows_with_grad(family, tmp_path):
    model, processor = tiny.build(family, seed=0, n_layers=2)
    spec = load_spec(model)
    probes = subset("shapes-bilingual", 3, tmp_path / "probes")
    store = dl.capture(model, probes, out=tmp_path / "s.zarr", processor=processor, sites=("hidden",),
                       batch_size=len(probes), progress=False)
    ds = dl.open_store(store)
    modality = ds.modality.values.astype(str)
    tap = _tap_forward(model, _batch(processor, spec, probes))
    for layer in (0, 1):
        rows = ds.hidden.isel(checkpoint=0, layer=layer).values                  # [T, d]
        np.testing.assert_allclose(tap.visual[layer].detach().numpy(), rows[modality == "visual"], **TOL)
        np.testing.assert_allclose(tap.text[layer].detach().numpy(), rows[modality == "text"], **TOL)
    assert tap.visual[1].requires_grad and tap.text[1].requires_grad
    model.zero_grad(set_to_none=True)
    tap.visual[1].sum().backward()
    for i in (0, 1):   # both blocks shape layer 1's visual tokens
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(spec.layer_path(i) + ".")]
        assert grads and any(g is not None and bool(g.abs().sum() > 0) for g in grads), spec.layer_path(i)


@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_tap_under_peft_reads_the_adapted_states(family, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, processor = tiny.build(family, seed=0, n_layers=2)
    spec = load_spec(model)
    n = spec.num_layers(model)
    inputs = _batch(processor, spec, subset("shapes-bilingual", 3, tmp_path / "probes"))
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=[spec.module_path(i, spec.key_proj) for i in range(n)],
                     init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    tap = VisualTap(peft_model, [0, 1])
    assert tap.blocks is unwrap(peft_model).get_submodule(spec.decoder_layers)
    with torch.enable_grad(), tap:
        peft_model(**inputs, use_cache=False)
    assert tap.visual[1].requires_grad
    tap.visual[1].sum().backward()
    lora = {name: p for name, p in peft_model.named_parameters() if "lora_" in name}
    assert len(lora) == 2 * n
    for name, p in lora.items():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    adapted = {k: v.detach() for k, v in tap.visual.items()}
    adapted_text = {k: v.detach() for k, v in tap.text.items()}

    merged = _tap_forward(peft_model.merge_and_unload(), inputs)
    base = _tap_forward(model, inputs)
    for layer in (0, 1):
        np.testing.assert_allclose(adapted[layer].numpy(), merged.visual[layer].detach().numpy(), **TOL)
        np.testing.assert_allclose(adapted_text[layer].numpy(), merged.text[layer].detach().numpy(), **TOL)
    assert not np.allclose(adapted[1].numpy(), base.visual[1].detach().numpy(), **TOL)   # LoRA is read


@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_key_site_reads_the_captured_keys_and_the_adapter(family, tmp_path):
    """``site="key"``: the rows are the store's ``key`` rows (the key projection's output), and under
    PEFT the LoRA-wrapped projection is read -- gradients reach the key adapters, and a block's later
    modules (its query projection) get none from its keys."""
    from peft import LoraConfig, get_peft_model

    model, processor = tiny.build(family, seed=0, n_layers=2)
    spec = load_spec(model)
    probes = subset("shapes-bilingual", 3, tmp_path / "probes")
    ds = dl.open_store(dl.capture(model, probes, out=tmp_path / "s.zarr", processor=processor, sites=("key",),
                                  batch_size=len(probes), progress=False))
    modality = ds.modality.values.astype(str)
    inputs = _batch(processor, spec, probes)
    with torch.enable_grad(), VisualTap(model, [0, 1], site="key") as tap:
        model(**inputs, use_cache=False)
    for layer in (0, 1):
        rows = ds.key.isel(checkpoint=0, layer=layer).values                       # [T, d_kv]
        np.testing.assert_allclose(tap.visual[layer].detach().numpy(), rows[modality == "visual"], **TOL)
        np.testing.assert_allclose(tap.text[layer].detach().numpy(), rows[modality == "text"], **TOL)
    targets = [spec.module_path(i, m) for i in range(2) for m in (spec.key_proj, spec.query_proj)]
    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 init_lora_weights=False))
    with torch.enable_grad(), VisualTap(peft_model, [1], site="key") as tap:
        peft_model(**inputs, use_cache=False)
    tap.visual[1].pow(2).sum().backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    key1 = [g for n, g in grads.items() if f"layers.1.{spec.key_proj}" in n]
    query1 = [g for n, g in grads.items() if f"layers.1.{spec.query_proj}" in n]
    assert key1 and all(g is not None and bool(g.abs().sum() > 0) for g in key1)
    assert query1 and all(g is None or not bool(g.abs().any()) for g in query1)
    assert not np.allclose(tap.visual[1].detach().numpy(), ds.key.isel(checkpoint=0, layer=1).values[
        modality == "visual"], **TOL)                                        # the adapter is read


def test_detach_removes_every_hook(llava):
    model, spec, inputs, _ = llava
    blocks = model.get_submodule(spec.decoder_layers)
    before = len(model._forward_pre_hooks), [len(b._forward_hooks) for b in blocks]
    with VisualTap(model, [1]) as tap:
        assert tap.attached and len(blocks[1]._forward_hooks) == before[1][1] + 1
        assert len(model._forward_pre_hooks) == before[0] + 1
        with pytest.raises(UsageError, match="already attached"):
            tap.attach()
        model(**inputs, use_cache=False)
    assert not tap.attached
    assert (len(model._forward_pre_hooks), [len(b._forward_hooks) for b in blocks]) == before
    assert all(len(b._forward_hooks) == 0 for b in blocks)
    kept = tap.visual[1]
    model(**inputs, use_cache=False)             # detached: nothing read any more
    assert tap.visual[1] is kept
    tap.clear()
    assert tap.visual == {} and tap.text == {}


def test_set_batch_and_positional_calls_give_the_same_rows(llava):
    model, _, inputs, _ = llava
    ref = _tap_forward(model, inputs)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.enable_grad(), VisualTap(model, [0, 1]) as tap:
        model(inputs["input_ids"], **rest, use_cache=False)        # input_ids by position
        np.testing.assert_array_equal(tap.visual[1].detach().numpy(), ref.visual[1].detach().numpy())
        tap.set_batch(inputs["input_ids"], inputs["attention_mask"])
        assert tap.visual == {}                                    # set_batch starts a new forward
        model(**inputs, use_cache=False)
        np.testing.assert_array_equal(tap.text[0].detach().numpy(), ref.text[0].detach().numpy())
    n_vis = int((inputs["input_ids"] == tap.image_token_id).sum())
    n_txt = int(inputs["attention_mask"].sum()) - n_vis
    assert tap.visual[0].shape == (n_vis, 64) and tap.text[0].shape == (n_txt, 64)


def test_tap_under_activation_checkpointing(llava):
    model, spec, inputs, _ = llava
    ref = _tap_forward(model, inputs)
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    tap = _tap_forward(model, inputs)
    assert tap.visual[1].requires_grad
    np.testing.assert_allclose(tap.visual[1].detach().numpy(), ref.visual[1].detach().numpy(), **TOL)
    kept = tap.visual[1]
    model.zero_grad(set_to_none=True)
    tap.visual[1].sum().backward()               # recomputes the blocks; their hooks do not run again
    assert model.get_submodule(spec.module_path(0, spec.key_proj)).weight.grad is not None
    assert tap.visual[1] is kept


@pytest.mark.parametrize("layers, match", [
    ([2], "out of range"), ([0, 0], "repeat"), ([], "non-empty"), (["1"], "integers"), ([True], "integers"),
])
def test_bad_layers_are_refused(llava, layers, match):
    model = llava[0]
    with pytest.raises(UsageError, match=match):
        VisualTap(model, layers)


def test_bad_site_is_refused(llava):
    with pytest.raises(UsageError, match="site"):
        VisualTap(llava[0], [0], site="final")


def test_batch_without_image_token_is_refused_unless_paused(llava):
    model, spec, inputs, processor = llava
    text = dict(processor.tokenizer(["a red square", "ein blauer Kreis"], return_tensors="pt", padding=True))
    image_id = spec.image_token_id(model.config)
    with VisualTap(model, [0, 1]) as tap:
        with pytest.raises(UsageError, match=f"no image token \\(id {image_id}\\)"):
            model(**text, use_cache=False)
        with pytest.raises(UsageError, match=f"id {image_id}"):
            tap.set_batch(text["input_ids"], text["attention_mask"])
        model(**inputs, use_cache=False)
        kept = tap.visual[1]
        with tap.paused():
            model(**text, use_cache=False)                 # e.g. the grounding contrast's text-only pass
        assert tap.visual[1] is kept


def test_sequence_that_differs_from_input_ids_is_refused(llava):
    model, _, inputs, _ = llava
    with VisualTap(model, [0]) as tap:
        tap.set_batch(inputs["input_ids"][:, :-1], inputs["attention_mask"][:, :-1])
        with pytest.raises(UsageError, match="does not match"):
            model(**inputs, use_cache=False)
        with pytest.raises(UsageError, match="must match"):
            tap.set_batch(inputs["input_ids"], inputs["attention_mask"][:, :-1])
