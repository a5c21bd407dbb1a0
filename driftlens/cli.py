"""driftlens command line: capture, drift, ranks, plot, organism, demo.

Each subcommand is a thin wrapper over the Python function of the same name; see
``driftlens <command> --help``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _checkpoint_arg(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, path


def _add_capture(sub) -> None:
    p = sub.add_parser(
        "capture",
        help="capture token vectors of a probe set across checkpoints into a zarr store",
        description="Capture hidden states / attention keys of every decoder layer for a probe set, "
                    "one checkpoint at a time, into a zarr activation store (resumable).",
    )
    p.add_argument("model", help="base model directory (transformers, safetensors; its processor is loaded from it)")
    p.add_argument("--probes", default="shapes-bilingual",
                   help="probe-set name under driftlens/data/probes or a manifest.jsonl path (default: %(default)s)")
    p.add_argument("--checkpoint", "-c", action="append", type=_checkpoint_arg, default=[],
                   metavar="LABEL=PATH",
                   help="a trajectory point, in order: a model directory or a PEFT adapter directory "
                        "(applied on MODEL); repeat. Default: MODEL alone, labelled 'model'")
    p.add_argument("--out", "-o", default="driftlens.zarr", help="store folder (default: %(default)s)")
    p.add_argument("--sites", nargs="+", default=["hidden", "key", "final"],
                   choices=["embed", "hidden", "key", "query", "final"],
                   help="what to capture (default: hidden key final; final = the decoder's final-norm output)")
    p.add_argument("--layers", nargs="+", type=int, default=None, help="decoder layers (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:0', ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype")
    p.add_argument("--tokens-per-sample", type=int, default=None,
                   help="keep at most N visual and N text tokens per probe (fixed-seed rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) weights you trust")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_capture)


def _run_capture(args) -> int:
    from driftlens.capture import capture
    from driftlens.store import open_store

    checkpoints = dict(args.checkpoint) if args.checkpoint else None
    out = capture(
        args.model, args.probes, checkpoints, out=args.out, sites=tuple(args.sites), layers=args.layers,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        tokens_per_sample=args.tokens_per_sample, seed=args.seed, progress=not args.no_progress,
        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
    )
    ds = open_store(out)
    print(f"store: {out}")
    print(f"checkpoints: {list(ds.checkpoint.values.astype(str))}; layers: {ds.sizes.get('layer', 0)}; "
          f"tokens: {ds.sizes['token']}; sites: {[v for v in ds.data_vars]}")
    return 0


def _add_drift(sub) -> None:
    from driftlens.drift import ALL_METRICS, DEFAULT_METRICS

    p = sub.add_parser(
        "drift",
        help="drift of every (checkpoint, layer, site, modality) against a reference, with intervals and p-values",
        description="Compute the drift report of an activation store: per cell and metric an effect size "
                    "against the reference checkpoint, its cluster-bootstrap interval and a cluster "
                    "sign-flip p-value (clusters = the probe set's independent units), p-values adjusted "
                    "over the grid; modality gap and MIR per layer with intervals. Writes netCDF.",
    )
    p.add_argument("store", help="activation store folder written by `driftlens capture`")
    p.add_argument("--reference", default=None, help="reference checkpoint label (default: the first)")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), choices=list(ALL_METRICS) + ["shift"])
    p.add_argument("--sites", nargs="+", default=None, help="layered sites (default: all in the store)")
    p.add_argument("--permutations", type=int, default=1000,
                   help="cluster sign flips per cell for the p-values (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="cluster-bootstrap draws per cell for the intervals (default: %(default)s)")
    p.add_argument("--level", type=float, default=0.95, help="interval coverage (default: %(default)s)")
    p.add_argument("--correction", choices=["bh", "holm", "none"], default="bh",
                   help="multiple-testing adjustment over the grid (default: %(default)s)")
    p.add_argument("--blur", type=float, default=0.1,
                   help="Sinkhorn blur as a fraction of the reference's median-heuristic sigma")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", "-o", default="report.nc", help="netCDF output (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_drift)


def _run_drift(args) -> int:
    from driftlens.drift import drift

    rep = drift(args.store, reference=args.reference, metrics=tuple(args.metrics), sites=args.sites,
                n_permutations=args.permutations, n_bootstrap=args.bootstrap, level=args.level,
                correction=None if args.correction == "none" else args.correction, seed=args.seed,
                device=args.device, blur=args.blur, progress=not args.no_progress, out=args.out)
    print(f"report: {args.out}")
    if "mmd" in rep:
        sel = {"modality": "visual", "site": "hidden" if "hidden" in rep.site.values else str(rep.site.values[0])}
        eff, lo, hi = (rep[v].sel(**sel) for v in ("mmd", "mmd_lo", "mmd_hi"))
        p = rep["mmd_q" if "mmd_q" in rep else "mmd_p"].sel(**sel)
        print(f"visual MMD^2 ({sel['site']}), checkpoint x layer: effect [{rep.attrs['level']:.0%} interval] "
              f"{'q' if 'mmd_q' in rep else 'p'}")
        for c in eff.checkpoint.values:
            cells = [f"{e:.4f} [{a:.4f}, {b:.4f}] {q:.3g}" for e, a, b, q in
                     zip(eff.sel(checkpoint=c).values, lo.sel(checkpoint=c).values,
                         hi.sel(checkpoint=c).values, p.sel(checkpoint=c).values)]
            print(f"  {str(c):>12}: " + " | ".join(cells))
    for w in filter(None, str(rep.attrs.get("warnings", "")).split("\n")):
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot", help="figures of a drift report (heatmap, per-layer curves)",
        description="Draw a checkpoint x layer heatmap of a report variable, or per-layer curves.",
    )
    p.add_argument("report", help="netCDF report written by `driftlens drift`")
    p.add_argument("--var", default="mmd", help="report variable (default: %(default)s)")
    p.add_argument("--kind", choices=["heatmap", "layers"], default="heatmap")
    p.add_argument("--site", default="hidden")
    p.add_argument("--modality", default="visual")
    p.add_argument("--out", "-o", default=None, help="PNG path (default: <var>_<kind>.png)")
    p.set_defaults(func=_run_plot)


def _run_plot(args) -> int:
    from driftlens import plot
    from driftlens.drift import load_report

    rep = load_report(args.report)
    if args.kind == "heatmap":
        ax = plot.drift_heatmap(rep, args.var, site=args.site, modality=args.modality)
    else:
        ax = plot.per_layer(rep, args.var, site=args.site, modality=args.modality)
    path = plot.save(ax, args.out or f"{args.var}_{args.kind}.png")
    print(f"figure: {path}")
    return 0


def _add_organism(sub) -> None:
    from driftlens.organism import add_parser

    add_parser(sub)


def _add_ranks(sub) -> None:
    from driftlens.ranks import add_parser

    add_parser(sub)


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
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from driftlens.demo import run_demo
    from driftlens.organism import parse_seeds

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="driftlens",
        description="Measure, layer by layer and against a null, how visual tokens drift while a "
                    "vision-language model is fine-tuned.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_organism(sub)
    _add_capture(sub)
    _add_drift(sub)
    _add_ranks(sub)
    _add_plot(sub)
    return parser


def _quiet_transformers() -> None:
    """Our own bars report progress; transformers' per-checkpoint load/save bars are noise here."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("demo", "organism", "capture", "ranks"):   # the commands that load models
        _quiet_transformers()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"driftlens {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
