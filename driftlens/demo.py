"""``driftlens demo``: the whole pipeline on the built-in model organism.

build (or load the cached) organism -> generate the organism's world probe set -> capture it
across the trajectory -> drift report against ``base`` -> figures, rank schedule,
``summary.json`` and ``summary.md`` in the output folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


# Sinkhorn is left out of the demo to keep it within two minutes on 2 cores (each call on
# ~1000 x 1000 tokens costs ~1 s there); `driftlens drift` computes it by default.
DEMO_METRICS = ("mmd", "sliced_w", "gauss_w2", "shift", "gap", "mir")
# The demo's probe set: every scene of the organism's world (72), rendered twice at the
# organism's image size, one caption probe per image (languages alternating), so the 144
# images are the null's units and no visual token is duplicated across languages. The
# shipped 16-scene ``shapes-bilingual`` set gives a null too wide for a 4-layer organism
# (z <= 2 at ko-5; see bench/RESULTS.md).
DEMO_PROBES = {"n_scenes": 72, "renders": 2, "kinds": ("caption",), "alternate_langs": True}


def visual_drift_summary(report, var: str = "mmd_z", site: str = "hidden") -> tuple[dict, dict]:
    """Per checkpoint: the visual z-score per layer and the fraction of layers with z > 3."""
    da = report[var].sel(site=site, modality="visual")
    z = {str(c): [float(v) for v in da.sel(checkpoint=c).values] for c in da.checkpoint.values}
    frac = {c: float(np.mean(np.asarray(v) > 3.0)) for c, v in z.items()}
    return z, frac


def write_summary(out: Path, summary: dict) -> tuple[Path, Path]:
    """``summary.json`` and a readable ``summary.md`` with the headline numbers."""
    js = out / "summary.json"
    js.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    cks = summary["checkpoints"]
    lines = [
        "# driftlens demo: the model organism",
        "",
        f"Chance accuracy of the grounding questions: {summary['chance_accuracy']:.3f}.",
        "",
        "| checkpoint | EN grounding | KO grounding | KO LM loss | visual MMD z per layer (hidden) | layers z>3 |",
        "|---|---|---|---|---|---|",
    ]
    for c in cks:
        acc = summary["grounding_accuracy"][c]
        z = ", ".join(f"{v:.1f}" for v in summary["visual_drift_z"][c])
        lines.append(f"| {c} | {acc['en']:.3f} | {acc['ko']:.3f} | {summary['ko_lm_loss'][c]:.3f} | {z} | "
                     f"{summary['layers_z_gt3_fraction'][c]:.2f} |")
    lines += ["", "z: (MMD^2 between the base and the checkpoint - null mean) / null std, the null being "
              "MMD^2 between disjoint halves of the base's probe images.", ""]
    if "files" in summary:
        lines += ["## Files", ""] + [f"- {k}: `{v}`" for k, v in summary["files"].items()]
    md = out / "summary.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return js, md


def run_demo(out="driftlens-demo", cache=None, force: bool = False, budget: int | None = None,
             progress: bool = True, device="auto") -> dict:
    """Run the demo; returns the summary dict (also written to ``out/summary.json``)."""
    from driftlens import organism, plot
    from driftlens.capture import capture
    from driftlens.drift import drift
    from driftlens.probes import ProbeSet, make_shapes_probes
    from driftlens.store import open_store

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    traj = organism.build(out=cache, force=force, progress=progress)
    t_build = time.perf_counter() - t0
    ckpts = dict(traj.checkpoints)
    labels = list(ckpts)
    probes = ProbeSet.load(make_shapes_probes(out / "probes" / "organism-world", seed=0,
                                              size=traj.recipe.image_size, **DEMO_PROBES))
    store_path = out / "activations.zarr"
    seconds = {"organism": round(t_build, 1)}
    tick = time.perf_counter()

    def lap(name):
        nonlocal tick
        now = time.perf_counter()
        seconds[name] = round(now - tick, 1)
        tick = now

    capture(ckpts[labels[0]], probes, ckpts, out=store_path, sites=("hidden", "key"),
            batch_size=16, device=device, progress=progress)
    lap("capture")
    ds = open_store(store_path)
    report = drift(ds, reference=labels[0], metrics=DEMO_METRICS, progress=progress,
                   device=device, out=out / "drift.nc")
    lap("drift")
    evaluation = organism.evaluate(traj, progress=progress)
    lap("evaluate")
    z, frac = visual_drift_summary(report)

    figs = out / "figures"
    files = {"store": str(store_path), "report": str(out / "drift.nc")}
    files["drift_heatmap"] = str(plot.save(plot.drift_heatmap(report), figs / "drift_heatmap.png"))
    files["modality_gap"] = str(plot.save(plot.per_layer(report, "gap"), figs / "modality_gap.png"))
    files["mir"] = str(plot.save(plot.per_layer(report, "mir"), figs / "mir_by_layer.png"))
    mean_z = {c: float(np.mean(v)) for c, v in z.items()}
    files["accuracy_vs_drift"] = str(plot.save(
        plot.accuracy_vs_drift(evaluation["grounding_accuracy"], mean_z, chance=evaluation["chance_accuracy"]),
        figs / "accuracy_vs_drift.png"))
    files.update(_ranks(report, traj, out, figs, budget))
    lap("figures_and_ranks")

    summary = {
        "checkpoints": labels,
        "chance_accuracy": float(evaluation["chance_accuracy"]),
        "grounding_accuracy": evaluation["grounding_accuracy"],
        "ko_lm_loss": evaluation["ko_lm_loss"],
        "visual_drift_z": z,
        "layers_z_gt3_fraction": frac,
        "organism": str(traj.root),
        "seconds": {**seconds, "total": round(time.perf_counter() - t0, 1)},
        "files": files,
    }
    write_summary(out, summary)
    return summary


def _ranks(report, traj, out: Path, figs: Path, budget: int | None) -> dict:
    """Rank schedule from the visual drift, when the ranks module is available."""
    try:
        from driftlens.ranks import allocate_ranks, plot_schedule
    except ImportError:  # pragma: no cover - ranks ship with the package
        return {}
    from driftlens import plot

    n_layers = int(report.sizes["layer"])
    budget = budget or 8 * n_layers * 4
    sched = allocate_ranks(report, budget=budget, signal="mmd_z", rule="proportional",
                           min_rank=2, max_rank=64)
    path = out / "ranks.json"
    sched.save(path)
    return {"ranks": str(path),
            "ranks_plot": str(plot.save(plot_schedule(sched, report), figs / "ranks.png"))}
