"""Seconds per training step of every arm of the regularizer experiment, in one process (run by hand).

    .venv/bin/python bench/bench_experiment_arms.py --cache CACHE --out EXPERIMENT_DIR [--seed 0] [--steps 40]

``EXPERIMENT_DIR`` is a ``driftlens experiment regularizer`` output folder (its ``settings.json``: the
rank schedules, anchor stores and weights). Each arm trains ``--steps`` steps of the same seed's stream
one after another in this process (1 torch thread), so the arms share the machine's state; the
experiment's own ``seconds_per_step`` come from worker processes that ran while the machine's load
changed, and are not comparable between arms. Prints, and writes as JSON beside the folder's
results, the mean seconds per step of the image steps and of all steps, and each arm's ratio to its
parent.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--write", default=None, help="JSON output path")
    args = ap.parse_args()

    import torch

    from driftlens import organism
    from driftlens.organism import experiment as E

    torch.set_num_threads(1)
    out = Path(args.out)
    plan = json.loads((out / "settings.json").read_text(encoding="utf-8"))
    settings = E.Settings(**plan["settings"])
    traj = organism.build_seeds([args.seed], progress=False, cache=args.cache)[0]
    recipe = traj.recipe
    _, processor = organism.load_checkpoint(traj.checkpoints["base"])
    bank = organism.training_bank(processor, recipe)
    res = {}
    for name in E.ARMS:
        p = E.prepare_arm(name, traj.checkpoints["base"], recipe, bank, plan, settings)
        opt = torch.optim.AdamW(p.params, lr=p.lr)
        p.model.train()
        img, txt = [], []
        for step in range(args.steps):
            batch = p.batches(step)
            t0 = time.perf_counter()
            image = p.objective.has_image(batch)
            if p.viral is not None and not image:
                with p.viral.paused():
                    loss, _, _ = p.objective(p.model, batch)
            else:
                loss, _, _ = p.objective(p.model, batch)
            if p.viral is not None and image:
                loss = loss + settings.viral_weight * p.viral.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            (img if image else txt).append(time.perf_counter() - t0)
        p.objective.detach()
        if p.viral is not None:
            p.viral.detach()
        res[name] = {"image_step_s": sum(img) / max(1, len(img)), "text_step_s": sum(txt) / max(1, len(txt)),
                     "step_s": (sum(img) + sum(txt)) / args.steps, "image_steps": len(img)}
    for name, r in res.items():
        parent = E.arm(name).parent
        r["image_step_ratio_to_parent"] = r["image_step_s"] / res[parent]["image_step_s"] if parent else None
        print(f"{name:>16}: {r['step_s']:.3f} s/step (image steps {r['image_step_s']:.3f}, n={r['image_steps']}; "
              f"text {r['text_step_s']:.3f})" + (f"; image steps x{r['image_step_ratio_to_parent']:.2f} of {parent}"
                                                  if parent else ""))
    if args.write:
        Path(args.write).write_text(json.dumps({"seed": args.seed, "steps": args.steps, "arms": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
