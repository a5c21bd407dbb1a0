"""Capture engine on tiny random-weight models of every spec'd family.

The reference for every captured vector is computed independently: a plain forward with
``output_hidden_states=True`` and ordinary ``register_forward_hook`` hooks, on the same
model inputs.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import driftlens as dl
from driftlens.capture import CaptureError, plan_tokens
from driftlens.probes import ProbeSet
from driftlens.sources import SourceError
from driftlens.specs import load_spec
from driftlens.store import StoreMismatchError
from driftlens.testing import tiny


def subset(name: str, n: int, dest: Path) -> ProbeSet:
    """The first ``n`` probes of a shipped probe set, copied to ``dest``."""
    src = ProbeSet.load(name)
    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    for p in list(src)[:n]:
        target = dest / p.image
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src.root / p.image, target)
        lines.append(json.dumps({"id": p.id, "image": p.image, "lang": p.lang, "prompt": p.prompt,
                                 "answer": p.answer, "group": p.group}, ensure_ascii=False))
    (dest / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ProbeSet.load(dest / "manifest.jsonl")


def reference_forward(model, spec, inputs):
    """hidden_states, per-block outputs and k_proj outputs from a plain forward with hooks."""
    n = spec.num_layers(model)
    blocks = model.get_submodule(spec.decoder_layers)
    rec_k, rec_h = {}, {}
    hooks = []
    for i in range(n):
        hooks.append(blocks[i].get_submodule(spec.key_proj).register_forward_hook(
            lambda m, a, o, i=i: rec_k.__setitem__(i, o)))
        hooks.append(blocks[i].register_forward_hook(
            lambda m, a, o, i=i: rec_h.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    hs = out.hidden_states
    if hasattr(out, "language_model_outputs"):  # not used by current families
        hs = out.language_model_outputs.hidden_states
    return hs, rec_h, rec_k


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_capture_matches_plain_forward(family, tmp_path):
    model, processor = tiny.build(family, seed=0, n_layers=2)
    spec = load_spec(model)
    probes = subset("photos-bilingual", 4, tmp_path / "probes")
    out = dl.capture(model, probes, out=tmp_path / "s.zarr", sites=("embed", "hidden", "key", "final"),
                     batch_size=2, processor=processor, progress=False)
    ds = dl.open_store(out)
    assert list(ds.checkpoint.values.astype(str)) == ["model"]
    plan = plan_tokens(processor, spec, model.config, probes, batch_size=2)
    image_id = spec.image_token_id(model.config)
    n_layers = spec.num_layers(model)
    assert ds.sizes["layer"] == n_layers
    for batch in plan.batches:
        hs, blocks, keys = reference_forward(model, spec, batch.inputs)
        rows = slice(batch.start, batch.start + len(batch.rows_b))
        b, p = torch.as_tensor(batch.rows_b), torch.as_tensor(batch.rows_p)
        for layer in range(n_layers):
            got_h = ds.hidden.isel(checkpoint=0, layer=layer, token=rows).values
            got_k = ds.key.isel(checkpoint=0, layer=layer, token=rows).values
            np.testing.assert_allclose(got_h, blocks[layer][b, p].numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got_k, keys[layer][b, p].numpy(), rtol=1e-5, atol=1e-5)
            if layer < n_layers - 1:   # HF applies the final norm to its last hidden_states entry
                np.testing.assert_allclose(got_h, hs[layer + 1][b, p].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ds.embed.isel(checkpoint=0, token=rows).values,
                                   hs[0][b, p].numpy(), rtol=1e-5, atol=1e-5)
        # `final` is the final norm's output: HF's last hidden_states entry
        np.testing.assert_allclose(ds.final.isel(checkpoint=0, token=rows).values,
                                   hs[-1][b, p].numpy(), rtol=1e-5, atol=1e-5)
        # coordinates
        ids = batch.inputs["input_ids"]
        mod = ds.modality.values[rows].astype(str)
        assert (mod == "visual").sum() == int((ids == image_id).sum())   # every image token captured
        np.testing.assert_array_equal(ds.position.values[rows], batch.rows_p)
        expect = np.where(ids[b, p].numpy() == image_id, "visual", "text")
        np.testing.assert_array_equal(mod, expect)
        for j, pi in enumerate(batch.probe_index):
            sel = batch.rows_b == j
            assert set(ds.sample.values[rows][sel].astype(str)) == {probes[pi].id}
            assert set(ds.lang.values[rows][sel].astype(str)) == {probes[pi].lang}
            assert set(ds.cluster.values[rows][sel].astype(str)) == {probes[pi].cluster}
            assert sel.sum() == int(batch.inputs["attention_mask"][j].sum())


def _perturbed(model, scale=0.05, seed=1):
    import copy

    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if "language_model" in name or "text_model" in name:
                prm.add_(scale * torch.randn(prm.shape, generator=g))
    return m


def _adapter(model, path: Path, spec):
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    targets = [spec.module_path(i, spec.key_proj) for i in range(spec.num_layers(model))]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    peft_model.save_pretrained(str(path))
    return peft_model.merge_and_unload()


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """A three-point trajectory: saved model dir, PEFT adapter dir, in-memory module."""
    root = tmp_path_factory.mktemp("traj")
    base_dir = tiny.save("llava", root / "base", seed=0, n_layers=2)
    model, processor = tiny.build("llava", seed=0, n_layers=2)
    spec = load_spec(model)
    merged = _adapter(model, root / "adapter", spec)
    moved = _perturbed(model)
    probes = subset("shapes-bilingual", 6, root / "probes")
    ckpts = {"base": base_dir, "lora": root / "adapter", "moved": moved}
    return {"root": root, "base_dir": base_dir, "ckpts": ckpts, "probes": probes, "merged": merged,
            "moved": moved, "model": model, "spec": spec, "processor": processor}


def test_trajectory_three_sources(trajectory, tmp_path):
    t = trajectory
    out = dl.capture(t["base_dir"], t["probes"], t["ckpts"], out=tmp_path / "traj.zarr",
                     batch_size=4, progress=False)
    ds = dl.open_store(out)
    assert list(ds.checkpoint.values.astype(str)) == ["base", "lora", "moved"]
    plan = plan_tokens(t["processor"], t["spec"], t["model"].config, t["probes"], batch_size=4)
    for label, module in (("base", t["model"]), ("lora", t["merged"]), ("moved", t["moved"])):
        for batch in plan.batches:
            _, blocks, keys = reference_forward(module, t["spec"], batch.inputs)
            b, p = torch.as_tensor(batch.rows_b), torch.as_tensor(batch.rows_p)
            rows = slice(batch.start, batch.start + len(batch.rows_b))
            np.testing.assert_allclose(ds.hidden.sel(checkpoint=label).isel(layer=1, token=rows).values,
                                       blocks[1][b, p].numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(ds.key.sel(checkpoint=label).isel(layer=0, token=rows).values,
                                       keys[0][b, p].numpy(), rtol=1e-4, atol=1e-4)
    base = ds.key.sel(checkpoint="base").values
    assert not np.allclose(base, ds.key.sel(checkpoint="lora").values)   # the adapter was applied
    assert not np.allclose(base, ds.key.sel(checkpoint="moved").values)


KILL_SCRIPT = """
import sys, time, torch
import driftlens as dl
from driftlens import store as st
from driftlens.probes import ProbeSet

