"""driftlens command line: capture, drift, check, ranks, plot, report, organism, demo, experiment.

Each subcommand is a thin wrapper over the Python function of the same name; see
``driftlens <command> --help``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from driftlens.errors import UsageError


def _checkpoint_arg(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH (or LABEL=org/name[@REVISION]), got {text!r}")
    return label, path


def _number(convert, ok, what: str):
    """An argparse type: ``convert(text)`` that must satisfy ``ok``; ``what`` names the accepted values."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what                    # argparse names the type in its messages
    return parse


_count = _number(int, lambda v: v >= 1, "an integer >= 1")
_nonneg = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive = _number(float, lambda v: 0 < v < float("inf"), "a finite number > 0")
_fraction = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")
_share = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _trajectory(pairs: list[tuple[str, str]]) -> dict[str, str] | None:
    """``-c LABEL=PATH`` pairs as an ordered mapping; a label given twice is refused."""
    seen: dict[str, str] = {}
    for label, path in pairs:
        if label in seen:
            raise UsageError(f"-c {label}=...: label {label!r} is given twice ({seen[label]} and {path}); "
                             f"each checkpoint needs its own label")
        seen[label] = path
    return seen or None


def _add_capture(sub) -> None:
    p = sub.add_parser(
        "capture",
        help="capture token vectors of a probe set across checkpoints into a zarr store",
        description="Capture hidden states / attention keys of every decoder layer for a probe set, "
                    "one checkpoint at a time, into a zarr activation store (resumable).",
    )
    p.add_argument("model", help="base model: a directory (transformers, safetensors; its processor is loaded from "
                                 "it) or a Hugging Face Hub id org/name[@REVISION], taken from the hub's cache "
                                 "(downloaded into it unless HF_HUB_OFFLINE=1)")
    p.add_argument("--probes", default="shapes-bilingual",
                   help="probe-set name under data/probes or a manifest.jsonl path (default: %(default)s)")
    p.add_argument("--checkpoint", "-c", action="append", type=_checkpoint_arg, default=[],
                   metavar="LABEL=SOURCE",
                   help="a trajectory point, in order: a model directory, a PEFT adapter directory "
                        "(applied on MODEL), a hub id org/name[@REVISION] of either, or a merge "
                        "'merge:METHOD:ALPHA[,density=D][,seed=S]:[BASE:]ADAPTED' "
                        "(BASE + ALPHA * (ADAPTED - BASE); METHOD linear, ties or dare; BASE left out: MODEL; "
                        "e.g. -c merge-0.5=merge:linear:0.5:BASE:ADAPTED); repeat. Default: MODEL alone, "
                        "labelled 'model'")
    p.add_argument("--out", "-o", default="driftlens.zarr", help="store folder (default: %(default)s)")
    p.add_argument("--sites", nargs="+", default=["hidden", "key", "final"],
                   choices=["embed", "hidden", "key", "query", "route", "final"],
                   help="what to capture (default: hidden key final; final = the decoder's final-norm output; "
                        "route = the routing distribution over experts at a mixture-of-experts decoder's sparse "
                        "blocks, for the metrics route_js, route_load, expert_mmd)")
    p.add_argument("--layers", nargs="+", type=_nonneg, default=None,
                   help="decoder layers, each once (default: all)")
    p.add_argument("--batch-size", type=_count, default=8, help="probes per forward pass")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:0', ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype")
    p.add_argument("--tokens-per-sample", type=_count, default=None,
                   help="keep at most N visual and N text tokens per probe (fixed-seed rows)")
    p.add_argument("--overwrite", action="append", default=[], metavar="LABEL",
                   help="capture this completed checkpoint again, replacing its rows (after its source "
                        "changed or `driftlens check` found it damaged); repeat for several")
    p.add_argument("--seed", type=int, default=0, help="seed of the --tokens-per-sample subsampling")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) weights you trust")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_cluster_options(p, "one task per checkpoint, each writing its own slot of the store")
    p.set_defaults(func=_run_capture)


def _add_cluster_options(p, tasks: str) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_count, default=None, metavar="N",
                       help=f"run on a local Dask cluster of N worker processes ({tasks}; same result as one process)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run on the Dask cluster at ADDRESS (e.g. tcp://10.0.0.1:8786); its workers must see "
                            "the same paths")
    p.add_argument("--dask-timeout", type=_positive, default=None, metavar="SECONDS",
                   help="seconds to wait for the scheduler's answer, then for a first worker, before a one-line "
                        "error (default: $DRIFTLENS_DASK_TIMEOUT or 60)")


