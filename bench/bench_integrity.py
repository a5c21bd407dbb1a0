"""The cost of store integrity: records at capture, checks on open, full checks before drift (by hand).

    .venv/bin/python bench/bench_integrity.py STORE [STORE ...] [--repeats 5]

STORE is an activation store written by this version of driftlens, e.g.
``driftlens-demo/seed-0/activations.zarr`` from ``driftlens demo``. Measured per store, best of
``--repeats`` (the page cache is warm after the first read, as it is when ``drift`` follows a
capture or an open):

- ``record``: writing one completed checkpoint's record (stat + CRC32 of each of its chunk files)
  -- the cost a capture pays per checkpoint;
- ``store record``: writing the store record a new store gets at creation (identity attributes,
  array metadata, CRC32 of the coordinate chunks; versions with it only);
- ``open none`` / ``open fast``: :func:`driftlens.open_store` without a check and with the default
  check (the store record's small files and a stat per chunk of every completed checkpoint);
- ``verify fast`` / ``verify full``: :func:`driftlens.store.verify_store` alone; ``full`` adds every
  chunk's CRC32 (what ``drift`` and ``driftlens check`` do first);
- ``read all``: reading every completed checkpoint's values through xarray, the floor of what
  ``drift`` reads anyway.

Prints a markdown table for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
from bench_capture import best  # noqa: E402 - the sibling script (bench/ is on sys.path when run)

import driftlens.store as S
from driftlens.store import checkpoint_chunks, open_store, verify_store, write_record


def read_all(path: Path) -> None:
    ds = open_store(path, verify="none")
    for v in ds.data_vars:
        np.asarray(ds[v].values).sum()


def measure(path: Path, repeats: int) -> dict:
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    sites, done = attrs["sites"], attrs["completed"]
    files = [path / rel for s in sites for i in range(len(done)) for rel, _, _ in checkpoint_chunks(path, s, i)]
    nbytes = sum(f.stat().st_size for f in files)
    scratch = Path(tempfile.mkdtemp())
    copy = shutil.copytree(path, scratch / "s.zarr")        # write_record rewrites a record: use a copy
    rec = json.loads((copy / "checkpoint" / "records" / "0.json").read_text())
    out = {
        "store": str(path), "checkpoints": len(done), "chunks": len(files), "MB": nbytes / 2**20,
        "record": best(lambda: write_record(copy, rec["label"], 0, sites, rec.get("identity")), repeats),
        "store record": (best(lambda: S.write_store_record(copy, attrs), repeats)
                         if hasattr(S, "write_store_record") else float("nan")),
        "open none": best(lambda: open_store(path, verify="none"), repeats),
        "open fast": best(lambda: open_store(path, verify="fast"), repeats),
        "verify fast": best(lambda: verify_store(path, "fast"), repeats),
        "verify full": best(lambda: verify_store(path, "full"), repeats),
        "read all": best(lambda: read_all(path), repeats),
    }
    shutil.rmtree(scratch)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| store | checkpoints | chunks | MB | record (1 ckpt) | store record | open, no check | open, fast check | "
          "fast verify | full verify (CRC32) | read every value |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in args.stores:
        m = measure(path, args.repeats)
        print(f"| {path.parent.name}/{path.name} | {m['checkpoints']} | {m['chunks']} | {m['MB']:.1f} | "
              f"{m['record'] * 1e3:.1f} ms | {m['store record'] * 1e3:.1f} ms | {m['open none'] * 1e3:.0f} ms | "
              f"{m['open fast'] * 1e3:.0f} ms | {m['verify fast'] * 1e3:.1f} ms | {m['verify full'] * 1e3:.0f} ms | "
              f"{m['read all'] * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
