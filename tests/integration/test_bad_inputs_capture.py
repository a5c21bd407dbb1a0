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