def _run_capture(args) -> int:
    from driftlens.capture import capture
    from driftlens.scaleout import client_for
    from driftlens.store import open_store

    checkpoints = _trajectory(args.checkpoint)
    with client_for(args.workers, args.scheduler, args.dask_timeout) as client, _store_write_errors(args.out):
        out = capture(
            args.model, args.probes, checkpoints, out=args.out, sites=tuple(args.sites), layers=args.layers,
            batch_size=args.batch_size, device=args.device, dtype=args.dtype,
            tokens_per_sample=args.tokens_per_sample, seed=args.seed, progress=not args.no_progress,
            allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
            client=client,
        )
    ds = open_store(out)
    print(f"store: {out}")
    print(f"checkpoints: {list(ds.checkpoint.values.astype(str))}; layers: {ds.sizes.get('layer', 0)}; "
          f"tokens: {ds.sizes['token']}; sites: {[v for v in ds.data_vars]}")
    return 0


@contextlib.contextmanager
def _store_write_errors(store):
    """A full disk or a file-size limit while capture writes chunks: one line naming the store (the raw
    ``OSError`` of a chunk write names no file), and how to go on."""
    import errno

    from driftlens.errors import DriftlensError, EnvironmentProblem

    try:
        yield
    except OSError as exc:
        if isinstance(exc, DriftlensError) or exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        from driftlens.outputs import write_error

        why = str(write_error(exc.filename or store, exc)).split(": ", 1)[1].split(";")[0]
        raise EnvironmentProblem(f"cannot write the store {store}{f' ({exc.filename})' if exc.filename else ''}: "
                                 f"{why}; completed checkpoints are kept -- free space (or raise the limit) and rerun "
                                 f"the same command to resume") from exc


