"""Out-of-core drift: `driftlens drift` over a store larger than memory, with its peak resident memory.

    .venv/bin/python bench/out_of_core.py [--gb 20] [--store PATH] [--keep] [DRIFT OPTIONS ...]

Writes a synthetic activation store of ``--gb`` GiB (``bench/synthetic_store.py``: 6 checkpoints x
32 layers x d=2048 float16, the token count set by the size) under ``--workdir`` (default
``/tmp/dl-big``), or reuses ``--store PATH`` (written there first when it does not exist), then runs

    driftlens drift STORE --metrics paired_shift gap --out R.nc [DRIFT OPTIONS ...]

in a subprocess. Every option this script does not know goes to ``driftlens drift`` (e.g.
``--workers 2``, ``--verify fast``, ``--bootstrap 200``; see ``driftlens drift --help``); put
them after ``--`` when one clashes with ours.

Measured: wall time; peak resident memory of the whole process tree (``driftlens drift`` and its
descendants, e.g. dask workers), sampled every 0.2 s with psutil (summed RSS, and summed PSS, which
counts pages shared between processes once), the largest single process; the kernel's
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the largest RSS of any waited-for descendant); the
store's size on disk (``du``). Appends a markdown block to ``bench/results/out_of_core.md``
(machine, torch version, sizes, memory, time). The store is deleted afterwards when this script
wrote it, unless ``--keep``.

Target (issue): drift over a >= 20 GB store with peak RSS < 4 GB.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
GIB = 2**30
TARGET_RSS = 4 * 10**9


# ----------------------------------------------------------------------------- machine


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    try:
        import torch

        tv = torch.__version__
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:                       # pragma: no cover
        tv, gpu = "not installed", "?"
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError):
        mem = float("nan")
    return (f"{cpu_name()}, {os.cpu_count()} logical cores, {mem:.0f} GiB RAM, {gpu}; Linux "
            f"{platform.release()}; Python {platform.python_version()}, torch {tv}")


def git_line() -> str:
    def run(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = run("rev-parse", "--short", "HEAD") or "?"
    dirty = run("status", "--porcelain", "--untracked-files=no", "--", "driftlens")
    return f"{head}{' + uncommitted changes in driftlens/' if dirty else ''}"


def du_bytes(path) -> int:
    """Allocated bytes under ``path``, as ``du -s`` counts them."""
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.split():
        return int(out.stdout.split()[0])
    from synthetic_store import store_bytes

    return store_bytes(path)


# ----------------------------------------------------------------------------- memory of a process tree


def _proc_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return 0


def _proc_children(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


class TreeMonitor:
    """Samples the resident memory of a process and all its descendants every ``interval`` seconds.

    With psutil: summed RSS and summed PSS (proportional set size: shared pages split between the
    processes sharing them, so shared libraries of several workers are counted once); without:
    summed VmRSS from /proc.
    """

    def __init__(self, pid: int, interval: float = 0.2, pss_every: int = 5):
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self.peak_rss = self.peak_pss = self.peak_single = 0
        self.peak_rss_at = 0.0
        self.max_procs = 0
        self.samples: list[tuple[float, int, int, int]] = []    # (seconds, summed rss, summed pss or -1, procs)
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self.cpu: dict[int, float] = {}        # pid -> last seen user + system seconds (psutil only)
        self.busy0 = system_busy_seconds()
        self.busy = 0.0
        try:
            import psutil

            self._psutil = psutil
        except ImportError:
            self._psutil = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TreeMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.busy = system_busy_seconds() - self.busy0

    @property
    def tree_cpu(self) -> float:
        """CPU seconds the tree used (as last sampled; psutil only, else nan)."""
        return sum(self.cpu.values()) if self._psutil is not None else float("nan")

    def _tree(self):
        if self._psutil is None:
            pids, todo = [], [self.pid]
            while todo:
                p = todo.pop()
                pids.append(p)
                todo += _proc_children(p)
            return pids
        try:
            root = self._psutil.Process(self.pid)
            return [root] + root.children(recursive=True)
        except self._psutil.Error:
            return []

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            procs = self._tree()
            rss = pss = 0
            single = 0
            with_pss = self._psutil is not None and n % self.pss_every == 0
            for p in procs:
                if self._psutil is None:
                    r = _proc_rss(p) or 0
                else:
                    try:
                        ct = p.cpu_times()
                        self.cpu[p.pid] = ct.user + ct.system
                        if with_pss:
                            info = p.memory_full_info()
                            r, s = info.rss, getattr(info, "pss", info.rss)
                            pss += s
                        else:
                            r = p.memory_info().rss
                    except self._psutil.Error:
                        continue
                rss += r
                single = max(single, r)
            t = time.perf_counter() - self._t0
            if procs:
                self.samples.append((t, rss, pss if with_pss else -1, len(procs)))
            if rss > self.peak_rss:
                self.peak_rss, self.peak_rss_at = rss, t
            self.peak_pss = max(self.peak_pss, pss if with_pss else 0)
            self.peak_single = max(self.peak_single, single)
            self.max_procs = max(self.max_procs, len(procs))
            n += 1
            self._stop.wait(self.interval)


def system_busy_seconds() -> float:
    """CPU seconds every core of the machine has been busy since boot (/proc/stat; nan elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        v = [int(x) for x in fields]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def wait_idle(max_wait: float, threshold: float = 0.3, window: float = 5.0) -> float:
    """Wait (at most ``max_wait`` s) until the machine's busy cores over ``window`` s drop below ``threshold``.

    Returns the busy cores of the last window (other jobs on a shared machine skew timings).
    """
    t_end = time.perf_counter() + max_wait
    while True:
        b0 = system_busy_seconds()
        time.sleep(window)
        busy = (system_busy_seconds() - b0) / window
        if busy < threshold or time.perf_counter() >= t_end:
            return busy
        print(f"waiting for an idle machine ({busy:.2f} cores busy)", flush=True)


def run_measured(cmd: list[str], log: Path | None = None, interval: float = 0.2, env=None) -> dict:
    """Run ``cmd``; its wall time, exit code, peak memory of its process tree and the tail of its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        mon = TreeMonitor(proc.pid, interval).start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        mon.stop()
    finally:
        if log:
            out.close()
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024     # KiB on Linux
    tail = ""
    if log:
        text = log.read_text(errors="replace").replace("\r", "\n")
        tail = "\n".join([ln for ln in text.splitlines() if ln.strip()][-40:])
    others = max(0.0, mon.busy - mon.tree_cpu)
    return {"rc": rc, "wall": wall, "tree_cpu": mon.tree_cpu, "others_cpu": others,
            "others_cores": others / wall if wall > 0 else float("nan"),
            "peak_rss": mon.peak_rss, "peak_rss_at": mon.peak_rss_at,
            "peak_pss": mon.peak_pss, "peak_single": mon.peak_single, "max_procs": mon.max_procs,
            "ru_maxrss": maxrss, "ru_maxrss_before": before * 1024, "samples": mon.samples, "tail": tail}


def driftlens_cmd() -> list[str]:
    """The CLI of this environment: the venv's entry point, else ``python -c 'driftlens.cli.main()'``."""
    exe = Path(sys.executable).parent / "driftlens"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from driftlens.cli import main; sys.exit(main())"]


def append_block(path: Path, title: str, text: str) -> None:
    """Append a markdown block to ``path`` (a new file starts with ``# title``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        if fh.tell() == 0:
            fh.write(f"# {title}\n\nOne block per run, newest last.\n\n")
        fh.write(text + "\n")


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB ({n / GIB:.2f} GiB)"


def write_timeline(samples, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.write("seconds,rss_bytes,pss_bytes,processes\n")
        for t, rss, pss, n in samples:
            fh.write(f"{t:.2f},{rss},{pss},{n}\n")


def rss_profile(samples, wall: float, parts: int = 10) -> str:
    """Peak summed RSS in each tenth of the run (where memory went, over time)."""
    if not samples:
        return ""
    peaks = [0] * parts
    for t, rss, _, _ in samples:
        k = min(parts - 1, int(t / max(wall, 1e-9) * parts))
        peaks[k] = max(peaks[k], rss)
    return " / ".join(f"{p / 1e9:.2f}" for p in peaks)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=20.0, help="store size in GiB (default: %(default)s)")
    ap.add_argument("--store", type=Path, default=None,
                    help="use this store (written here first when it does not exist); kept afterwards")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dl-big"),
                    help="where the store and report go (default: %(default)s)")
    ap.add_argument("--checkpoints", type=int, default=6)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--tokens-per-cluster", type=int, default=128)
    ap.add_argument("--final", action="store_true", help="the store also has the `final` site")
    ap.add_argument("--metrics", nargs="+", default=["paired_shift", "gap"])
    ap.add_argument("--keep", action="store_true", help="keep the store this script wrote")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "out_of_core.md",
                    help="markdown file the block is appended to (default: %(default)s)")
    ap.add_argument("--timeline", type=Path, default=None,
                    help="CSV of the RSS samples (default: WORKDIR/rss_timeline.csv)")
    ap.add_argument("--note", default="", help="a line added to the markdown block")
    ap.add_argument("--wait-idle", type=float, default=600.0,
                    help="before the drift run, wait up to this many seconds for other jobs to leave the CPU")
    args, extra = ap.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]

    from synthetic_store import plan, write_synthetic_store

    args.workdir.mkdir(parents=True, exist_ok=True)
    store = args.store or args.workdir / "store.zarr"
    wrote = False
    write_s = None
    sites = ("hidden", "final") if args.final else ("hidden",)
    if not (store / "zarr.json").exists():
        shape = plan(args.gb, args.checkpoints, args.layers, args.dim, None, args.tokens_per_cluster, "float16", sites)
        need = shape["bytes"] * 1.02 + 2 * GIB
        free = shutil.disk_usage(store.parent if store.parent.exists() else args.workdir).free
        if free < need:
            print(f"not enough disk under {store.parent}: {free / GIB:.1f} GiB free, {need / GIB:.1f} GiB needed",
                  file=sys.stderr)
            return 4
        print(f"writing {store}: {args.checkpoints} checkpoints x {args.layers} layers x {shape['n_tokens']} tokens "
              f"x d={args.dim} float16 ({shape['bytes'] / GIB:.2f} GiB)", flush=True)
        t = time.perf_counter()
        write_synthetic_store(store, args.gb, args.checkpoints, args.layers, args.dim, None,
                              args.tokens_per_cluster, "float16", sites)
        write_s = time.perf_counter() - t
        wrote = args.store is None
        print(f"written in {write_s:.0f} s", flush=True)
    size = du_bytes(store)

    import json

    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    hidden = json.loads((store / "hidden" / "zarr.json").read_text())
    C, L, T, d = hidden["shape"]
    dtype = hidden["data_type"]
    report = args.workdir / "R.nc"
    report.unlink(missing_ok=True)
    cmd = driftlens_cmd() + ["drift", str(store), "--metrics", *args.metrics, "--out", str(report)] + extra
    if "--debug" not in cmd:
        cmd.append("--debug")                          # a traceback, not one line, when drift fails
    log = args.workdir / "drift.log"
    if args.wait_idle > 0:
        wait_idle(args.wait_idle)
    print("running:", " ".join(cmd), flush=True)
    m = run_measured(cmd, log)
    timeline = args.timeline or args.workdir / "rss_timeline.csv"
    write_timeline(m["samples"], timeline)
    ok = m["rc"] == 0 and report.exists()
    n_cells = (C - 1) * L * 2                          # non-reference (checkpoint, layer, modality) cells of one site

    lines = [
        f"### out-of-core drift, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {machine_line()}; driftlens {git_line()}",
        f"- store: synthetic (`bench/synthetic_store.py`), {C} checkpoints x {L} layers x {T} tokens "
        f"({len(set(attrs.get('layers', [])))} layers captured, sites {attrs.get('sites')}) x d={d} {dtype}; "
        f"on disk (du) **{fmt_bytes(size)}**; one (checkpoint, layer) block {T * d * 2 / 2**20:.0f} MiB "
        f"({T * d * 4 / 2**20:.0f} MiB as float32)"
        + (f"; written in {write_s:.0f} s ({size / write_s / 2**20:.0f} MiB/s)" if write_s else ""),
        f"- command: `driftlens drift STORE --metrics {' '.join(args.metrics)} --out R.nc"
        + (f" {' '.join(extra)}" if extra else "") + "` (+ `--debug`)",
        f"- result: {'ok' if ok else '**FAILED** (exit ' + str(m['rc']) + ')'}; wall **{m['wall']:.0f} s**"
        + (f" ({n_cells / m['wall']:.2f} non-reference cells/s of site hidden, "
           f"{size / m['wall'] / 2**20:.0f} MiB of store per second)" if ok else ""),
        f"- peak resident memory of the process tree (psutil, every 0.2 s): **{fmt_bytes(m['peak_rss'])}** summed "
        f"RSS at {m['peak_rss_at']:.0f} s"
        + (f", {fmt_bytes(m['peak_pss'])} summed PSS" if m["peak_pss"] else "")
        + f"; largest single process {fmt_bytes(m['peak_single'])}; up to {m['max_procs']} processes; "
          f"getrusage(RUSAGE_CHILDREN).ru_maxrss {fmt_bytes(m['ru_maxrss'])}",
        f"- summed RSS by tenth of the run (GB): {rss_profile(m['samples'], m['wall'])}",
        f"- CPU: the tree used {m['tree_cpu']:.0f} CPU-s ({m['tree_cpu'] / m['wall']:.2f} cores on average); other "
        f"processes on the machine used {m['others_cores']:.2f} cores on average during the run",
        "- target peak RSS < 4 GB over a >= 20 GB store: "
        + ("**met**" if ok and size >= 20e9 and m["peak_rss"] < TARGET_RSS else
           "**not met**" if size >= 20e9 else f"(store below 20 GB: {fmt_bytes(size)})"),
    ]
    if args.note:
        lines.append(f"- note: {args.note}")
    if not ok:
        lines += ["", "```", m["tail"], "```"]
    lines.append("")
    text = "\n".join(lines)
    print("\n" + text)
    if not ok:
        print(f"drift output: {log}", file=sys.stderr)
    append_block(args.results, "Out-of-core drift (`bench/out_of_core.py`)", text)
    if wrote and not args.keep:
        shutil.rmtree(store, ignore_errors=True)
        print(f"removed {store}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
