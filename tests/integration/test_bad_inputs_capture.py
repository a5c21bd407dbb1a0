"""Bad inputs and faults of `driftlens capture` (subprocesses, tiny saved models).

Each case asserts the exit code of its kind, one ``driftlens capture: error:`` line naming the
flag / value / path at fault, no traceback, and the store on disk unchanged (or, for
``--overwrite`` and the interrupted capture, completed correctly by the rerun).
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import driftlens as dl
from driftlens.testing import tiny

from ..badinput import clean_exit, cli, refused, snapshot
from .test_capture import subset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two saved tiny LLaVA checkpoints of one architecture, a probe subset, and a store of both."""
    root = tmp_path_factory.mktemp("badcap")
    base = tiny.save("llava", root / "base", seed=0, n_layers=2)
    other = tiny.save("llava", root / "other", seed=1, n_layers=2)
    probes = subset("shapes-bilingual", 4, root / "probes")
    store = root / "s.zarr"
    clean_exit(cli("capture", base, "--probes", probes.manifest, "-c", f"base={base}", "-c", f"ko1={base}",
                   "--out", store, "--batch-size", "2", "--no-progress"))
    return {"root": root, "base": base, "other": other, "probes": probes.manifest, "store": store}


def _capture(w, *extra, out=None):
    return cli("capture", w["base"], "--probes", w["probes"], "--out", out or w["store"], "--batch-size", "2",
               "--no-progress", *extra)


def test_label_bound_to_another_source_is_refused(world):
    """Silent case: `-c ko1=<other dir>` on a store that has ko1 kept the old data with exit 0."""
    before = snapshot(world["store"])
    err = refused(_capture(world, "-c", f"base={world['base']}", "-c", f"ko1={world['other']}"), "data",
                  "'ko1'", str(world["base"].resolve()), str(world["other"].resolve()), "--overwrite ko1")
    assert err.count("fingerprint") >= 2
    assert snapshot(world["store"]) == before


def test_overwrite_replaces_one_checkpoint(world, tmp_path):
    store = shutil.copytree(world["store"], tmp_path / "s.zarr")
    old = dl.open_store(store)
    base_before = old.hidden.sel(checkpoint="base").values.copy()
    ko_before = old.hidden.sel(checkpoint="ko1").values.copy()
    clean_exit(_capture(world, "-c", f"base={world['base']}", "-c", f"ko1={world['other']}", "--overwrite", "ko1",
                        out=store))
    new = dl.open_store(store)
    np.testing.assert_array_equal(new.hidden.sel(checkpoint="base").values, base_before)
    assert not np.allclose(new.hidden.sel(checkpoint="ko1").values, ko_before)
    assert dl.store.verify_store(store, "full") == ([], [])
    ident = dl.store.read_record(store, 1)["identity"]
    assert ident["source"] == str(world["other"].resolve())
    # the overwritten checkpoint now resumes under its new source, and refuses the old one
    clean_exit(_capture(world, "-c", f"base={world['base']}", "-c", f"ko1={world['other']}", out=store))
    refused(_capture(world, "-c", f"base={world['base']}", "-c", f"ko1={world['base']}", out=store), "data", "ko1")


def test_moved_checkpoint_with_the_same_weights_resumes(world, tmp_path):
    moved = shutil.copytree(world["base"], tmp_path / "moved")
    store = shutil.copytree(world["store"], tmp_path / "s.zarr")
    before = snapshot(store)
    clean_exit(_capture(world, "-c", f"base={world['base']}", "-c", f"ko1={moved}", out=store))
    assert snapshot(store) == before


@pytest.mark.parametrize("extra, kind, named", [
    (("-c", "a=X", "-c", "a=Y"), "usage", "'a' is given twice"),
    (("--tokens-per-sample", "-1"), "usage", "--tokens-per-sample"),
    (("--tokens-per-sample", "0"), "usage", "--tokens-per-sample"),
    (("--batch-size", "0"), "usage", "--batch-size"),
    (("--layers", "1", "1"), "usage", "[1, 1]"),
    (("--layers", "7"), "usage", "[7]"),
    (("--sites", "hiden"), "usage", "hiden"),
    (("--dtype", "int8"), "usage", "int8"),
    (("--device", "cuda"), "environment", "cuda"),
    (("--overwrite", "nope"), "usage", "nope"),
    (("-c", "x=/does/not/exist"), "data", "/does/not/exist"),
    (("--probes", "/does/not/exist.jsonl"), "data", "/does/not/exist.jsonl"),
])
def test_capture_flags_refused_before_any_model_load(world, tmp_path, extra, kind, named):
    if kind == "environment" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "new.zarr"
    refused(_capture(world, *extra, out=out), kind, named)
    assert not out.exists() or not any(out.iterdir())