def _add_drift(sub) -> None:
    from driftlens.registry import ALIASES, DEFAULT_METRICS, METRICS

    p = sub.add_parser(
        "drift",
        help="drift of every (checkpoint, layer, site, modality) against a reference, with intervals, p-values "
             "and contrasts; several stores = several training runs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compute the drift report of an activation store: per cell and metric an effect size "
                    "against the reference checkpoint, its cluster-bootstrap interval and a cluster "
                    "sign-flip p-value (clusters = the probe set's independent units), p-values adjusted "
                    "over the grid; modality gap and MIR per layer with intervals. Writes netCDF.\n\n"
                    "Two levels of uncertainty. Within one run (one store), intervals and p-values cover probe "
                    "sampling only: would this run's models differ the same way on other scenes? They do not "
                    "cover the training run itself -- on the demo's organism the spread of a cell between eight "
                    "training seeds is a median 3x (up to 8x) one seed's interval half-width, and because any "
                    "weight change "
                    "moves a deterministic model's activations, every against-the-reference p-value sits at its "
                    "floor. Give several stores (one per training run of the same design: seeds, data orders) to "
                    "get across-run intervals and tests, and ask comparisons that can come out 'no': --contrast "
                    "(e.g. Korean minus the English control), --trajectories, --layer-contrast, --min-effect.",
    )
    p.add_argument("store", nargs="+", help="activation store folder(s) written by `driftlens capture`; several = "
                                            "one per training run of one design (same probes, same labels)")
    p.add_argument("--runs", default=None, metavar="LABELS",
                   help="comma-separated run labels, one per store (default: the stores' folder names)")
    p.add_argument("--reference", default=None, help="reference checkpoint label (default: the first)")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), choices=list(METRICS) + list(ALIASES),
                   help="metrics to compute (default: %(default)s)")
    p.add_argument("--sites", nargs="+", default=None, help="layered sites (default: all in the store)")
    p.add_argument("--contrast", action="append", default=[], metavar="A:B",
                   help="checkpoint contrast A minus B of every metric (repeatable), e.g. ko-5:en-5")
    p.add_argument("--trajectories", default=None, metavar="PREFIX_A,PREFIX_B",
                   help="contrast two trajectories step by step, e.g. ko-,en- pairs ko-1 with en-1, ko-2 with en-2 ...")
    p.add_argument("--layer-contrast", action="append", default=[], metavar="L1:L2",
                   help="layer contrast L1 minus L2 at every checkpoint (repeatable)")
    p.add_argument("--min-effect", type=float, default=None, metavar="X",
                   help="minimum effect of interest: adds one-sided p-values of 'effect (or contrast) > X' "
                        "(default: none)")
    p.add_argument("--bandwidth-scale", type=_positive, default=1.0,
                   help="MMD bandwidth in units of the reference's median-heuristic sigma (default: %(default)s)")
    p.add_argument("--permutations", type=_count, default=1000,
                   help="cluster sign flips per cell for the p-values (default: %(default)s)")
    p.add_argument("--bootstrap", type=_count, default=1000,
                   help="cluster-bootstrap draws per cell for the intervals (default: %(default)s)")
    p.add_argument("--level", type=_fraction, default=0.95, help="interval coverage (default: %(default)s)")
    p.add_argument("--correction", choices=["bh", "holm", "none"], default="bh",
                   help="multiple-testing adjustment over the grid (default: %(default)s)")
    p.add_argument("--blur", type=_positive, default=0.1,
                   help="Sinkhorn blur as a fraction of the reference's median-heuristic sigma (default: %(default)s)")
    p.add_argument("--verify", choices=["full", "fast", "none"], default="full",
                   help="store integrity check before computing: full = chunk checksums, fast = presence "
                        "and sizes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every resampling draw (default: %(default)s)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:0', ... "
                                                    "(default: %(default)s)")
    p.add_argument("--out", "-o", default="report.nc", help="netCDF output (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_cluster_options(p, "one task per site and layer")
    p.set_defaults(func=_run_drift)


def _drift_inputs(args):
    """The store argument(s) as one store, or a mapping run label -> store."""
    if len(args.store) == 1 and args.runs is None:
        return args.store[0]
    labels = [lab.strip() for lab in args.runs.split(",")] if args.runs else [Path(s).name for s in args.store]
    if len(labels) != len(args.store):
        raise UsageError(f"--runs names {len(labels)} run(s) ({labels}) for {len(args.store)} store(s)")
    if len(set(labels)) != len(labels) or not all(labels):
        raise UsageError(f"run labels must be distinct and non-empty, got {labels} (name them with --runs)")
    return dict(zip(labels, args.store))


def _contrast_pairs(args, stores) -> list[tuple[str, str]]:
    pairs = [tuple(c.split(":", 1)) if ":" in c else c for c in args.contrast]
    if args.trajectories:
        from driftlens.compare import trajectory_pairs
        from driftlens.store import completed_labels

        parts = [x for x in args.trajectories.split(",")]
        if len(parts) != 2 or not all(parts):
            raise UsageError(f"--trajectories takes two label prefixes, e.g. ko-,en-; got {args.trajectories!r}")
        first = next(iter(stores.values())) if isinstance(stores, dict) else stores
        pairs += trajectory_pairs(completed_labels(first), *parts)
    return pairs


def _run_drift(args) -> int:
    from driftlens.drift import drift
    from driftlens.scaleout import client_for

    stores = _drift_inputs(args)
    contrasts = _contrast_pairs(args, stores)
    with client_for(args.workers, args.scheduler, args.dask_timeout) as client:
        rep = drift(stores, reference=args.reference, metrics=tuple(args.metrics), sites=args.sites,
                    n_permutations=args.permutations, n_bootstrap=args.bootstrap, level=args.level,
                    correction=None if args.correction == "none" else args.correction, seed=args.seed,
                    device=args.device, blur=args.blur, progress=not args.no_progress, out=args.out,
                    verify=args.verify, client=client, contrasts=contrasts or None,
                    layer_contrasts=args.layer_contrast or None, min_effect=args.min_effect,
                    bandwidth_scale=args.bandwidth_scale)
    print(f"report: {args.out}")
    for line in report_lines(rep):
        print(line)
    return 0


def report_lines(rep) -> list[str]:
    """The printed summary of a drift report: visual MMD^2 per checkpoint and layer, and its contrasts."""
    if "mmd" not in rep:
        return []
    sel = {"modality": "visual", "site": "hidden" if "hidden" in rep.site.values else str(rep.site.values[0])}
    runs = "run" in rep.dims
    level = float(rep.attrs.get("level", 0.95))
    lines = []
    if runs:
        n = rep.sizes["run"]
        lines.append(f"visual MMD^2 ({sel['site']}), checkpoint x layer: mean over {n} runs "
                     f"[{level:.0%} across-run interval: runs, then clusters]")
        eff, lo, hi = (rep[v].sel(**sel) for v in ("mmd_runs", "mmd_runs_lo", "mmd_runs_hi"))
        for c in eff.checkpoint.values:
            cells = [f"{e:.4f} [{a:.4f}, {b:.4f}]" for e, a, b in
                     zip(eff.sel(checkpoint=c).values, lo.sel(checkpoint=c).values, hi.sel(checkpoint=c).values)]
            lines.append(f"  {str(c):>12}: " + " | ".join(cells))
    else:
        eff, lo, hi = (rep[v].sel(**sel) for v in ("mmd", "mmd_lo", "mmd_hi"))
        p = rep["mmd_q" if "mmd_q" in rep else "mmd_p"].sel(**sel)
        lines.append(f"visual MMD^2 ({sel['site']}), checkpoint x layer: effect [{level:.0%} interval] "
                     f"{'q' if 'mmd_q' in rep else 'p'}")
        for c in eff.checkpoint.values:
            cells = [f"{e:.4f} [{a:.4f}, {b:.4f}] {q:.3g}" for e, a, b, q in
                     zip(eff.sel(checkpoint=c).values, lo.sel(checkpoint=c).values,
                         hi.sel(checkpoint=c).values, p.sel(checkpoint=c).values)]
            lines.append(f"  {str(c):>12}: " + " | ".join(cells))
        lines.append("  (one run: these intervals and p-values cover probe sampling only, not the variation "
                     "between training runs; give one store per run to cover it)")
    if "mmd_contrast" in rep:
        if runs:
            lines.append(f"contrasts, visual MMD^2 ({sel['site']}) per layer: mean over runs "
                         f"[{level:.0%} across-run interval] p over runs, runs needed for 80% power")
            v = {k: rep[f"mmd_contrast_runs{k}"].sel(**sel) for k in ("", "_lo", "_hi", "_p", "_needed")}
            fmt = "{:+.4f} [{:+.4f}, {:+.4f}] p={:.3g} n80={:.0f}"
        else:
            lines.append(f"contrasts, visual MMD^2 ({sel['site']}) per layer: difference "
                         f"[{level:.0%} within-run interval] p (probe sampling only)")
            v = {k: rep[f"mmd_contrast{k}"].sel(**sel) for k in ("", "_lo", "_hi", "_p")}
            fmt = "{:+.4f} [{:+.4f}, {:+.4f}] p={:.3g}"
        for c in rep.contrast.values:
            cells = [fmt.format(*vals) for vals in zip(*(x.sel(contrast=c).values for x in v.values()))]
            lines.append(f"  {str(c):>16}: " + " | ".join(cells))
    return lines


def _add_check(sub) -> None:
    p = sub.add_parser(
        "check", help="verify an activation store: every chunk of every completed checkpoint, and its sources",
        description="Verify an activation store written by `driftlens capture`: for every completed checkpoint, "
                    "that each chunk file is present with the size and CRC32 recorded at capture; list the "
                    "checkpoints' sources and the captures that did not finish. Exit 0 when intact, 3 when "
                    "a chunk is damaged (with the `capture --overwrite` that repairs it).",
    )
    p.add_argument("store", help="activation store folder")
    p.add_argument("--fast", action="store_true", help="presence and sizes only (no checksums)")
    p.set_defaults(func=_run_check)


def _run_check(args) -> int:
    from driftlens.errors import StoreIntegrityError
    from driftlens.store import describe_store, integrity_message, verify_store

    problems, notes = verify_store(args.store, "fast" if args.fast else "full")
    for line in describe_store(args.store):
        print(line)
    for n in notes:
        print(f"note: {n}")
    if problems:
        raise StoreIntegrityError(integrity_message(args.store, problems, show=len(problems)))
    print(f"store {args.store}: intact ({'sizes' if args.fast else 'sizes and checksums'} of every chunk checked)")
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot", help="every figure of a drift report (heatmaps, per-layer curves with intervals, gap, MIR)",
        description="Write every figure a drift report supports into --out: per distributional metric and "
                    "paired_shift, site and modality a checkpoint x layer heatmap (significance marks) and "
                    "per-layer curves with interval bands; the modality gap and MIR by layer; with --schedule "
                    "the rank schedule beside its signal. PNG; SVG too with --svg.",
    )
    p.add_argument("report", help="netCDF report written by `driftlens drift`")
    p.add_argument("--out", "-o", default="figures", help="output folder (default: %(default)s)")
    p.add_argument("--var", nargs="+", default=None, metavar="VAR",
                   help="only these report variables (e.g. mmd gap mir; default: all it has)")
    p.add_argument("--site", nargs="+", default=None, metavar="SITE", help="only these sites (default: all)")
    p.add_argument("--svg", action="store_true", help="also write SVG")
    p.add_argument("--schedule", default=None, help="a rank schedule (`driftlens ranks --out`) to draw too")
    p.set_defaults(func=_run_plot)


