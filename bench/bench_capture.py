"""Capture overhead: driftlens.capture of every layer (hidden + key) vs a plain forward.

Run by hand:  .venv/bin/python bench/bench_capture.py [--layers 8] [--hidden 512] [--repeats 3]

Model: a random-weight LLaVA (driftlens.testing.tiny) with a Llama decoder of ``--layers`` blocks and
hidden size ``--hidden``; probes: ``photos-bilingual``. Two ratios are reported:

- per batch: nnsight trace + row gather + store write, against ``model(**inputs)`` (the same
  batches, already preprocessed);
- end to end: ``dl.capture`` (preprocessing included) against preprocessing + plain forwards.

Target (issue 2): at most 1.3x a plain forward for >= 8 layers and hidden size >= 512.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import driftlens as dl
from driftlens.capture import plan_tokens
from driftlens.devices import resolve_device
from driftlens.probes import ProbeSet
from driftlens.specs import load_spec
from driftlens.testing import tiny


def repeated(probes, copies: int, dest: Path) -> ProbeSet:
    """The probe set ``copies`` times over (ids suffixed, images linked), as a new manifest."""
    import dataclasses
    import json

    lines = []
    for c in range(copies):
        for p in probes:
            d = dataclasses.asdict(p)
            d["id"], d["group"] = f"{p.id}#{c}", f"{p.group}#{c}"
            lines.append(json.dumps(d, ensure_ascii=False))
    (dest / "images").symlink_to(probes.root / "images")
    (dest / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ProbeSet.load(dest / "manifest.jsonl")


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--probes", default="photos-bilingual")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype")
    ap.add_argument("--copies", type=int, default=4,
                    help="repeat the probe set this many times (distinct ids), so fixed costs amortize "
                         "as in a real capture")
    args = ap.parse_args()

    dev = resolve_device(args.device)
    model, processor = tiny.build("llava", seed=0, n_layers=args.layers, hidden_size=args.hidden,
                                  intermediate_size=4 * args.hidden, num_attention_heads=8,
                                  num_key_value_heads=8)
    model = model.to(dev)
    spec = load_spec(model)
    probes = repeated(ProbeSet.load(args.probes), args.copies, Path(tempfile.mkdtemp()))
    plan = plan_tokens(processor, spec, model.config, probes, batch_size=args.batch_size)
    batches = [{k: v.to(dev) if hasattr(v, "to") else v for k, v in b.inputs.items()} for b in plan.batches]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def plain():
        with torch.inference_mode():
            for b in batches:
                model(**b, use_cache=False)
        sync()

    def preprocess():
        plan_tokens(processor, spec, model.config, probes, batch_size=args.batch_size)

    tmp = Path(tempfile.mkdtemp())

    def cap():
        shutil.rmtree(tmp / "s.zarr", ignore_errors=True)
        dl.capture(model, probes, out=tmp / "s.zarr", sites=("hidden", "key"), processor=processor,
                   batch_size=args.batch_size, device=str(dev), dtype=args.dtype, progress=False)
        sync()

    plain()   # warm-up
    cap()
    # interleaved (plain, preprocessing, capture) per repeat: on a shared machine the load changes
    # between phases, so each repeat's ratio compares runs under the same load
    runs = []
    for _ in range(args.repeats):
        runs.append([best(fn, 1) for fn in (plain, preprocess, cap)])
    t_plain, t_pre, t_cap = (min(r[i] for r in runs) for i in range(3))
    t_trace = t_cap - t_pre
    paired = sorted((c - p_) / p for p, p_, c in runs)
    load = open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"
    shutil.rmtree(tmp, ignore_errors=True)
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"machine: {machine}; torch {torch.__version__}")
    print(f"model: llava, {args.layers} layers, hidden {args.hidden}; storage {args.dtype}; {len(probes)} probes, "
          f"{len(batches)} batches of {args.batch_size}, {tokens} tokens")
    print(f"plain forward (all batches):        {t_plain:8.3f} s")
    print(f"preprocessing (processor, plan):   {t_pre:8.3f} s")
    print(f"capture end to end:                {t_cap:8.3f} s")
    print(f"capture minus preprocessing:       {t_trace:8.3f} s  -> {t_trace / t_plain:.2f}x plain forward")
    print(f"end to end vs preprocess + plain:  {t_cap / (t_pre + t_plain):.2f}x")
    print(f"per repeat (interleaved), capture minus preprocessing / plain: median {paired[len(paired) // 2]:.2f}x "
          f"(all: {', '.join(f'{x:.2f}' for x in paired)}); load average {load}")


if __name__ == "__main__":
    main()
