#!/usr/bin/env python3
"""Bootstrap driftlens on a machine that has only Python, then run a job.

    python3 dev.py demo [driftlens demo options]   # the main job
    python3 dev.py test [pytest options]           # the whole test suite

Both create (or reuse) a virtual environment in ``.venv`` next to this file and
install what they need into it:

1. ``torch==2.13.0`` first. The package itself only asks for ``torch>=2.4``;
   pinning here makes pip take the local CPU wheel on a CPU machine (and the
   CUDA wheel on a GPU machine) instead of resolving the newest CUDA build.
2. ``driftlens`` in editable mode, with the ``test`` extras for ``test``.
3. For ``test`` only: alibi-detect, the reference implementation the MMD tests
   compare against. It pins ``transformers<5`` and ``numpy<2`` in its metadata
   but its PyTorch MMD code runs fine on current versions, so it is installed
   with ``--no-deps`` (its runtime needs -- numba, catalogue, dill, toml -- are
   installed explicitly).

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
REFERENCE_NODEPS = ["alibi-detect==0.13.0", "catalogue", "dill", "toml"]
TEST_COMMAND = ["-m", "pytest", "tests", "notebooks", "--nbmake", "-p", "no:cacheprovider", "-q"]


def _run(cmd: list[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def _stamp(extras: str) -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "dev.py"):
        h.update((ROOT / name).read_bytes())
    h.update(extras.encode())
    return h.hexdigest()


def ensure_env(test: bool) -> None:
    extras = "test" if test else "run"
    stamp_file = VENV / f".driftlens-{extras}.stamp"
    stamp = _stamp(extras)
    # a test environment is a superset of the run environment
    for kind in ("test",) if test else ("test", "run"):
        done = VENV / f".driftlens-{kind}.stamp"
        if done.exists() and done.read_text() == _stamp(kind):
            return
    if not PY.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check"]
    _run(pip + [TORCH_PIN])
    _run(pip + ["-e", f"{ROOT}[test]" if test else str(ROOT)])
    if test:
        _run(pip + ["--no-deps"] + REFERENCE_NODEPS)
    stamp_file.write_text(stamp)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    job, rest = argv[0], argv[1:]
    ensure_env(test=job in ("test", "setup"))
    if job == "setup":
        return 0
    if job == "demo":
        cmd = [str(BIN / "driftlens"), "demo", *rest]
    else:
        cmd = [str(PY), *TEST_COMMAND, *rest]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
