"""Compare two drift reports (netCDF) exactly: every variable, coordinate and attribute, to the byte.

    python bench/compare_reports.py A.nc B.nc
    python bench/compare_reports.py DEMO_A DEMO_B     # two `driftlens demo` output folders

For two demo folders: ``summary.json`` and ``ranks.json`` (equal as JSON, leaving out the timings
under ``seconds`` and reading paths by their file names, as the folders and caches differ), every
``seed-*/drift.nc`` as above (its ``store_path`` attribute read the same way), and every figure
under ``figures/`` byte for byte.

Exit status 0 when identical; 1 naming the first differing variable or attribute (values are
compared as bytes, so a one-ulp change, a NaN payload or a signed zero counts); 2 on bad usage.
``xarray.testing.assert_identical`` is run as well (names, dims, coords, attrs, encoding-free values).
"""
from __future__ import annotations

import sys


def first_difference(a, b) -> str | None:
    """A description of the first difference between Datasets ``a`` and ``b``, or None when identical."""
    import numpy as np

    if sorted(a.attrs) != sorted(b.attrs):
        return f"attrs: keys {sorted(set(a.attrs) ^ set(b.attrs))} are in one report only"
    for k in sorted(a.attrs):
        va, vb = np.asarray(a.attrs[k]), np.asarray(b.attrs[k])
        if va.dtype != vb.dtype or va.shape != vb.shape or va.tobytes() != vb.tobytes():
            return f"attr {k!r}: {a.attrs[k]!r} != {b.attrs[k]!r}"
    names_a = sorted(map(str, a.variables))
    names_b = sorted(map(str, b.variables))
    if names_a != names_b:
        return f"variables {sorted(set(names_a) ^ set(names_b))} are in one report only"
    for name in names_a:
        x, y = a.variables[name], b.variables[name]
        if x.dims != y.dims:
            return f"variable {name!r}: dims {x.dims} != {y.dims}"
        vx, vy = np.asarray(x.values), np.asarray(y.values)
        if vx.dtype != vy.dtype or vx.shape != vy.shape:
            return f"variable {name!r}: dtype/shape {vx.dtype}{vx.shape} != {vy.dtype}{vy.shape}"
        same = vx.tobytes() == vy.tobytes() if vx.dtype != object else list(vx.ravel()) == list(vy.ravel())
        if not same:
            if vx.dtype.kind == "f":
                bad = ~((vx == vy) | (np.isnan(vx) & np.isnan(vy)))
                return (f"variable {name!r}: {int(bad.sum())} value(s) differ (max |diff| "
                        f"{float(np.nanmax(np.abs(vx - vy))) if bad.any() else 0.0:.3g}; or bytes of NaN/zero)")
            return f"variable {name!r}: values differ"
        if sorted(x.attrs) != sorted(y.attrs) or any(
                np.asarray(x.attrs[k]).tobytes() != np.asarray(y.attrs[k]).tobytes() for k in x.attrs):
            keys = [k for k in sorted(set(x.attrs) | set(y.attrs))
                    if k not in x.attrs or k not in y.attrs
                    or np.asarray(x.attrs[k]).tobytes() != np.asarray(y.attrs[k]).tobytes()]
            return f"variable {name!r}: attribute(s) {keys} differ"
    return None


def _tail(value):
    """A path (or a ``", "``-joined list of paths) by its file names: the folders differ between runs."""
    if isinstance(value, str) and "/" in value:
        return ", ".join(part.rstrip("/").rsplit("/", 1)[-1] for part in value.split(", "))
    return value


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return _tail(x)


def _json(path) -> object:
    import json

    return _plain(json.loads(path.read_text()))


def demo_differences(a, b) -> list[str]:
    """Every difference between two demo output folders (see the module docstring)."""
    from pathlib import Path

    import xarray as xr

    a, b = Path(a), Path(b)
    out = []
    for name in ("summary.json", "ranks.json"):
        if _json(a / name) != _json(b / name):
            out.append(f"{name} differs")
    reports = sorted(p.relative_to(a) for p in a.glob("seed-*/drift.nc"))
    if reports != sorted(p.relative_to(b) for p in b.glob("seed-*/drift.nc")):
        out.append("the folders hold different seed reports")
    for rel in reports:
        with xr.open_dataset(a / rel) as x, xr.open_dataset(b / rel) as y:
            x, y = x.load(), y.load()
            for r in (x, y):
                r.attrs["store_path"] = _tail(r.attrs.get("store_path", ""))
            diff = first_difference(x, y)
        if diff:
            out.append(f"{rel}: {diff}")
    figures = sorted(p.relative_to(a) for p in (a / "figures").glob("*"))
    for rel in figures:
        if not (b / rel).exists() or (a / rel).read_bytes() != (b / rel).read_bytes():
            out.append(f"{rel} differs")
    return out


def main(argv=None) -> int:
    """Compare the two reports named in ``argv``; print the verdict, return the exit status."""
    import xarray as xr

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    from pathlib import Path

    if Path(args[0]).is_dir() and Path(args[1]).is_dir():
        found = demo_differences(*args)
        print("\n".join(found) if found else f"identical: {args[0]} == {args[1]} (summary, ranks, reports, figures)")
        return 1 if found else 0
    with xr.open_dataset(args[0]) as a, xr.open_dataset(args[1]) as b:
        a, b = a.load(), b.load()
        diff = first_difference(a, b)
        if diff is None:
            try:
                xr.testing.assert_identical(a, b)
            except AssertionError as exc:
                diff = f"xarray.testing.assert_identical: {str(exc).splitlines()[0]}"
    if diff is not None:
        print(f"{args[0]} != {args[1]}: {diff}")
        return 1
    print(f"identical: {args[0]} == {args[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