def test_resume_with_another_token_selection_is_refused(world):
    """Silent case: a store captured with all tokens continued with --tokens-per-sample 3."""
    before = snapshot(world["store"])
    refused(_capture(world, "-c", f"base={world['base']}", "-c", f"ko2={world['other']}",
                     "--tokens-per-sample", "3"), "data", "token selection", "--tokens-per-sample")
    refused(_capture(world, "-c", f"ko2={world['other']}", "--layers", "0"), "data", "layer selection")
    refused(_capture(world, "-c", f"ko2={world['other']}", "--sites", "hidden"), "data", "site selection")
    assert snapshot(world["store"]) == before


def test_out_is_a_file_or_a_foreign_folder(world, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    refused(_capture(world, out=f), "usage", str(f))
    d = tmp_path / "folder"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    refused(_capture(world, out=d), "data", str(d), "not a driftlens store")


def test_corrupt_weights_are_one_line(world, tmp_path):
    bad = shutil.copytree(world["other"], tmp_path / "bad")
    for w in bad.glob("*.safetensors"):
        w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    out = tmp_path / "s.zarr"
    refused(_capture(world, "-c", f"base={world['base']}", "-c", f"bad={bad}", out=out), "data", str(bad))
    assert dl.open_store(out).checkpoint.values.tolist() == ["base"]      # the good one is kept


def test_ctrl_c_is_quiet_and_resumable(world, tmp_path):
    """SIGINT mid-capture: exit 130, a short message, no traceback; the rerun completes the store."""
    out = tmp_path / "s.zarr"
    args = [sys.executable, "-m", "driftlens.cli", "capture", str(world["base"]), "--probes", str(world["probes"]),
            "--out", str(out), "--batch-size", "1", "--no-progress"]
    labels = [f"c{i}={world['base' if i % 2 == 0 else 'other']}" for i in range(6)]
    for lab in labels:
        args += ["-c", lab]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint" / "records" / "0.json").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) <= 3, err
    done = json.loads((out / "zarr.json").read_text())["attributes"]["completed"]
    assert 1 <= len(done) < 6
    clean_exit(cli(*args[3:]))
    assert dl.open_store(out).sizes["checkpoint"] == 6
    assert dl.store.verify_store(out, "full") == ([], [])


# ------------------------------------------------------------------ issue 22: remote code, inputs, identity

def _remote_folder(base, dest, marker):
    """``base`` copied with an ``auto_map`` to a local configuration module that writes ``marker`` when imported
    (an unknown model_type, so transformers would need the folder's code -- and used to ask on stdin)."""
    remote = shutil.copytree(base, dest)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    cfg["model_type"] = "evilvlm"
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import LlavaConfig\n\n\nclass EvilConfig(LlavaConfig):\n    model_type = 'evilvlm'\n")
    return remote


@pytest.mark.parametrize("stdin", ["y", None])
def test_remote_code_never_runs_unasked(world, tmp_path, monkeypatch, stdin):
    """`echo y | driftlens capture m/remote ...` answered transformers' prompt and ran the folder's code;
    without stdin it was an internal error. Now: refused before any load, naming the folder and the flag."""
    marker = tmp_path / "PWNED"
    remote = _remote_folder(world["base"], tmp_path / "remote", marker)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))     # where transformers would copy the code
    out = tmp_path / "x.zarr"
    before = snapshot(remote)
    kw = {"input": "y\n"} if stdin else {"stdin": subprocess.DEVNULL}
    r = cli("capture", remote, "--probes", world["probes"], "-c", f"base={remote}", "--out", out, "--no-progress",
            **kw)
    refused(r, "data", str(remote), "--trust-remote-code", "auto_map")
    assert "[y/N]" not in r.stdout + r.stderr
    r = cli("capture", world["base"], "--probes", world["probes"], "-c", f"r={remote}", "--out", out,
            "--no-progress", **kw)                                    # as a checkpoint: refused before any capture
    refused(r, "data", str(remote), "--trust-remote-code")
    from driftlens.sources import SourceError

    with pytest.raises(SourceError, match="trust_remote_code=True"):
        dl.capture(remote, world["probes"], {"base": remote}, out=out, progress=False)
    assert not marker.exists() and not out.exists() and snapshot(remote) == before


def test_trust_remote_code_flag_is_honoured(world, tmp_path, monkeypatch):
    """With --trust-remote-code the folder's code is imported (the flag reaches transformers)."""
    marker = tmp_path / "RAN"
    remote = _remote_folder(world["base"], tmp_path / "remote", marker)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    r = cli("capture", remote, "--probes", world["probes"], "-c", f"base={remote}", "--out", tmp_path / "x.zarr",
            "--no-progress", "--trust-remote-code", stdin=subprocess.DEVNULL)
    assert marker.exists(), r.stderr
    refused(r, "data", "evilvlm")                 # no spec serves the custom model_type: still one clean line