def _run_plot(args) -> int:
    from driftlens import plot
    from driftlens.outputs import check_output, local
    from driftlens.report import load_report
    from driftlens.schedule import RankSchedule

    check_output(local(args.out), [("drift report", args.report), ("rank schedule", args.schedule)])
    rep = load_report(args.report)
    schedule = RankSchedule.load(args.schedule) if args.schedule else None
    paths = plot.plot_report(rep, args.out, formats=("png", "svg") if args.svg else ("png",), schedule=schedule,
                             variables=args.var, sites=args.site)
    print(f"{len(paths)} figure file(s) in {args.out}:")
    for path in paths:
        print(f"  {path}")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="a drift report's summary, and its self-contained interactive HTML page (--html)",
        description="Print a drift report's summary (visual MMD^2 per checkpoint and layer with intervals, and its "
                    "contrasts). With --html, also write one self-contained HTML page that opens from disk with "
                    "no server and no network: the checkpoint x layer heatmap (hover a cell for its values, click "
                    "to select it), per-layer curves with the selected checkpoint's interval band, a readout of "
                    "the selected cell (effect, interval, p, q, clusters; with runs the across-run values), the "
                    "contrasts with their across-run intervals, and the report's attributes.",
    )
    p.add_argument("report", help="netCDF report written by `driftlens drift`")
    p.add_argument("--html", default=None, metavar="FILE", help="write the interactive page to FILE (default: none)")
    p.add_argument("--title", default=None, help="the page's heading (default: from the report's probe set and "
                                                 "model type)")
    p.add_argument("--metric", default=None, help="the metric shown first (default: mmd, else the first present)")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from driftlens.htmlreport import write_html
    from driftlens.outputs import check_output, local
    from driftlens.report import load_report

    if args.html is not None:
        check_output(local(args.html, "--html"), [("drift report", args.report)], flag="--html")
    rep = load_report(args.report)
    for line in report_lines(rep):
        print(line)
    if args.html is not None:
        path = write_html(rep, args.html, title=args.title, **({"metric": args.metric} if args.metric else {}))
        print(f"page: {path} (open it in a browser; it needs no server and no network)")
    return 0


