#!/usr/bin/env python3
"""Bootstrap driftlens on a machine that has only Python, then run a job.

    python3 dev.py demo [driftlens demo options]   # the main job
    python3 dev.py test [pytest options]           # the whole test suite (what CI runs)
    python3 dev.py test --fast                     # the edit-loop tier: lint + fast unit tests (< 2 min)
    python3 dev.py setup                           # the environment only (tests + notebooks: jupyterlab)

Each creates (or reuses) a virtual environment in ``.venv`` next to this file and
installs what its job needs into it:

1. ``torch==2.13.0`` first. The package itself only asks for ``torch>=2.4``;
   pinning here makes pip take the local CPU wheel on a CPU machine (and the
   CUDA wheel on a GPU machine) instead of resolving the newest CUDA build.
2. this checkout in editable mode -- the distribution ``driftlens-vlm``, import package
   ``driftlens`` (the name ``driftlens`` on the package index is an unrelated project): plain
   for ``demo``, with the ``test`` extra for ``test``, with ``test`` and ``notebooks``
   (jupyterlab) for ``setup``. A ``driftlens`` distribution already in ``.venv`` (this project
   before its rename, or the unrelated one: both install the import package ``driftlens``) is
   uninstalled first.
3. For ``test``: alibi-detect, the reference implementation the MMD tests
   compare against. It pins ``transformers<5`` and ``numpy<2`` in its metadata
   but its PyTorch MMD code runs fine on current versions, so it is installed
   with ``--no-deps`` (its runtime needs -- numba, catalogue, dill, toml -- are
   installed explicitly).

``test`` runs, in order: ``ruff check`` (lint and numpy docstrings), ``lint-imports``
(the layering contracts in pyproject.toml), then pytest over tests/ and the
notebooks. ``--fast`` runs the lint steps and ``tests/unit -m "not heavy"``.

The install is skipped when ``pyproject.toml`` and this file have not changed
since the last successful install (a stamp file in ``.venv``).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")

TORCH_PIN = "torch==2.13.0"
OLD_DISTRIBUTION = "driftlens"            # the name before the rename; on the index, an unrelated project
REFERENCE_NODEPS = ["alibi-detect==0.13.0", "catalogue", "dill", "toml"]
TEST_COMMAND = ["-m", "pytest", "tests", "notebooks", "--nbmake", "-p", "no:cacheprovider", "-q", "--durations=20"]
FAST_COMMAND = ["-m", "pytest", "tests/unit", "-m", "not heavy", "-p", "no:cacheprovider", "-q"]
EXTRAS = {"run": "", "test": "[test]", "setup": "[test,notebooks]"}


def _run(cmd: list[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def _stamp(extras: str) -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "dev.py"):
        h.update((ROOT / name).read_bytes())
    h.update(extras.encode())
    return h.hexdigest()


def ensure_env(kind: str) -> None:
    """Install what job ``kind`` ("run", "test" or "setup") needs, unless already done."""
    covers = {"run": ("setup", "test", "run"), "test": ("setup", "test"), "setup": ("setup",)}[kind]
    for done in covers:                   # a bigger environment serves a smaller job
        stamp_file = VENV / f".driftlens-{done}.stamp"
        if stamp_file.exists() and stamp_file.read_text() == _stamp(done):
            return
    if not PY.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check"]
    _run(pip + [TORCH_PIN])
    if subprocess.run([str(PY), "-m", "pip", "show", "-q", OLD_DISTRIBUTION], capture_output=True).returncode == 0:
        _run([PY, "-m", "pip", "uninstall", "-y", OLD_DISTRIBUTION])   # it would shadow the import package
    _run(pip + ["-e", f"{ROOT}{EXTRAS[kind]}"])
    if kind != "run":
        _run(pip + ["--no-deps"] + REFERENCE_NODEPS)
    (VENV / f".driftlens-{kind}.stamp").write_text(_stamp(kind))


def run_tests(rest: list[str]) -> int:
    """Lint, import contracts, then pytest (``--fast``: the fast unit tier)."""
    fast = "--fast" in rest
    rest = [a for a in rest if a != "--fast"]
    for full in ([str(PY), "-m", "ruff", "check", "."], [str(BIN / "lint-imports")]):
        print("+", " ".join(full), flush=True)
        code = subprocess.call(full, cwd=ROOT)
        if code:
            return code
    cmd = [str(PY), *(FAST_COMMAND if fast else TEST_COMMAND), *rest]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    job, rest = argv[0], argv[1:]
    ensure_env({"demo": "run", "test": "test", "setup": "setup"}[job])
    if job == "setup":
        return 0
    if job == "test":
        return run_tests(rest)
    cmd = [str(BIN / "driftlens"), "demo", *rest]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
