"""Hugging Face Hub ids as checkpoint sources, offline, against a hub cache the test writes itself.

The cache has the hub's layout (``models--ORG--NAME/blobs``, ``snapshots/COMMIT/...`` symlinks to the
blobs, ``refs/main``), so ``huggingface_hub.snapshot_download(..., local_files_only=True)`` finds it
exactly as it finds a model that ``hf download`` put there. No network is touched: ``HF_HUB_OFFLINE``
is set and the cache lives in the test's temporary folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import driftlens as dl
from driftlens.sources import SourceError, hub_id, resolve_source
from driftlens.store import read_record
from driftlens.testing import tiny
from tests.integration.test_capture import subset

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def write_hub_repo(cache: Path, repo: str, folder: Path, commit: str, refs: dict[str, str]) -> Path:
    """Put ``folder``'s files into ``cache`` as the hub would: blobs by sha256, snapshot symlinks, refs."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    for ref, sha in refs.items():
        (root / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    base = tiny.save("llava", root / "src-base", seed=0, n_layers=2)
    other = tiny.save("llava", root / "src-other", seed=1, n_layers=2)
    cache = root / "cache"
    snap_a = write_hub_repo(cache, "tiny-org/tiny-llava", base, COMMIT_A, {"main": COMMIT_A})
    snap_b = write_hub_repo(cache, "tiny-org/tiny-llava", other, COMMIT_B, {"v2": COMMIT_B})
    probes = subset("shapes-bilingual", 4, root / "probes")
    return {"root": root, "cache": cache, "snap_a": snap_a, "snap_b": snap_b, "probes": probes, "base": base}


@pytest.fixture
def offline(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def test_a_hub_id_resolves_to_its_snapshot_and_a_pin_to_its_revision(offline, tmp_path, monkeypatch):
    assert resolve_source("tiny-org/tiny-llava") == offline["snap_a"]
    assert resolve_source("tiny-org/tiny-llava@v2") == offline["snap_b"]
    assert resolve_source(f"tiny-org/tiny-llava@{COMMIT_B}") == offline["snap_b"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org" / "tiny-llava").mkdir(parents=True)       # a folder of that name here wins
    assert hub_id("tiny-org/tiny-llava") is None
    assert resolve_source("tiny-org/tiny-llava") == "tiny-org/tiny-llava"
    assert hub_id("a/b/c") is None and hub_id("../x") is None and hub_id("/abs/path") is None


def test_capture_from_hub_ids_records_repository_revision_and_commit(offline, tmp_path):
    out = dl.capture("tiny-org/tiny-llava", offline["probes"],
                     {"base": "tiny-org/tiny-llava", "v2": "tiny-org/tiny-llava@v2"},
                     out=tmp_path / "s.zarr", batch_size=4, progress=False)
    ds = dl.open_store(out)
    assert list(ds.checkpoint.values.astype(str)) == ["base", "v2"]
    base, v2 = (read_record(out, i)["identity"] for i in (0, 1))
    assert base["hub"] == {"repo_id": "tiny-org/tiny-llava", "revision": "main", "commit": COMMIT_A}
    assert v2["hub"] == {"repo_id": "tiny-org/tiny-llava", "revision": "v2", "commit": COMMIT_B}
    assert base["source"] == str(offline["snap_a"].resolve()) and base["fingerprint"] != v2["fingerprint"]
    # the same weights from a plain folder: the same fingerprint (a resume with the folder passes)
    dl.capture(offline["base"], offline["probes"], {"base": offline["base"]}, out=out, batch_size=4, progress=False)


def test_a_missing_model_is_one_line_naming_how_to_get_it(offline, tmp_path):
    with pytest.raises(SourceError) as err:
        dl.capture("tiny-org/absent-model", offline["probes"], out=tmp_path / "s.zarr", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "hf download tiny-org/absent-model" in msg and "HF_HOME" in msg
    assert "HF_HUB_OFFLINE" in msg and str(offline["cache"]) in msg
    with pytest.raises(SourceError, match="no revision|not .* in the Hugging Face cache"):
        resolve_source("tiny-org/tiny-llava@nope")
    assert not (tmp_path / "s.zarr").exists()


def test_a_hub_folder_with_its_own_code_or_only_pickles_is_refused(offline, tmp_path):
    src = tmp_path / "coded"
    tiny.save("llava", src, seed=0, n_layers=2)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_x.XConfig"}
    (src / "config.json").write_text(json.dumps(cfg))
    write_hub_repo(offline["cache"], "tiny-org/coded", src, "c" * 40, {"main": "c" * 40})
    with pytest.raises(SourceError, match="ships its own Python code.*--trust-remote-code"):
        dl.capture("tiny-org/coded", offline["probes"], out=tmp_path / "s.zarr", progress=False)


def test_an_adapter_whose_base_is_a_hub_id_in_the_cache_is_checked_against_model(offline, tmp_path):
    from peft import LoraConfig, get_peft_model

    from driftlens.errors import CheckpointIdentityError

    model, _ = tiny.build("llava", seed=1, n_layers=2)                   # the weights of revision v2
    cfg = LoraConfig(r=2, target_modules=["k_proj"], base_model_name_or_path="tiny-org/tiny-llava@v2")
    adapter = tmp_path / "adapter"
    get_peft_model(model, cfg).save_pretrained(str(adapter))
    body = json.loads((adapter / "adapter_config.json").read_text())
    body["base_model_name_or_path"] = "tiny-org/tiny-llava@v2"
    (adapter / "adapter_config.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointIdentityError, match="trained on tiny-org/tiny-llava@v2"):
        dl.capture("tiny-org/tiny-llava", offline["probes"], {"lora": adapter}, out=tmp_path / "a.zarr",
                   progress=False)
    out = dl.capture("tiny-org/tiny-llava@v2", offline["probes"], {"lora": adapter}, out=tmp_path / "b.zarr",
                     batch_size=4, progress=False)
    ident = read_record(out, 0)["identity"]
    assert ident["base_hub"] == {"repo_id": "tiny-org/tiny-llava", "commit": COMMIT_B}


def test_cli_capture_takes_a_hub_id_and_a_missing_one_is_one_line(offline, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(offline["cache"])}
    manifest = str(offline["probes"].manifest)
    ok = subprocess.run([sys.executable, "-m", "driftlens.cli", "capture", "tiny-org/tiny-llava", "--probes", manifest,
                         "-c", "base=tiny-org/tiny-llava", "-c", "v2=tiny-org/tiny-llava@v2", "--out",
                         str(tmp_path / "s.zarr"), "--no-progress"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "driftlens.cli", "capture", "tiny-org/absent", "--probes", manifest,
                          "--out", str(tmp_path / "t.zarr"), "--no-progress"], capture_output=True, text=True, env=env)
    assert bad.returncode == 3
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf download tiny-org/absent" in lines[0], bad.stderr