def _add_organism(sub) -> None:
    """``driftlens organism build [--seeds 0,1,2] [--force]``."""
    p = sub.add_parser("organism", help="build the model organism (a tiny bilingual LLaVA trained here)",
                       description="Build (or find in the cache) the model organism for each seed: a base trained "
                                   "on English shapes (questions and text), then a Korean adaptation and an English "
                                   "control continuation from it (5 checkpoints each), trained on 54 of the 72 "
                                   "scenes and evaluated on renderings never trained on of all 72 (seen and 18 "
                                   "held-out scenes apart), with the true, a mismatched and no image. Missing seeds "
                                   "build in parallel processes; their progress goes to stderr (a line per stage "
                                   "and a status line at least every 15 s when stderr is not a terminal).")
    p.add_argument("action", choices=["build"], help="what to do")
    p.add_argument("--seeds", default="0,1,2", help="seeds to build, e.g. 0,1,2 or 0-7 (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per missing seed)")
    p.add_argument("--cache", default=None,
                   help="cache root of the builds (default: $DRIFTLENS_CACHE or ~/.cache/driftlens)")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_organism)


def _run_organism(args) -> int:
    from driftlens.organism import build_seeds, evaluate

    seeds = parse_seeds(args.seeds)
    trajs = build_seeds(seeds, force=args.force, progress=not args.no_progress, jobs=args.jobs, cache=args.cache)
    for traj in trajs:
        ev = evaluate(traj, progress=not args.no_progress)
        print(f"organism seed {traj.seed}: {traj.root} (built in {traj.build_seconds:.0f} s); "
              f"chance accuracy {ev['chance_accuracy']:.3f}")
        print("  accuracy (seen / held-out scenes), grounding gain (true minus mismatched image), "
              "LM loss (held-out captions; Korean new forms)")
        for label in traj.all_checkpoints:
            r = ev["image_reliance"][label]
            print(f"  {label:>6}: EN {r['en']['accuracy_seen']:.2f} / {r['en']['accuracy_heldout']:.2f}  "
                  f"KO {r['ko']['accuracy_seen']:.2f} / {r['ko']['accuracy_heldout']:.2f}  "
                  f"gain EN {r['en']['gain']:+.2f} KO {r['ko']['gain']:+.2f}  "
                  f"LM EN {ev['en_lm_loss'][label]:.2f} KO {ev['ko_lm_loss'][label]:.2f} "
                  f"(new forms {ev['ko_lm_loss_new_forms'][label]:.2f})")
    return 0


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-2"`` -> ``[0, 1, 2]``."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
        except ValueError:
            raise UsageError(f"--seeds: {text!r} is not a list like 0,1,2 or a range like 0-2") from None
    if not out or any(s < 0 for s in out) or len(set(out)) != len(out):
        raise UsageError(f"--seeds: {text!r} must name distinct non-negative seeds")
    return out


def _signal_arg(values: list[str] | None) -> str | dict[str, str]:
    """``--signal`` values: one expression, or ``MODULE=EXPR`` pairs as a mapping."""
    if not values:
        return "mmd"
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    out = {}
    for v in values:
        mod, sep, expr = v.partition("=")
        if not sep or not mod or not expr:
            raise UsageError(f"--signal {v!r}: with several signals write MODULE=EXPR (MODULE may be '*')")
        out[mod] = expr
    return out