def test_store_inside_a_model_folder_is_refused(world, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(world["other"], target_is_directory=True)
    before = snapshot(world["other"])
    for out in (world["base"] / "run.zarr", link / "run.zarr"):
        refused(_capture(world, "-c", f"base={world['base']}", "-c", f"o={world['other']}", out=out),
                "usage", str(out), "inside")
    assert not (world["base"] / "run.zarr").exists() and snapshot(world["other"]) == before


def test_store_in_memory_is_refused(world):
    """`--out memory://x.zarr` captured into RAM and exited 0: nothing survived."""
    refused(_capture(world, "-c", f"base={world['base']}", out="memory://x.zarr"), "usage", "memory://",
            "vanishes")


@pytest.fixture(scope="module")
def mismatched(world):
    """A 3-layer and a 64-px-image llava (other architectures than MODEL), an adapter trained on `other`
    (recorded as a local folder), and one trained on a wider model whose recorded base is a hub name."""
    from peft import LoraConfig, get_peft_model

    from driftlens.sources import load_model_dir

    root = world["root"]
    out = {"layers3": tiny.save("llava", root / "layers3", seed=2, n_layers=3),
           "image64": tiny.save("llava", root / "image64", seed=2, n_layers=2, vision_config={"image_size": 64})}
    wide = tiny.save("llava", root / "wide", seed=2, n_layers=2, hidden_size=96)
    for name, base in (("ad-other", world["other"]), ("ad-hub", wide)):
        torch.manual_seed(3)
        pm = get_peft_model(load_model_dir(base), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        pm.save_pretrained(str(root / name))
        out[name] = root / name
    cfg = json.loads((out["ad-hub"] / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-org/wide-vlm"
    (out["ad-hub"] / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("which, named", [("layers3", "num_hidden_layers 3 vs 2"),
                                          ("image64", "image_size 64 vs 32")])
def test_checkpoint_of_another_architecture_is_refused_before_any_load(world, mismatched, tmp_path, which, named):
    """MODEL's processor and spec read every checkpoint: a 3-layer checkpoint was captured silently."""
    out = tmp_path / "s.zarr"
    refused(_capture(world, "-c", f"base={world['base']}", "-c", f"x={mismatched[which]}", out=out), "data",
            str(mismatched[which]), str(world["base"]), named)
    assert not out.exists()


def test_adapter_trained_on_another_base_is_refused(world, mismatched, tmp_path):
    """An adapter whose adapter_config names another local base (other weights) was applied silently."""
    out = tmp_path / "s.zarr"
    refused(_capture(world, "-c", f"base={world['base']}", "-c", f"a={mismatched['ad-other']}", out=out), "data",
            str(mismatched["ad-other"]), str(world["other"]), str(world["base"]), "fingerprint")
    assert not out.exists()
    clean_exit(cli("capture", world["other"], "--probes", world["probes"], "-c", f"a={mismatched['ad-other']}",
                   "--out", out, "--batch-size", "2", "--no-progress"))    # on its own base it is captured


def test_adapter_of_other_shapes_is_one_line(world, mismatched, tmp_path):
    """PEFT's 24-line size-mismatch dump becomes one line naming the adapter and both bases."""
    r = _capture(world, "-c", f"a={mismatched['ad-hub']}", out=tmp_path / "s.zarr")
    err = refused(r, "data", str(mismatched["ad-hub"]), str(world["base"]), "some-org/wide-vlm", "differ in shape")
    assert "warning" in err and "not a folder here" in err         # the unverifiable base name was said first
    assert len([ln for ln in err.splitlines() if "size mismatch" in ln]) == 0


def _probes_with_prompt(world, dest, prompt):
    src = world["probes"].parent
    dest = shutil.copytree(src, dest)
    lines = (dest / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    obj = json.loads(lines[1])
    obj["prompt"] = prompt
    lines[1] = json.dumps(obj, ensure_ascii=False)
    (dest / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest / "manifest.jsonl", obj["id"]


@pytest.mark.parametrize("prompt", ["red circle " * 700, "x" * 200_000])
def test_prompt_longer_than_the_positions_is_refused_before_any_forward(world, tmp_path, prompt):
    """A 420-token prompt on a 256-position model was captured without a word; a 200k-character one drove
    capture to the OOM killer. The tiny llava has 1024 positions."""
    manifest, pid = _probes_with_prompt(world, tmp_path / "p", prompt)
    out = tmp_path / "s.zarr"
    r = cli("capture", world["base"], "--probes", manifest, "-c", f"base={world['base']}", "--out", out,
            "--no-progress", timeout=120)
    refused(r, "data", repr(pid), "1024 positions", "max_position_embeddings", f"{len(prompt)} characters")
    assert not out.exists()


def test_file_size_limit_during_capture_names_the_store_and_resumes(world, tmp_path):
    """`ulimit -f` while capture writes chunks: "File too large", no file named."""
    import resource

    out = tmp_path / "s.zarr"
    limit = 20 * 1024                                   # below one chunk file of the tiny model

    def small():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = cli("capture", world["base"], "--probes", world["probes"], "--out", out, "--batch-size", "2",
            "--no-progress", "-c", f"base={world['base']}", "-c", f"o={world['other']}", preexec_fn=small)
    refused(r, "environment", f"cannot write the store {out}", "file-size limit", "rerun")
    clean_exit(_capture(world, "-c", f"base={world['base']}", "-c", f"o={world['other']}", out=out))
    assert dl.store.verify_store(out, "full") == ([], [])
