"""The closed-loop regularizer experiment on the model organism (``driftlens experiment regularizer``).

From each seed's English base, the same Korean data stream (the organism's continuation stage,
:func:`driftlens.organism.continuation_batches`), the same steps and seeds, arms that differ in
one factor at a time:

``full``
    The organism's Korean stage as it is: every LLM weight trained, vision tower and projector
    frozen, the organism's learning rate.
``lora_uniform``
    LoRA with equal ranks on the attention projections (``budget`` = 8 per module).
``lora_schedule``
    LoRA with the ranks :func:`driftlens.allocate_ranks` derives from the seed's demo report
    (visual ``mmd`` at the last Korean checkpoint, proportional rule), the same total budget.
``lora_schedule_anchor_fixed`` / ``lora_schedule_anchor_tracking``
    ``lora_schedule`` + :class:`driftlens.AnchorDriftLoss` (anchors: the base's visual tokens of
    the demo's probe set, every layer, report weights) in either mode.
``lora_schedule_contrast``
    ``lora_schedule`` + the grounding contrast.
``viral``
    ``lora_uniform`` + VIRAL's alignment: a middle layer's visual tokens, through a trainable
    2-layer MLP head, pulled toward the frozen vision tower's features (1 - cosine).
``replay``
    ``lora_uniform`` with a share of the steps' batches replaced by English image questions.

In every LoRA arm the projector, the token embeddings and the LM head are trained with the adapters
(the new language's tokens need their rows: the base never trained its Korean embeddings); the
vision tower is frozen everywhere. The hyper-parameters are :class:`Settings`, fixed before any arm
ran. For each (arm, seed): English and Korean grounding accuracy and held-out Korean LM loss (the
organism's evaluation), the mean over layers of the visual drift effect against the base (the drift
report's ``mmd``, site ``hidden``, on the demo's probe set), and the wall time per training step.

Every finished (arm, seed) is kept (``<out>/seed-<s>/<arm>/result.json`` and its merged model); an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from driftlens.errors import UsageError
from driftlens.outputs import atomic_write

ARMS = ("full", "lora_uniform", "lora_schedule", "lora_schedule_anchor_fixed", "lora_schedule_anchor_tracking",
        "lora_schedule_contrast", "viral", "replay")
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
DRIFT_METRIC = ("paired cluster MMD^2 (drift report variable `mmd`, site hidden, modality visual) of the final model "
                "against the base on the demo's probe set (72 scenes x 2 renders), mean over the decoder layers")


@dataclass(frozen=True)
class Settings:
    """The experiment's hyper-parameters; fixed before any arm ran (2026-11-25), not tuned on outcomes.

    Attributes
    ----------
    lora_lr : float
        Learning rate of every trainable parameter in the LoRA arms (constant after the organism's
        warmup, as the organism's stage); ``full`` keeps the organism's ``adapt_lr``.
    rank_per_module : int
        ``budget = rank_per_module x adapted modules`` (the demo's default: 8 x 4 x n_layers).
    drift_weight, n_anchors : float, int
        Weight of :class:`~driftlens.AnchorDriftLoss` (report-weighted mean over every layer) and
        its anchor count.
    contrast_weight, margin : float
        Weight and hinge margin (nats per answer token) of the grounding contrast.
    viral_weight : float
        Weight of the VIRAL alignment (VIRAL's own 0.5).
    replay_fraction : float
        Share of steps whose batch is replaced by English image questions in ``replay``.
    """

    lora_lr: float = 2e-3
    rank_per_module: int = 8
    drift_weight: float = 1.0
    n_anchors: int = 1024
    contrast_weight: float = 1.0
    margin: float = 1.0
    viral_weight: float = 0.5
    replay_fraction: float = 0.1
    steps: int | None = None          # default: the organism's adapt_steps


# ----------------------------------------------------------------------------- one arm

def trainable_parameters(model, arm: str) -> list:
    """Set ``requires_grad`` for ``arm`` and return the trainable parameters (vision tower frozen)."""
    full = arm == "full"
    out = []
    for name, p in model.named_parameters():
        if "vision_tower" in name:
            want = False
        elif full:
            want = "multi_modal_projector" not in name
        else:
            want = ("lora_" in name or "multi_modal_projector" in name or "embed_tokens" in name
                    or "lm_head" in name)
        p.requires_grad_(want)
        if want:
            out.append(p)
    return out


def describe_trainable(model, arm: str, schedule=None) -> str:
    """What an arm trains, in words (for the result's ``trainable``)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if arm == "full":
        return f"LLM (all {n:,} weights); projector frozen, vision tower frozen"
    ranks = "" if schedule is None else f"LoRA ranks {sorted(set(schedule.ranks.values()))} on {len(schedule.ranks)} " \
        f"attention projections (budget {schedule.budget}), "
    return f"{ranks}projector, embed_tokens, lm_head ({n:,} weights); vision tower frozen"


class ViralAlignment:
    """VIRAL's visual representation alignment: ``1 - cos(head(h_l), f)`` averaged over visual tokens,
    ``h_l`` the visual-token states of decoder layer ``l`` (read by a :class:`~driftlens.VisualTap`),
    ``f`` the frozen vision tower's features that feed the projector (read by a hook on it), ``head``
    a trainable 2-layer MLP (hidden -> 2 hidden -> vision width)."""

    def __init__(self, model, layer: int):
        import torch

        from driftlens.specs import unwrap
        from driftlens.training import VisualTap

        base = unwrap(model)
        hidden = base.config.get_text_config().hidden_size
        width = base.config.vision_config.hidden_size
        self.head = torch.nn.Sequential(torch.nn.Linear(hidden, 2 * hidden), torch.nn.GELU(),
                                        torch.nn.Linear(2 * hidden, width))
        self.layer = int(layer)
        self.tap = VisualTap(model, [self.layer], keep_text=False).attach()
        self.features = None
        self._handle = base.model.multi_modal_projector.register_forward_hook(self._grab)

    def _grab(self, module, args, output):
        self.features = args[0].detach()             # [n_images, tokens, width]

    def loss(self):
        """The alignment loss of the last forward (differentiable); clears the tap."""
        import torch

        v = self.tap.visual[self.layer]                                   # [n_visual, hidden]
        f = self.features.reshape(-1, self.features.shape[-1])             # [n_visual, width]
        if f.shape[0] != v.shape[0]:
            raise RuntimeError(f"VIRAL: {v.shape[0]} visual rows but {f.shape[0]} vision features")
        self.tap.clear()
        return 1 - torch.nn.functional.cosine_similarity(self.head(v), f.to(v.dtype), dim=-1).mean()

    def paused(self):
        """A context in which forwards are not read (text-only batches)."""
        return self.tap.paused()

    def detach(self) -> None:
        """Remove the hooks."""
        self.tap.detach()
        self._handle.remove()


def _objective(arm: str, model, settings: Settings, store, report, seed: int, checkpoint: str):
    from driftlens.regularizer import AnchorDriftLoss
    from driftlens.trainer import DriftObjective

    n_layers = int(report.sizes["layer"])
    if arm.startswith("lora_schedule_anchor_"):
        mode = arm.rsplit("_", 1)[1]
        drift = AnchorDriftLoss.from_store(store, "base", layers=list(range(n_layers)), mode=mode,
                                           n_anchors=settings.n_anchors, weights=report, weights_checkpoint=checkpoint,
                                           site="hidden", seed=seed)
        return DriftObjective(model, drift, drift_weight=settings.drift_weight)
    if arm == "lora_schedule_contrast":
        return DriftObjective(model, None, contrast_weight=settings.contrast_weight, margin=settings.margin)
    return DriftObjective(model, None)


def _schedule(arm: str, report, budget: int, checkpoint: str):
    from driftlens.ranks import allocate_ranks

    rule = "uniform" if arm in ("lora_uniform", "viral", "replay") else "proportional"
    return allocate_ranks(report, budget=budget, signal="mmd", rule=rule, min_rank=2, max_rank=64,
                          modules=list(LORA_TARGETS), checkpoint=checkpoint)


def _batches(arm: str, processor, bank, recipe, settings: Settings):
    from driftlens import organism

    korean = organism.continuation_batches(processor, bank, recipe, "ko")
    if arm != "replay":
        return korean
    rng = random.Random(f"{recipe.seed}-replay")

    def batch(step):
        b = korean(step)                 # drawn every step: the Korean stream stays the other arms'
        if rng.random() < settings.replay_fraction:
            return bank.question_batch(rng, "en", recipe.batch_size)
        return b

    return batch


def train_arm(arm: str, base_dir, recipe, bank, report, store, settings: Settings, progress: bool = True):
    """Train one arm from the base in ``base_dir``; returns ``(merged model, processor, info)``."""
    import torch
    from tqdm.auto import tqdm

    from driftlens import organism

    if arm not in ARMS:
        raise UsageError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    torch.manual_seed(recipe.seed)
    model, processor = organism.load_checkpoint(base_dir)
    n_layers = int(report.sizes["layer"])
    schedule = None
    adapted = f"{organism.STAGE_PREFIX['ko']}-{recipe.n_checkpoints}"     # the drift the arms act on
    if arm != "full":
        schedule = _schedule(arm, report, settings.rank_per_module * len(LORA_TARGETS) * n_layers, adapted)
        model = schedule.get_peft_model(model, lora_dropout=0.0)
    params = trainable_parameters(model, arm)
    trainable = describe_trainable(model, arm, schedule)
    objective = _objective(arm, model, settings, store, report, recipe.seed, adapted)
    viral = ViralAlignment(model, n_layers // 2) if arm == "viral" else None
    if viral is not None:
        params = params + list(viral.head.parameters())
    lr = recipe.adapt_lr if arm == "full" else settings.lora_lr
    steps = settings.steps or recipe.adapt_steps
    batches = _batches(arm, processor, bank, recipe, settings)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    model.train()
    seconds = 0.0
    image_steps = 0
    for step in tqdm(range(steps), desc=f"seed {recipe.seed}: {arm}", disable=not progress, leave=False):
        for g in opt.param_groups:
            g["lr"] = min(lr, lr * (step + 1) / recipe.warmup)
        batch = batches(step)
        t0 = time.perf_counter()
        image = objective.has_image(batch)
        image_steps += int(image)
        if viral is not None and not image:
            with viral.paused():
                loss, terms, _ = objective(model, batch)
        else:
            loss, terms, _ = objective(model, batch)
        if viral is not None and image:
            v = viral.loss()
            loss = loss + settings.viral_weight * v
            terms["viral_loss"] = float(v.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - t0
        for k, v in terms.items():
            if "/" not in k:
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        if not math.isfinite(terms["loss"]):
            raise FloatingPointError(f"seed {recipe.seed}, arm {arm}: the loss is {terms['loss']} at step {step}")
    objective.detach()
    if viral is not None:
        viral.detach()
    model.eval()
    if schedule is not None:
        model = model.merge_and_unload()
    info = {"seconds_per_step": seconds / steps, "steps": steps, "image_steps": image_steps, "lr": lr,
            "trainable": trainable,
            "mean_terms": {k: sums[k] / counts[k] for k in sums},
            "ranks": None if schedule is None else {k: int(v) for k, v in schedule.ranks.items()}}
    return model, processor, info


# ----------------------------------------------------------------------------- one seed

def _demo_inputs(demo_dir: Path, seeds, cache, progress: bool):
    """Each seed's demo store and report (running the demo for the seeds that lack them)."""
    from driftlens.organism.demo import run_demo

    need = [s for s in seeds if not ((demo_dir / f"seed-{s}" / "drift.nc").exists()
                                     and (demo_dir / f"seed-{s}" / "activations.zarr").exists())]
    if need or not (demo_dir / "probes" / "organism-world").exists():
        run_demo(out=demo_dir, cache=cache, progress=progress, seeds=tuple(seeds))


def _evaluate(model, processor, evalset) -> dict:
    from driftlens import organism

    en, ko = evalset.accuracy(model, "en"), evalset.accuracy(model, "ko")
    return {"en_acc": en["accuracy"], "ko_acc": ko["accuracy"], "ko_lm_loss": organism.ko_lm_loss(model, processor),
            "en_by_attribute": en["by_attribute"], "ko_by_attribute": ko["by_attribute"]}


def run_seed(seed: int, traj, demo_dir: Path, out: Path, arms, settings: Settings, progress: bool = True) -> dict:
    """Every arm of one seed (finished arms are read back), then their drift against the base."""
    import xarray as xr

    from driftlens import organism
    from driftlens.store import open_store

    recipe = traj.recipe
    report = xr.load_dataset(demo_dir / f"seed-{seed}" / "drift.nc")
    store = open_store(demo_dir / f"seed-{seed}" / "activations.zarr")
    base_dir = traj.checkpoints["base"]
    results, bank, evalset = {}, None, None
    for arm in arms:
        folder = out / f"seed-{seed}" / arm
        done = folder / "result.json"
        if done.exists():
            results[arm] = json.loads(done.read_text())
            continue
        if bank is None:
            _, processor = organism.load_checkpoint(base_dir)
            bank = organism.ImageBank(processor, recipe.image_size, organism.render_seed(recipe), recipe.render_pool)
            evalset = organism.EvalSet(processor, recipe.image_size)
        model, processor, info = train_arm(arm, base_dir, recipe, bank, report, store, settings, progress)
        res = {**_evaluate(model, processor, evalset), **info}
        organism.save_checkpoint(model, processor, folder / "model")
        atomic_write(done, json.dumps(res, indent=2, ensure_ascii=False))
        results[arm] = res
    effects = arm_drift(seed, traj, demo_dir, out, arms, progress)
    for arm in arms:
        results[arm]["drift_effect_mean"] = float(np.mean(effects[arm]))
        results[arm]["drift_effect_by_layer"] = [float(v) for v in effects[arm]]
    return results


def arm_drift(seed: int, traj, demo_dir: Path, out: Path, arms, progress: bool = True) -> dict:
    """Per arm, the report's visual ``mmd`` (site hidden) by layer against the base."""
    from driftlens.capture import capture
    from driftlens.drift import drift
    from driftlens.probes import ProbeSet
    from driftlens.store import open_store

    probes = ProbeSet.load(demo_dir / "probes" / "organism-world")
    store = out / f"seed-{seed}" / "arms.zarr"
    ckpts = {"base": traj.checkpoints["base"], **{a: out / f"seed-{seed}" / a / "model" for a in arms}}
    capture(ckpts["base"], probes, ckpts, out=store, sites=("hidden",), batch_size=16, progress=progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = drift(open_store(store), reference="base", metrics=("mmd",), sites=("hidden",),
                       modalities=("visual",), progress=progress, out=out / f"seed-{seed}" / "arms_drift.nc")
    mmd = report["mmd"].sel(site="hidden", modality="visual")
    return {a: mmd.sel(checkpoint=a).values for a in arms}


# ----------------------------------------------------------------------------- all seeds

def run_experiment(out="driftlens-experiment", demo_dir=None, seeds=(0, 1, 2), arms=ARMS, cache=None,
                   settings: Settings | None = None, progress: bool = True) -> dict:
    """Run the experiment; returns the results, also written by :func:`write_outputs` into ``out``.

    Parameters
    ----------
    out : path
        Output folder (per-seed arm models, results, the arms' store and report).
    demo_dir : path, optional
        A ``driftlens demo`` output folder for the same seeds (its probe set, stores and reports:
        anchors and rank schedules come from them); default ``out/demo``, run when absent.
    seeds, arms : sequences
    cache : path, optional
        Organism cache root.
    settings : Settings, optional
    """
    from driftlens import organism

    settings = settings or Settings()
    arms = list(arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise UsageError(f"unknown arm(s) {unknown}; arms: {', '.join(ARMS)}")
    out = Path(out)
    demo_dir = Path(demo_dir) if demo_dir is not None else out / "demo"
    seeds = [int(s) for s in seeds]
    trajs = organism.build_seeds(seeds, progress=progress, cache=cache)
    _demo_inputs(demo_dir, seeds, cache, progress)
    per_seed = {}
    base = {"en_acc": [], "ko_acc": [], "ko_lm_loss": []}
    for seed, traj in zip(seeds, trajs):
        per_seed[seed] = run_seed(seed, traj, demo_dir, out, arms, settings, progress)
        ev = organism.evaluate(traj, progress=progress)
        base["en_acc"].append(ev["grounding_accuracy"]["base"]["en"])
        base["ko_acc"].append(ev["grounding_accuracy"]["base"]["ko"])
        base["ko_lm_loss"].append(ev["ko_lm_loss"]["base"])
    recipe = trajs[0].recipe
    n_layers = recipe.n_layers
    keys = ("en_acc", "ko_acc", "ko_lm_loss", "drift_effect_mean", "seconds_per_step")
    result = {
        "base": {k: float(np.mean(v)) for k, v in base.items()},
        "base_per_seed": base,
        "arms": {a: {**{k: [per_seed[s][a][k] for s in seeds] for k in keys},
                     "trainable": per_seed[seeds[0]][a]["trainable"],
                     "drift_effect_by_layer": [per_seed[s][a]["drift_effect_by_layer"] for s in seeds],
                     "mean_terms": [per_seed[s][a]["mean_terms"] for s in seeds]} for a in arms},
        "budget": settings.rank_per_module * len(LORA_TARGETS) * n_layers,
        "steps": settings.steps or recipe.adapt_steps,
        "seeds": seeds,
        "drift_metric": DRIFT_METRIC,
        "settings": dataclasses.asdict(settings),
        "organism": {"adapt_lr": recipe.adapt_lr, "batch_size": recipe.batch_size,
                     "adapt_image_fraction": recipe.adapt_image_fraction, "warmup": recipe.warmup},
    }
    write_outputs(result, out)
    return result


# ----------------------------------------------------------------------------- reading the result

REGULARIZED = ("lora_schedule_anchor_fixed", "lora_schedule_anchor_tracking", "lora_schedule_contrast")


def _ms(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def targets(result: dict, reference: str = "lora_uniform") -> dict:
    """The issue's targets for each regularized arm present, read as written down before the run.

    * ``english_kept``: mean English grounding >= the base's - 0.05;
    * ``korean_as_good``: mean Korean grounding >= the reference's mean - the larger of the two
      arms' standard deviations over seeds (the seeds' spread), and held-out Korean LM loss <= the
      reference's + that spread;
    * ``drift_halved``: mean final visual drift effect <= 0.5 x the reference's.
    """
    arms = result["arms"]
    if reference not in arms:
        return {}
    ref = arms[reference]
    out = {}
    for arm in (a for a in REGULARIZED if a in arms):
        a = arms[arm]
        en, _ = _ms(a["en_acc"])
        ko, ko_sd = _ms(a["ko_acc"])
        rko, rko_sd = _ms(ref["ko_acc"])
        lm, lm_sd = _ms(a["ko_lm_loss"])
        rlm, rlm_sd = _ms(ref["ko_lm_loss"])
        dr, _ = _ms(a["drift_effect_mean"])
        rdr, _ = _ms(ref["drift_effect_mean"])
        checks = {"english_kept": en >= result["base"]["en_acc"] - 0.05,
                  "korean_as_good": ko >= rko - max(ko_sd, rko_sd) and lm <= rlm + max(lm_sd, rlm_sd),
                  "drift_halved": dr <= 0.5 * rdr}
        out[arm] = {**checks, "all": all(checks.values()), "drift_change": dr / rdr - 1 if rdr > 0 else float("nan")}
    return out


def markdown_table(result: dict) -> str:
    """The result as a markdown table (mean ± standard deviation over seeds)."""
    base = result["base"]
    ref = result["arms"].get("lora_uniform")
    rdr = _ms(ref["drift_effect_mean"])[0] if ref else float("nan")
    header = ("| arm | EN grounding | KO grounding | KO LM loss (held-out) | visual drift (mean over layers) "
              "| vs lora_uniform | s / step |")
    lines = [header, "|---|---|---|---|---|---|---|",
             f"| base | {base['en_acc']:.3f} | {base['ko_acc']:.3f} | {base['ko_lm_loss']:.2f} | 0 | | |"]
    for arm, a in result["arms"].items():
        cells = []
        for key, fmt in (("en_acc", ".3f"), ("ko_acc", ".3f"), ("ko_lm_loss", ".2f"), ("drift_effect_mean", ".3f")):
            m, s = _ms(a[key])
            cells.append(f"{m:{fmt}}±{s:{fmt}}")
        dr = _ms(a["drift_effect_mean"])[0]
        change = f"{100 * (dr / rdr - 1):+.0f}%" if rdr > 0 else ""
        cells += [change, f"{_ms(a['seconds_per_step'])[0]:.3f}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_arms(result: dict, ax=None, chance: float | None = None):
    """English vs Korean grounding per arm, one point per seed, the arm's mean as a larger marker."""
    from driftlens.plot import OKABE_ITO, _new_axes

    if ax is None:
        ax = _new_axes((6.4, 5.0))
    colors = OKABE_ITO
    markers = "osD^v<>Ph"
    for i, (arm, a) in enumerate(result["arms"].items()):
        c, m = colors[i % len(colors)], markers[i % len(markers)]
        ax.scatter(a["en_acc"], a["ko_acc"], color=c, marker=m, s=22, alpha=0.55)
        ax.scatter([np.mean(a["en_acc"])], [np.mean(a["ko_acc"])], color=c, marker=m, s=90, edgecolor="black",
                   linewidth=0.8, label=arm)
    base = result["base"]
    ax.scatter([base["en_acc"]], [base["ko_acc"]], marker="*", s=200, color="black", label="base")
    ax.axvline(base["en_acc"] - 0.05, color="gray", ls="--", lw=0.8)
    ax.text(base["en_acc"] - 0.06, 0.02, "base EN - 5 points", color="gray", fontsize=8, va="bottom", ha="right",
            rotation=90)
    if chance is not None:
        ax.axhline(chance, color="gray", ls=":", lw=0.8)
        ax.axvline(chance, color="gray", ls=":", lw=0.8)
    ax.set_xlabel("English grounding accuracy")
    ax.set_ylabel("Korean grounding accuracy")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Korean adaptation arms ({len(result['seeds'])} seeds; small points: seeds, large: mean)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower left", ncols=2)
    return ax.figure


def write_outputs(result: dict, out) -> dict:
    """``regularizer.json``, ``regularizer.md`` (table + targets) and ``regularizer.png`` in ``out``."""
    from driftlens import organism, plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js = atomic_write(out / "regularizer.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    lines = [markdown_table(result), ""]
    for arm, t in targets(result).items():
        verdict = "met" if t["all"] else "not met"
        lines.append(f"- {arm}: targets {verdict} (English kept: {t['english_kept']}, Korean as good as "
                     f"lora_uniform: {t['korean_as_good']}, drift halved: {t['drift_halved']}; drift "
                     f"{100 * t['drift_change']:+.0f}% vs lora_uniform)")
    md = atomic_write(out / "regularizer.md", "\n".join(lines) + "\n")
    png = plot.save(plot_arms(result, chance=organism.chance_accuracy()), out / "regularizer.png")
    return {"json": js, "markdown": md, "figure": Path(png)}