def _add_ranks(sub) -> None:
    """``driftlens ranks REPORT --budget N [...]``."""
    from driftlens.allocation import RULES
    from driftlens.ranks import DEFAULT_MODALITY, DEFAULT_SITE
    from driftlens.schedule import FORMATS

    p = sub.add_parser(
        "ranks",
        help="allocate layer-wise LoRA ranks from a drift report (PEFT / axolotl export)",
        description="Turn a per-layer drift signal into integer LoRA ranks summing exactly to a budget, "
                    "one anchored module path per adapted module, and export them as a PEFT config (JSON) "
                    "or an axolotl fragment (YAML).",
    )
    p.add_argument("report", help="drift report (netCDF) written by 'driftlens drift'")
    p.add_argument("--budget", type=_count, required=True, help="sum of ranks over all adapted modules")
    p.add_argument("--signal", action="append", default=None, metavar="EXPR|MODULE=EXPR",
                   help="NAME[@SITE][:MODALITY], e.g. mmd or mmd@key; repeat as MODULE=EXPR for per-module "
                        "signals ('*=EXPR' is the fallback). Default: mmd")
    p.add_argument("--rule", default="proportional", choices=list(RULES),
                   help="how the signal becomes ranks (proportional to it, waterfill, cumulative share, uniform)")
    p.add_argument("--min-rank", type=_count, default=1, help="smallest rank of an adapted module")
    p.add_argument("--max-rank", type=_count, default=64, help="largest rank of an adapted module")
    p.add_argument("--modules", nargs="+", default=None, help="targets relative to a decoder block, among "
                   "the spec's block_modules (default: the spec's lora_targets)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", default=None,
                       help="report checkpoint the signal is read at (default: the last of the report's one "
                            "trajectory; a report with several trajectories must name it, or use --contrast; the "
                            "reference is refused: its drift is 0)")
    group.add_argument("--contrast", default=None, metavar="A:B",
                       help="allocate from the contrast A minus B (e.g. ko-5:en-5: the drift the language change "
                            "adds over the English control; mean over runs), computed by `driftlens drift --contrast`")
    p.add_argument("--site", default=DEFAULT_SITE, help="the site the signal is read at")
    p.add_argument("--modality", default=DEFAULT_MODALITY, help="the modality the signal is read at")
    p.add_argument("--share", type=_share, default=0.9, help="cumulative rule: share of signal kept")
    p.add_argument("--alpha-ratio", type=_positive, default=2.0, help="alpha / r (default: %(default)s)")
    p.add_argument("--rslora", action="store_true", help="use rsLoRA scaling with one alpha")
    p.add_argument("--spec", default=None, help="hooks TOML file (default: by the report's model_type; one "
                   "that does not serve the report's model_type is refused)")
    p.add_argument("--out", "-o", default="ranks.json", help="output file (default: %(default)s)")
    p.add_argument("--format", choices=list(FORMATS), default=None,
                   help="peft (JSON) or axolotl (YAML); default from the --out suffix")
    p.add_argument("--plot", default=None, help="also write a PNG of rank per layer beside the signal")
    p.set_defaults(func=_run_ranks)


def _run_ranks(args) -> int:
    from driftlens.outputs import check_distinct, check_output, local
    from driftlens.plot import rank_schedule, save
    from driftlens.ranks import allocate_ranks
    from driftlens.report import load_report

    inputs = [("drift report", args.report), ("spec", args.spec)]
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None:
            check_output(local(path, flag), inputs, flag)
    check_distinct({"--out": args.out, "--plot": args.plot})
    report = load_report(args.report)
    spec = None
    if args.spec:
        from driftlens.specs import load_spec

        spec = load_spec(path=args.spec)
    sched = allocate_ranks(report, args.budget, _signal_arg(args.signal), args.rule, args.min_rank, args.max_rank,
                           args.modules, checkpoint=args.checkpoint, contrast=args.contrast, site=args.site,
                           modality=args.modality,
                           share=args.share, alpha_ratio=args.alpha_ratio, use_rslora=args.rslora, spec=spec,
                           source=str(args.report))
    out = sched.save(args.out, format=args.format)
    read_at = f"contrast {sched.meta['contrast']!r}" if sched.meta.get("contrast") else \
        f"checkpoint {sched.meta.get('checkpoint')!r}"
    runs = f", mean over {len(sched.meta['runs'])} runs" if sched.meta.get("runs") else ""
    print(f"schedule: {out} ({len(sched.adapted)} modules, budget {sched.budget}; signal at {read_at}{runs})")
    print(f"rank per layer: {sched.layer_ranks().tolist()}")
    if args.plot:
        save(rank_schedule(sched, report), args.plot)
        print(f"plot: {args.plot}")
    return 0


