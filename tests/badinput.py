"""Helpers of the bad-input suites: run the CLI in a subprocess and check what a user sees."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

EXIT = {"ok": 0, "internal": 1, "usage": 2, "data": 3, "environment": 4, "interrupted": 130}


def cli(*args, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """``driftlens ARGS`` in a fresh interpreter (what a user's shell runs)."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-m", "driftlens.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, **popen)


def refused(result: subprocess.CompletedProcess, kind: str, *named: str) -> str:
    """Assert a clean refusal: the exit code of ``kind``, no traceback, every ``named`` string in the
    error message (the file, flag or value at fault); returns stderr."""
    err = result.stderr
    assert result.returncode == EXIT[kind], (result.returncode, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1, err
    assert errors[0].startswith("driftlens"), err
    for s in named:
        assert s in err, (s, err)
    return err


def clean_exit(result: subprocess.CompletedProcess) -> str:
    """Assert exit 0 and no traceback; returns stderr."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) -> sha256 of its bytes."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path) if f != path else f.name): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in files}