orig = st.CheckpointWriter._write
def slow_write(self, *a, **k):
    time.sleep(0.3)
    return orig(self, *a, **k)
st.CheckpointWriter._write = slow_write
root = sys.argv[1]
ckpts = {{"base": root + "/base", "lora": root + "/adapter", "moved": root + "/moved"}}
dl.capture(root + "/base", ProbeSet.load(root + "/probes/manifest.jsonl"), ckpts,
           out=sys.argv[2], batch_size={bs}, progress=False)
"""


def test_kill_and_rerun_gives_the_same_store(trajectory, tmp_path):
    t = trajectory
    root = t["root"]
    if not (root / "moved").exists():
        t["moved"].save_pretrained(str(root / "moved"))
    ckpts = {"base": t["base_dir"], "lora": root / "adapter", "moved": root / "moved"}
    script = tmp_path / "run_capture.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT.format(bs=2)))
    killed = tmp_path / "killed.zarr"
    env = dict(os.environ, PYTHONPATH=str(Path(dl.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(killed)], env=env)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:   # kill once the second checkpoint is half written
            meta = killed / "zarr.json"
            if meta.exists():
                attrs = json.loads(meta.read_text()).get("attributes", {})
                if len(attrs.get("checkpoints", [])) >= 2 and (killed / "hidden" / "c" / "1").exists():
                    break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "capture finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = dl.open_store(killed)
    assert list(partial.checkpoint.values.astype(str)) == ["base"]    # interrupted one hidden
    full = dl.open_store(killed, include_incomplete=True)
    assert list(full.checkpoint.values.astype(str)) == ["base", "lora"]

    dl.capture(t["base_dir"], t["probes"], ckpts, out=killed, batch_size=2, progress=False)
    clean = dl.capture(t["base_dir"], t["probes"], ckpts, out=tmp_path / "clean.zarr",
                       batch_size=2, progress=False)
    a, b = dl.open_store(killed), dl.open_store(clean)
    assert list(a.checkpoint.values.astype(str)) == ["base", "lora", "moved"]
    for var in ("hidden", "key"):
        np.testing.assert_array_equal(a[var].values, b[var].values)
    for c in ("sample", "position", "modality", "lang"):
        np.testing.assert_array_equal(a[c].values, b[c].values)
    drop = {"store_path"}                                       # where each was opened from
    assert {k: v for k, v in a.attrs.items() if k not in drop} == {k: v for k, v in b.attrs.items() if k not in drop}


def test_append_checkpoint_and_skip_completed(trajectory, tmp_path, monkeypatch):
    t = trajectory
    out = tmp_path / "app.zarr"
    dl.capture(t["base_dir"], t["probes"], {"base": t["base_dir"]}, out=out, batch_size=4, progress=False)
    calls = []
    cap = importlib.import_module("driftlens.capture")   # the package re-exports the function of that name

    orig = cap.trace_batch
    monkeypatch.setattr(cap, "trace_batch", lambda *a, **k: calls.append(1) or orig(*a, **k))
    dl.capture(t["base_dir"], t["probes"], {"base": t["base_dir"], "moved": t["moved"]}, out=out,
               batch_size=4, progress=False)
    ds = dl.open_store(out)
    assert list(ds.checkpoint.values.astype(str)) == ["base", "moved"]
    n_batches = -(-len(t["probes"]) // 4)
    assert len(calls) == n_batches       # only the new checkpoint was traced


def test_error_mid_checkpoint_leaves_it_incomplete_then_rerun_completes(trajectory, tmp_path, monkeypatch):
    """An exception in the third batch: queued rows are flushed, files closed, the checkpoint
    is not marked complete; the next capture redoes it and equals a clean run."""
    t = trajectory
    cap = importlib.import_module("driftlens.capture")
    orig, calls = cap.trace_batch, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return orig(*a, **k)

    monkeypatch.setattr(cap, "trace_batch", failing)
    out = tmp_path / "err.zarr"
    with pytest.raises(cap.CaptureError, match="boom"):
        dl.capture(t["model"], t["probes"], out=out, processor=t["processor"], batch_size=2, progress=False)
    assert len(dl.open_store(out).checkpoint) == 0
    assert list(dl.open_store(out, include_incomplete=True).checkpoint.values.astype(str)) == ["model"]
    monkeypatch.setattr(cap, "trace_batch", orig)
    dl.capture(t["model"], t["probes"], out=out, processor=t["processor"], batch_size=2, progress=False)
    clean = dl.capture(t["model"], t["probes"], out=tmp_path / "clean.zarr", processor=t["processor"],
                       batch_size=2, progress=False)
    a, b = dl.open_store(out), dl.open_store(clean)
    for var in ("hidden", "key"):
        np.testing.assert_array_equal(a[var].values, b[var].values)


def test_store_refuses_other_probe_set_and_architecture(trajectory, tmp_path):
    t = trajectory
    out = tmp_path / "r.zarr"
    dl.capture(t["model"], t["probes"], out=out, processor=t["processor"], batch_size=4, progress=False)
    other = subset("shapes-bilingual", 4, tmp_path / "other")
    with pytest.raises(StoreMismatchError, match="another probe set"):
        dl.capture(t["model"], other, out=out, processor=t["processor"], progress=False)
    qwen, qproc = tiny.build("qwen2_vl", seed=0, n_layers=2)
    with pytest.raises(StoreMismatchError, match="another architecture"):
        dl.capture(qwen, t["probes"], out=out, processor=qproc, progress=False)
    with pytest.raises(StoreMismatchError, match="another layer selection"):
        dl.capture(t["model"], t["probes"], {"x": t["moved"]}, out=out, processor=t["processor"],
                   layers=[0], progress=False)


def test_missing_checkpoint_dir(trajectory, tmp_path):
    t = trajectory
    missing = tmp_path / "nope"
    with pytest.raises(SourceError, match=f"{missing}.*does not exist"):
        dl.capture(t["base_dir"], t["probes"], {"a": missing}, out=tmp_path / "m.zarr", progress=False)


def test_pickle_only_checkpoint_is_refused(trajectory, tmp_path):
    t = trajectory
    pk = tmp_path / "pickled"
    _write_bin(t["model"], pk)
    assert not list(pk.glob("*.safetensors"))
    with pytest.raises(SourceError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        dl.capture(t["base_dir"], t["probes"], {"p": pk}, out=tmp_path / "p.zarr", progress=False)
    out = dl.capture(t["base_dir"], t["probes"], {"p": pk}, out=tmp_path / "p2.zarr",
                     allow_pickle=True, progress=False)
    assert list(dl.open_store(out).checkpoint.values.astype(str)) == ["p"]


def _write_bin(model, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(path))
    torch.save(model.state_dict(), path / "pytorch_model.bin")


def test_trust_remote_code_is_off_by_default(trajectory, tmp_path):
    t = trajectory
    remote = tmp_path / "remote"
    shutil.copytree(t["base_dir"], remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageTextToText": "modeling_evil.EvilModel",
                       "AutoConfig": "configuration_evil.EvilConfig"}
    cfg["model_type"] = "evil_remote"
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    (remote / "configuration_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(SourceError, match="trust_remote_code|remote"):
        dl.capture(t["base_dir"], t["probes"], {"r": remote}, out=tmp_path / "rc.zarr", progress=False)


def test_image_token_count_mismatch_is_explained(tmp_path):
    model, processor = tiny.build("llava", seed=0, n_layers=2)
    model.config.vision_feature_select_strategy = "full"     # one more feature per image than tokens
    model.model.config.vision_feature_select_strategy = "full"
    probes = subset("shapes-bilingual", 2, tmp_path / "probes")
    with pytest.raises(CaptureError, match="number of image tokens.*does not match"):
        dl.capture(model, probes, out=tmp_path / "mm.zarr", processor=processor, progress=False)


def test_token_subsampling_is_fixed_across_checkpoints(trajectory, tmp_path):
    t = trajectory
    out = dl.capture(t["base_dir"], t["probes"], {"base": t["base_dir"], "moved": t["moved"]},
                     out=tmp_path / "sub.zarr", tokens_per_sample=3, seed=7, dtype="float16",
                     progress=False)
    ds = dl.open_store(out)
    assert ds.hidden.dtype == np.float16
    counts = {}
    for s, m in zip(ds.sample.values.astype(str), ds.modality.values.astype(str)):
        counts[(s, m)] = counts.get((s, m), 0) + 1
    assert max(counts.values()) <= 3
    assert {m for _, m in counts} == {"visual", "text"}
    out2 = dl.capture(t["base_dir"], t["probes"], {"moved": t["moved"]}, out=tmp_path / "sub2.zarr",
                      tokens_per_sample=3, seed=7, dtype="float16", progress=False)
    ds2 = dl.open_store(out2)
    np.testing.assert_array_equal(ds2.position.values, ds.position.values)
    np.testing.assert_array_equal(ds2.hidden.values[0], ds.hidden.sel(checkpoint="moved").values)


@pytest.mark.gpu
def test_capture_on_cuda_matches_cpu(tmp_path):
    model, processor = tiny.build("qwen2_vl", seed=0, n_layers=2)
    probes = subset("photos-bilingual", 4, tmp_path / "probes")
    a = dl.capture(model, probes, out=tmp_path / "cpu.zarr", processor=processor, device="cpu", progress=False)
    b = dl.capture(model, probes, out=tmp_path / "gpu.zarr", processor=processor, device="cuda", progress=False)
    np.testing.assert_allclose(dl.open_store(a).hidden.values, dl.open_store(b).hidden.values, rtol=1e-3, atol=1e-3)