def _add_experiment(sub) -> None:
    """``driftlens experiment regularizer [--seeds 0-4] [--arms ...] [--steps N] [--jobs 2]``."""
    from driftlens.organism.experiment import ARMS

    p = sub.add_parser(
        "experiment", help="the closed-loop regularizer experiment on the model organism",
        description="From each organism seed's English base, adapt to Korean with the same data and steps in "
                    f"arms arranged as a tree ({', '.join(ARMS)}): each arm differs from its parent in one factor. "
                    "Settings and the rank schedule / anchor weights (from the Korean-minus-control drift contrast, "
                    "mean over the seeds) are fixed in OUT/settings.json before any arm trains. Per (arm, seed): "
                    "English and Korean accuracy and grounding gain (true minus mismatched image), held-out LM "
                    "losses, visual drift per layer, per-scene displacement, probe transfer; each arm against its "
                    "parent across seeds (the training run is the unit). Writes regularizer.json, regularizer.md "
                    "and regularizer.png into --out. Finished (arm, seed) pairs are kept: an interrupted run "
                    "resumes.")
    p.add_argument("which", choices=["regularizer"], help="the experiment")
    p.add_argument("--out", "-o", default="driftlens-experiment", help="output folder (default: %(default)s)")
    p.add_argument("--seeds", default="0-4", help="organism seeds, at least 2 for the contrasts (default: %(default)s)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms; parents are added (default: all)")
    p.add_argument("--steps", type=int, default=None, help="training steps per arm (default: the organism's "
                                                           "adapt_steps, 600)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, 1 torch thread each (default: %(default)s)")
    p.add_argument("--cache", default=None,
                   help="cache root of the organism builds and their measured examples (default: $DRIFTLENS_CACHE "
                        "or ~/.cache/driftlens)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_experiment)


def _run_experiment(args) -> int:
    from driftlens.organism.experiment import Settings, run_experiment

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    run_experiment(out=args.out, seeds=parse_seeds(args.seeds), arms=arms, cache=args.cache,
                   settings=Settings(steps=args.steps), jobs=args.jobs, progress=not args.no_progress)
    out = Path(args.out)
    print((out / "regularizer.md").read_text(encoding="utf-8"))
    for name in ("settings.json", "regularizer.json", "regularizer.md", "regularizer.png"):
        if (out / name).exists():
            print(f"  {out / name}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="the whole pipeline on the built-in model organism, over seeds (CPU, no download)",
        description="Build (or load the cached) model organism for each seed -- a tiny LLaVA trained here on an "
                    "English shapes world, then adapted to Korean, beside an English control continuation from "
                    "the same base -- capture a probe set of its world (72 scenes rendered twice) across both "
                    "trajectories, compute each seed's drift report, and write figures, a LoRA rank schedule and "
                    "summary.json / summary.md (means and spreads over seeds) into the output folder.",
    )
    p.add_argument("--out", "-o", default="driftlens-demo", help="output folder (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="organism seeds, e.g. 0,1,2 (default: %(default)s)")
    p.add_argument("--cache", default=None,
                   help="cache root of the organism builds (default: $DRIFTLENS_CACHE or ~/.cache/driftlens)")
    p.add_argument("--force", action="store_true", help="rebuild the organism even when cached")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:0', ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from driftlens.organism.demo import run_demo

    summary = run_demo(out=args.out, cache=args.cache, force=args.force, device=args.device,
                       progress=not args.no_progress, seeds=parse_seeds(args.seeds))
    out = Path(args.out)
    print()
    print((out / "summary.md").read_text(encoding="utf-8"))
    print(f"everything is in {out.resolve()}:")
    for name, path in summary["files"].items():
        print(f"  {name:>20}: {path}")
    print(f"  {'summary':>20}: {out / 'summary.json'}, {out / 'summary.md'}")
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Help that wraps paragraphs but keeps multi-line blocks (the examples) as written, and shows every
    option's default: ``(default: X)`` is added to an option whose help does not already say its default
    (flags, required options and ``None`` defaults aside)."""

    def _fill_text(self, text, width, indent):
        blocks = text.split("\n\n")
        return "\n\n".join("\n".join(indent + line for line in block.split("\n")) if "\n" in block
                             else super(_HelpFormatter, self)._fill_text(block, width, indent) for block in blocks)

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or not action.option_strings or action.required or action.default is None
                or isinstance(action.default, bool) or action.default is argparse.SUPPRESS or action.default == []):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


#: ``driftlens COMMAND --help`` ends with these examples
EXAMPLES = {
    "demo": ["driftlens demo                                  # seeds 0,1,2 into driftlens-demo/",
             "driftlens demo --seeds 0 --out demo0 --device cpu  # one seed, faster"],
    "organism": ["driftlens organism build --seeds 0,1,2",
                 "driftlens organism build --seeds 3-5 --cache /data/driftlens-cache"],
    "capture": ["driftlens capture ./llava-base --probes shapes-bilingual -c base=./llava-base "
                "-c ko-500=./lora-ko-500 --out run.zarr",
                "driftlens capture llava-hf/llava-1.5-7b-hf -c base=llava-hf/llava-1.5-7b-hf "
                "-c ko=./adapter --probes my/manifest.jsonl --layers 8 16 24 --dtype float16",
                "HF_HUB_OFFLINE=1 driftlens capture org/name@v1.0 ...   # a pinned hub revision, from the cache only"],
    "drift": ["driftlens drift run.zarr --out report.nc",
              "driftlens drift seed0.zarr seed1.zarr seed2.zarr --runs seed-0,seed-1,seed-2 \\",
              "    --trajectories ko-,en- --out report.nc      # ko-k minus en-k at every step, across seeds",
              "driftlens drift run.zarr --workers 4 --metrics mmd gap --out report.nc"],
    "check": ["driftlens check run.zarr", "driftlens check run.zarr --fast"],
    "ranks": ["driftlens ranks report.nc --budget 256 --contrast ko-5:en-5 --out ranks.json",
              "driftlens ranks report.nc --budget 256 --checkpoint ko-500 --out ranks.yaml --format axolotl "
              "--plot ranks.png"],
    "plot": ["driftlens plot report.nc --out figures --svg",
             "driftlens plot report.nc --var mmd gap --site hidden --schedule ranks.json"],
    "report": ["driftlens report report.nc                      # the summary table",
               "driftlens report report.nc --html report.html  # + the interactive page (open it in a browser)"],
    "experiment": ["driftlens experiment regularizer --seeds 0-4",
                   "driftlens experiment regularizer --arms replay_anchor --steps 100 --out quick"],
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error: ``driftlens <command>: error: ... (see --help)``, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``driftlens`` argument parser with every command."""
    parser = _Parser(
        prog="driftlens",
        description="Measure, layer by layer and against a null, how visual tokens drift while a "
                    "vision-language model is fine-tuned.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (default: one line)")
    parser.add_argument("--version", action="version", version=f"driftlens {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_organism(sub)
    _add_capture(sub)
    _add_drift(sub)
    _add_check(sub)
    _add_ranks(sub)
    _add_plot(sub)
    _add_report(sub)
    _add_experiment(sub)
    for name, command in sub.choices.items():
        command.formatter_class = _HelpFormatter
        if name in EXAMPLES:
            command.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
    return parser


def _quiet_transformers() -> None:
    """Our own bars report progress; transformers' per-checkpoint load/save bars are noise here."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()


def _version() -> str:
    from driftlens._version import __version__

    return __version__


def _say(command: str, kind: str, message: str) -> None:
    """One ``driftlens <command>: <kind>: <message>`` line (further lines of the message indented)."""
    first, *rest = str(message).strip().split("\n") or [""]
    print(f"driftlens {command}: {kind}: {first}", file=sys.stderr)
    for line in rest:
        print(f"  {line}" if not line.startswith("  ") else line, file=sys.stderr)


def _warnings_as_lines(command: str) -> None:
    """Python warnings reach a CLI user as ``driftlens <command>: warning: ...`` (no source lines)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        _say(command, "warning", str(message))

    warnings.showwarning = show


def _error_line(exc: BaseException) -> str:
    from driftlens.errors import DriftlensError

    if isinstance(exc, DriftlensError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}" if exc.strerror else str(exc)
    return (f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback "
            f"and please report it")


def _quiet_interrupts() -> None:
    """Ctrl-C: remembered (so a loop still stops if Python swallows the exception inside a
    destructor) and never printed as an "Exception ignored" traceback."""
    import signal

    from driftlens.errors import INTERRUPT

    def on_sigint(signum, frame):
        INTERRUPT.set()
        raise KeyboardInterrupt

    def unraisable(info):
        if not issubclass(info.exc_type, KeyboardInterrupt):
            sys.__unraisablehook__(info)

    if threading_main():
        signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = unraisable


def threading_main() -> bool:
    """Whether this is the main thread (signal handlers can only be set there)."""
    import threading

    return threading.current_thread() is threading.main_thread()


INTERRUPTED = ("interrupted; nothing completed is lost -- completed checkpoints and finished files are kept, "
               "and rerunning the same command resumes")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 internal, 2 usage, 3 data, 4 environment, 130 Ctrl-C)."""
    from driftlens.errors import exit_code_of

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv              # accepted anywhere on the line, not only before COMMAND
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if not args.debug:
        _warnings_as_lines(args.command)
        _quiet_interrupts()
    if args.command in ("demo", "organism", "capture", "ranks"):   # the commands that load models
        _quiet_transformers()
    from driftlens.errors import INTERRUPT

    try:
        code = int(args.func(args) or 0)
        if INTERRUPT.is_set():        # an interrupt Python swallowed after the last check
            raise KeyboardInterrupt
        return code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(file=sys.stderr)
        _say(args.command, "error", INTERRUPTED)
        return exit_code_of(KeyboardInterrupt())
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        if args.debug:
            raise
        _say(args.command, "error", _error_line(exc))
        return exit_code_of(exc)


if __name__ == "__main__":
    sys.exit(main())
