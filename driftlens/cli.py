"""driftlens command line: capture, drift, ranks, plot, organism, demo.

Each subcommand is a thin wrapper over the Python function of the same name; see
``driftlens <command> --help``.
"""
from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--sites", nargs="+", default=["hidden", "key"],
                   choices=["embed", "hidden", "key", "query"], help="what to capture (default: hidden key)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="driftlens",
        description="Measure, layer by layer and against a null, how visual tokens drift while a "
                    "vision-language model is fine-tuned.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_capture(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"driftlens {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
