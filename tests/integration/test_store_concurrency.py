"""Two `driftlens capture` processes writing one store at once (tiny saved models, subprocesses).

The issue's reproduction: two captures adding different labels to one store both exited 0 and one
checkpoint lost its completion marker (3 of 3 runs); two captures creating the same new store at
once, the loser was refused with "is a zarr group but not a driftlens store". The store-level race
is tested deterministically, many times, in ``tests/unit/test_store_faults.py``; this is the same
through the command line. Also: a completed checkpoint whose record went missing is refused at the
next capture.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

import driftlens as dl
from driftlens.testing import tiny

from ..badinput import clean_exit, cli, refused
from .test_capture import subset


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrent")
    return {"root": root, "base": tiny.save("llava", root / "base", seed=0, n_layers=2),
            "other": tiny.save("llava", root / "other", seed=1, n_layers=2),
            "probes": subset("shapes-bilingual", 4, root / "probes").manifest}


def _start(m, out, label, source) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "driftlens.cli", "capture", str(m["base"]), "--probes",
                             str(m["probes"]), "--out", str(out), "--batch-size", "2", "--no-progress",
                             "-c", f"{label}={source}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("existing", [False, True], ids=["new store", "existing store"])
def test_two_captures_of_different_labels_into_one_store_both_complete(models, tmp_path, existing):
    out = tmp_path / "s.zarr"
    if existing:
        _start(models, out, "base", models["base"]).communicate(timeout=600)
    procs = [_start(models, out, "a", models["base"]), _start(models, out, "b", models["other"])]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    for _, err, code in results:
        assert code == 0 and "Traceback" not in err, err[-3000:]
    ds = dl.open_store(out, verify="full")
    assert sorted(ds.checkpoint.values.tolist()) == sorted((["base"] if existing else []) + ["a", "b"])
    assert dl.store.verify_store(out, "full") == ([], [])


def test_a_completed_checkpoint_whose_record_is_missing_is_not_kept_silently(models, tmp_path):
    """Before: a completed label without a record was kept as 'captured before records' (a warning);
    in a store made with records it is damage: refused, and --overwrite captures it again."""
    out = tmp_path / "s.zarr"
    args = ["capture", models["base"], "--probes", models["probes"], "--out", out, "--batch-size", "2",
            "--no-progress", "-c", f"base={models['base']}"]
    clean_exit(cli(*args))
    (out / "checkpoint" / "records" / "0.json").unlink()
    refused(cli(*args), "data", "'base'", "0.json", "--overwrite base")
    clean_exit(cli(*args, "--overwrite", "base"))
    assert dl.store.verify_store(out, "full") == ([], [])
