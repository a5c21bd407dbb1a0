"""Overhead of the drift regularizer per training step (CPU, by hand).

    .venv/bin/python bench/bench_regularizer.py [--steps 20] [--batch 16] [--threads 2]

The organism's LLaVA (recipe defaults, random init: the cost does not depend on the weights),
image-question batches of ``--batch`` examples, AdamW on every LLM parameter. Per configuration,
the median seconds per optimizer step over ``--steps`` steps after 3 warm-up steps:

- ``lm``: the LM loss only (``DriftObjective`` with no term: the plain step);
- ``+ drift (fixed)`` / ``+ drift (tracking)``: anchor loss on 4 layers, 1024 anchors each;
- ``+ contrast``: the grounding contrast (its text-only forward);
- ``+ drift + contrast``.

Prints a markdown table for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

from driftlens import organism
from driftlens.train.anchor import AnchorDriftLoss
from driftlens.train.objective import DriftObjective


def anchors(model, bank, layers, n: int, mode: str):
    """Anchor loss from the model's own visual tokens of ``n`` tokens' worth of image batches."""
    from driftlens.train.tap import VisualTap

    rng = random.Random(0)
    vis = {la: [] for la in layers}
    txt = {la: [] for la in layers}
    with torch.no_grad(), VisualTap(model, layers) as tap:
        while sum(v.shape[0] for v in vis[layers[0]]) < n:
            batch = bank.question_batch(rng, "en", 16)
            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
            for la in layers:
                vis[la].append(tap.visual[la])
                txt[la].append(tap.text[la])
    return AnchorDriftLoss({la: torch.cat(vis[la])[:n] for la in layers}, mode=mode,
                           anchor_text={la: torch.cat(txt[la]) for la in layers})


def time_steps(model, objective, batches, steps: int) -> float:
    params = [p for n, p in model.named_parameters() if "language_model" in n]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 3):
        batch = batches[i % len(batches)]
        t = time.perf_counter()
        loss, _, _ = objective(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t)
    objective.detach()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = organism.Recipe()
    processor = organism.make_processor(recipe)
    torch.manual_seed(0)
    model = organism.make_model(recipe, processor.tokenizer)
    bank = organism.ImageBank(processor, recipe.image_size, organism.render_seed(recipe), 4)
    rng = random.Random(1)
    batches = [bank.question_batch(rng, "ko", args.batch) for _ in range(8)]
    layers = list(range(4))
    fixed, tracking = anchors(model, bank, layers, 1024, "fixed"), anchors(model, bank, layers, 1024, "tracking")
    configs = {
        "lm": dict(),
        "+ drift (fixed)": dict(drift=fixed),
        "+ drift (tracking)": dict(drift=tracking),
        "+ contrast": dict(contrast_weight=0.1),
        "+ drift (tracking) + contrast": dict(drift=tracking, contrast_weight=0.1),
    }
    rows = {name: time_steps(model, DriftObjective(model, **kw), batches, args.steps) for name, kw in configs.items()}
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, batch {args.batch}, {args.steps} steps")
    print("| configuration | s / step | overhead vs LM only |")
    print("|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {s:.3f} | {s / rows['lm'] - 1:+.0%} |")


if __name__ == "__main__":
    main()
