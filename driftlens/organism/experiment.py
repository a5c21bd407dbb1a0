"""The closed-loop regularizer experiment on the model organism (``driftlens experiment regularizer``).

From each seed's English base, the same Korean data stream (the organism's continuation stage,
:func:`driftlens.organism.continuation_batches`), the same steps, arms arranged as a **tree**: every
arm names its parent and the one factor (a field of :class:`ArmConfig`) it changes, so each arm is
judged against the arm it differs from in exactly that factor (:data:`TREE`, checked by
:func:`check_tree`)::

    lora_uniform                      LoRA, equal ranks on the attention projections (root)
    +-- lora_schedule                 ranks: the Korean-minus-control drift contrast, same budget
    |   +-- anchor_fixed              anchor: fixed, decoder-block outputs (hidden)
    |   +-- anchor_tracking           anchor: tracking (text frame), hidden
    |   +-- anchor_key                anchor: fixed, attention keys (the key projection's output)
    |   +-- contrast                  the grounding contrast (hinge)
    +-- viral                         VIRAL's alignment of a middle layer to the vision features
    +-- replay                        English image questions replace a share of the batches
        +-- replay_anchor             anchor: fixed, hidden
    full                              every LLM weight, the organism's lr (context, no parent)

The hyper-parameters (:class:`Settings`) and what is derived from the organism before any arm
trains (the rank schedules, the anchors' layer weights; :func:`prepare`) are written to
``<out>/settings.json`` first and refused if a later run would change them. Every (arm, seed) is
trained in a worker process and written atomically (``<out>/seed-<s>/<arm>/result.json``, its
merged model beside it); a rerun skips finished ones. Then, per seed, the arms' final models are
measured against the base (:func:`measure_arms`): the drift report's visual ``mmd`` per layer, the
per-scene visual-token displacement (:func:`driftlens.outcomes.cluster_displacement`) and its
association with the change of the scene's grounding gain, and the transfer accuracy of the base's
linear probes (:func:`driftlens.probing.linear_probe`). The across-seed reading is
:mod:`driftlens.organism.experiment_results`.
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

LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
ANCHORS = ("none", "fixed@hidden", "tracking@hidden", "fixed@key")
PROBE_ATTRIBUTES = ("color", "shape", "position")


@dataclass(frozen=True)
class ArmConfig:
    """What an arm is, one field per factor (two arms differ in a factor exactly when the field differs).

    Attributes
    ----------
    tuning : {"lora", "full"}
        ``lora``: adapters on the attention projections plus the projector, token embeddings and LM
        head (the new language's tokens need their rows), the LoRA learning rate; ``full``: every
        LLM weight, projector frozen, the organism's own learning rate. Vision tower frozen in both.
    ranks : {"uniform", "contrast", "none"}
        LoRA ranks: equal, or :func:`driftlens.allocate_ranks` from the Korean-minus-control
        contrast (``none`` for ``full``).
    anchor : str
        ``none`` or ``MODE@SITE`` of :class:`driftlens.AnchorDriftLoss` (:data:`ANCHORS`).
    contrast, viral, replay : bool
        The grounding contrast; VIRAL's alignment; English replay.
    """

    tuning: str = "lora"
    ranks: str = "uniform"
    anchor: str = "none"
    contrast: bool = False
    viral: bool = False
    replay: bool = False


@dataclass(frozen=True)
class Arm:
    """One arm: its name, its parent (``None``: a root or context arm), the factor it changes, its config."""

    name: str
    parent: str | None
    factor: str | None
    config: ArmConfig
    role: str = "arm"          # "root", "arm" or "context" (compared with nothing)


_S = ArmConfig(ranks="contrast")
TREE: tuple[Arm, ...] = (
    Arm("lora_uniform", None, None, ArmConfig(), "root"),
    Arm("lora_schedule", "lora_uniform", "ranks", _S),
    Arm("anchor_fixed", "lora_schedule", "anchor", dataclasses.replace(_S, anchor="fixed@hidden")),
    Arm("anchor_tracking", "lora_schedule", "anchor", dataclasses.replace(_S, anchor="tracking@hidden")),
    Arm("anchor_key", "lora_schedule", "anchor", dataclasses.replace(_S, anchor="fixed@key")),
    Arm("contrast", "lora_schedule", "contrast", dataclasses.replace(_S, contrast=True)),
    Arm("viral", "lora_uniform", "viral", ArmConfig(viral=True)),
    Arm("replay", "lora_uniform", "replay", ArmConfig(replay=True)),
    Arm("replay_anchor", "replay", "anchor", ArmConfig(replay=True, anchor="fixed@hidden")),
    Arm("full", None, None, ArmConfig(tuning="full", ranks="none"), "context"),
)
ARMS = tuple(a.name for a in TREE)
#: the order (arm, seed) units are trained in: the arms the issue's main questions need first
PRIORITY = ("lora_uniform", "lora_schedule", "anchor_fixed", "replay", "replay_anchor", "anchor_tracking",
            "anchor_key", "contrast", "viral", "full")


def arm(name: str) -> Arm:
    """The arm called ``name``."""
    for a in TREE:
        if a.name == name:
            return a
    raise UsageError(f"unknown arm {name!r}; arms: {', '.join(ARMS)}")


def config_diff(a: ArmConfig, b: ArmConfig) -> list[str]:
    """The :class:`ArmConfig` fields in which ``a`` and ``b`` differ."""
    return [f.name for f in dataclasses.fields(ArmConfig) if getattr(a, f.name) != getattr(b, f.name)]


def check_tree(tree=TREE) -> None:
    """Refuse a tree in which an arm's parent is unknown, or differs from it in anything but its factor."""
    names = [a.name for a in tree]
    if len(set(names)) != len(names):
        raise UsageError(f"arm names repeat: {names}")
    by = {a.name: a for a in tree}
    for a in tree:
        if a.config.anchor not in ANCHORS:
            raise UsageError(f"arm {a.name}: anchor {a.config.anchor!r} is not one of {ANCHORS}")
        if a.parent is None:
            if a.factor is not None or a.role not in ("root", "context"):
                raise UsageError(f"arm {a.name}: no parent, so no factor and role root or context")
            continue
        if a.parent not in by:
            raise UsageError(f"arm {a.name}: parent {a.parent!r} is not an arm")
        if by[a.parent].role == "context":
            raise UsageError(f"arm {a.name}: parent {a.parent!r} is context only")
        diff = config_diff(a.config, by[a.parent].config)
        if diff != [a.factor]:
            raise UsageError(f"arm {a.name} differs from its parent {a.parent} in {diff}, declared {a.factor!r}")


def tree_dict(arms=ARMS) -> list[dict]:
    """The tree as plain data (for the results file)."""
    return [{"arm": a.name, "parent": a.parent, "factor": a.factor, "role": a.role,
             "config": dataclasses.asdict(a.config)} for a in TREE if a.name in arms]


@dataclass(frozen=True)
class Settings:
    """The experiment's hyper-parameters; fixed before any arm ran (issue 25, 2026-12-06), not tuned on outcomes.

    Attributes
    ----------
    lora_lr : float
        Learning rate of every trainable parameter in the LoRA arms (constant after the organism's
        warmup, as the organism's stage); ``full`` keeps the organism's ``adapt_lr``.
    rank_per_module, min_rank, max_rank : int
        ``budget = rank_per_module x adapted modules``; the schedule's floor and ceiling.
    drift_weight, n_anchors : float, int
        Weight of :class:`~driftlens.AnchorDriftLoss` and its anchor count (the base's tokens of the
        seed's probe set). Its layer weights: the rank schedule's signal (the Korean-minus-control
        contrast at the last step, mean over the seeds, clipped at 0, normalized), for every site.
    contrast_weight, margin : float
        Weight and hinge margin (nats per answer token) of the grounding contrast. The base's
        per-row margin on the Korean image batches is small (seed 0, 384 rows: median 0.25, 90th
        percentile 0.82 nats) and organism-7's trained contrast arm reached means of 3.4-5.8; 4.0
        keeps the hinge active through training (its share of active steps is reported).
    viral_weight : float
        Weight of the VIRAL alignment (VIRAL's own 0.5), at layer ``n_layers // 2``.
    replay_fraction : float
        Share of steps whose batch is replaced by English image questions in the replay arms.
    steps : int, optional
        Training steps (default: the organism's ``adapt_steps``).
    n_bootstrap : int
        Scene-bootstrap draws of the per-scene outcomes (the drift report's own draws for drift).
    """

    lora_lr: float = 2e-3
    rank_per_module: int = 8
    min_rank: int = 2
    max_rank: int = 64
    drift_weight: float = 1.0
    n_anchors: int = 1024
    contrast_weight: float = 1.0
    margin: float = 4.0
    viral_weight: float = 0.5
    replay_fraction: float = 0.1
    steps: int | None = None
    n_bootstrap: int = 1000


# ----------------------------------------------------------------------------- one arm

def trainable_parameters(model, arm_name: str) -> list:
    """Set ``requires_grad`` for the arm and return the trainable parameters (vision tower frozen)."""
    full = arm(arm_name).config.tuning == "full"
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


def describe_trainable(model, arm_name: str, schedule=None) -> str:
    """What an arm trains, in words (for the result's ``trainable``)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if arm(arm_name).config.tuning == "full":
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
        from driftlens.train.tap import VisualTap

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



@dataclass
class Prepared:
    """One arm of one seed, ready to train: everything :func:`train_arm` steps with."""

    model: object
    processor: object
    params: list
    objective: object
    viral: object
    batches: object
    schedule: object
    lr: float
    steps: int
    warmup: int
    trainable: str


def _objective(config: ArmConfig, model, settings: Settings, plan: dict, seed: int):
    from driftlens.train.anchor import AnchorDriftLoss
    from driftlens.train.objective import DriftObjective

    drift = None
    if config.anchor != "none":
        mode, site = config.anchor.split("@")
        weights = {int(k): float(v) for k, v in plan["anchor_layer_weights"].items()}
        store = plan["stores"][str(seed)]["key" if site == "key" else "hidden"]
        drift = AnchorDriftLoss.from_store(store, "base", layers=sorted(weights), mode=mode,
                                           n_anchors=settings.n_anchors, weights=weights, site=site, seed=seed)
    return DriftObjective(model, drift, drift_weight=settings.drift_weight if drift is not None else 0.0,
                          contrast_weight=settings.contrast_weight if config.contrast else 0.0,
                          margin=settings.margin)


def _batches(arm_name: str, processor, bank, recipe, settings: Settings):
    from driftlens import organism

    korean = organism.continuation_batches(processor, bank, recipe, "ko")
    if not arm(arm_name).config.replay:
        return korean
    rng = random.Random(f"{recipe.seed}-replay")

    def batch(step):
        b = korean(step)                 # drawn every step: the Korean stream stays the other arms'
        if rng.random() < settings.replay_fraction:
            return bank.question_batch(rng, "en", recipe.batch_size)
        return b

    return batch


def prepare_arm(arm_name: str, base_dir, recipe, bank, plan: dict, settings: Settings) -> Prepared:
    """The arm's model (PEFT-wrapped for LoRA), optimizer parameters, objective and batch stream."""
    import torch

    from driftlens import organism
    from driftlens.schedule import RankSchedule

    config = arm(arm_name).config
    torch.manual_seed(recipe.seed)
    model, processor = organism.load_checkpoint(base_dir)
    schedule = None
    if config.tuning == "lora":
        schedule = RankSchedule.load(plan["schedules"][config.ranks])
        model = schedule.get_peft_model(model, lora_dropout=0.0)
    params = trainable_parameters(model, arm_name)
    trainable = describe_trainable(model, arm_name, schedule)
    objective = _objective(config, model, settings, plan, recipe.seed)
    viral = ViralAlignment(model, recipe.n_layers // 2) if config.viral else None
    if viral is not None:
        params = params + list(viral.head.parameters())
    lr = recipe.adapt_lr if config.tuning == "full" else settings.lora_lr
    return Prepared(model, processor, params, objective, viral, _batches(arm_name, processor, bank, recipe, settings),
                    schedule, lr, int(plan["steps"]), recipe.warmup, trainable)


def train_arm(arm_name: str, base_dir, recipe, bank, plan: dict, settings: Settings, progress: bool = True):
    """Train one arm from the base in ``base_dir``; returns ``(merged model, processor, info)``.

    ``info``: seconds per step (the training step only), steps, image steps, the learning rate, what
    is trained, the mean of every logged term, the share of image steps whose contrast hinge was
    active (non-zero), the ranks.
    """
    import torch
    from tqdm.auto import tqdm

    p = prepare_arm(arm_name, base_dir, recipe, bank, plan, settings)
    model, objective, viral = p.model, p.objective, p.viral
    opt = torch.optim.AdamW(p.params, lr=p.lr, weight_decay=0.0)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    model.train()
    seconds, image_steps, hinge_active = 0.0, 0, 0
    for step in tqdm(range(p.steps), desc=f"seed {recipe.seed}: {arm_name}", disable=not progress, leave=False):
        for g in opt.param_groups:
            g["lr"] = min(p.lr, p.lr * (step + 1) / p.warmup)
        batch = p.batches(step)
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
        hinge_active += int(terms.get("contrast_loss", 0.0) > 0)
        for k, v in terms.items():
            if "/" not in k:
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        if not math.isfinite(terms["loss"]):
            raise FloatingPointError(f"seed {recipe.seed}, arm {arm_name}: the loss is {terms['loss']} at step {step}")
    objective.detach()
    if viral is not None:
        viral.detach()
    model.eval()
    if p.schedule is not None:
        model = model.merge_and_unload()
    info = {"seconds_per_step": seconds / p.steps, "steps": p.steps, "image_steps": image_steps, "lr": p.lr,
            "trainable": p.trainable, "mean_terms": {k: sums[k] / counts[k] for k in sums},
            "hinge_active_share": hinge_active / image_steps if arm(arm_name).config.contrast and image_steps
            else None,
            "ranks": None if p.schedule is None else {k: int(v) for k, v in p.schedule.ranks.items()}}
    return model, p.processor, info


# ----------------------------------------------------------------------------- before any arm: the plan

def _examples(seeds, cache, progress: bool) -> dict:
    """Each seed's measured example (store and report across base, ko-k, en-k), built when missing."""
    from driftlens.organism.example import example

    return {s: example(s, cache=cache, progress=progress) for s in seeds}


def prepare(out: Path, seeds, trajs, arms, settings: Settings, cache, progress: bool) -> dict:
    """Derive what the arms need from the organism, before any arm trains; write ``settings.json``.

    The rank schedules (uniform, and from the Korean-minus-control contrast at the last step, mean
    over the seeds' reports), the anchors' layer weights (the same contrast profile, clipped at 0,
    normalized), the stores the anchors come from (each seed's example store; for key anchors the
    base's keys on the same probe set, captured here). A ``settings.json`` already in ``out``
    with other settings or another derivation is refused: the settings are fixed once.
    """
    from driftlens.capture import capture
    from driftlens.compare import combine_runs, contrast_label, contrasts
    from driftlens.ranks import allocate_ranks
    from driftlens.report import load_report

    out.mkdir(parents=True, exist_ok=True)
    ex = _examples(seeds, cache, progress)
    recipe = trajs[0].recipe
    pair = (f"ko-{recipe.n_checkpoints}", f"en-{recipe.n_checkpoints}")
    runs = combine_runs({f"seed-{s}": load_report(ex[s].report) for s in seeds})
    runs = runs.merge(contrasts(runs, [pair], metrics=["mmd"]))
    budget = settings.rank_per_module * len(LORA_TARGETS) * recipe.n_layers
    kw = dict(budget=budget, signal="mmd", min_rank=settings.min_rank, max_rank=settings.max_rank,
              modules=list(LORA_TARGETS), contrast=contrast_label(*pair))
    paths, layer_ranks = {}, {}
    for name, rule in (("uniform", "uniform"), ("contrast", "proportional")):
        sched = allocate_ranks(runs, rule=rule, **kw)
        paths[name] = str(sched.save(out / f"ranks_{name}.json"))
        layer_ranks[name] = [int(r) for r in sched.layer_ranks()]
    c = runs["mmd_contrast"].sel(site="hidden", modality="visual")
    profile = c.mean("run").squeeze("contrast", drop=True)                      # [layer]
    vals = np.clip(profile.values.astype(np.float64), 0.0, None)
    vals = np.ones_like(vals) if vals.sum() <= 0 else vals
    weights = {str(int(la)): float(v) for la, v in zip(profile.layer.values, vals / vals.sum())}
    stores = {}
    need_keys = any(arm(a).config.anchor.endswith("@key") for a in arms)
    for s, traj in zip(seeds, trajs):
        entry = {"hidden": str(ex[s].store), "report": str(ex[s].report), "probes": str(ex[s].probes),
                 "organism": str(traj.root)}
        if need_keys:
            keys = out / f"seed-{s}" / "base_keys.zarr"
            capture(traj.checkpoints["base"], ex[s].probes, {"base": traj.checkpoints["base"]}, out=keys,
                    sites=("key",), batch_size=16, progress=progress)
            entry["key"] = str(keys)
        stores[str(s)] = entry
    plan = {"settings": dataclasses.asdict(settings), "seeds": [int(s) for s in seeds],
            "steps": int(settings.steps or recipe.adapt_steps), "budget": budget,
            "contrast": contrast_label(*pair), "contrast_profile": [float(v) for v in profile.values],
            "layer_ranks": layer_ranks,
            "schedules": paths, "anchor_layer_weights": weights, "stores": stores,
            "organism": {"code_version": recipe.code_version, "adapt_lr": recipe.adapt_lr,
                         "batch_size": recipe.batch_size, "adapt_image_fraction": recipe.adapt_image_fraction,
                         "warmup": recipe.warmup, "adapt_steps": recipe.adapt_steps, "n_layers": recipe.n_layers}}
    _fix(out / "settings.json", plan)
    return {**plan, "written": json.loads((out / "settings.json").read_text(encoding="utf-8"))["written"]}


_FIXED = ("settings", "seeds", "steps", "budget", "contrast", "layer_ranks", "anchor_layer_weights")


def _fix(path: Path, plan: dict) -> None:
    """Write the plan once; refuse a later run whose fixed part differs."""
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in _FIXED if json.dumps(old.get(k), sort_keys=True) != json.dumps(plan.get(k), sort_keys=True)]
        if diff:
            raise UsageError(f"{path} fixed {', '.join(diff)} before the first arm ran, and this run would change "
                             f"them ({', '.join(f'{k}: {old.get(k)!r} -> {plan.get(k)!r}' for k in diff[:2])}); "
                             f"the settings are fixed once: use a new --out for other settings or seeds")
        return
    plan = {**plan, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(path, json.dumps(plan, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- one (arm, seed)

def result_path(out: Path, seed: int, arm_name: str) -> Path:
    """Where a finished (arm, seed) is recorded (written last, atomically: its presence means done)."""
    return Path(out) / f"seed-{seed}" / arm_name / "result.json"


def run_unit(arm_name: str, seed: int, out, cache=None, progress: bool = False, threads: int | None = None) -> dict:
    """Train and evaluate one (arm, seed) from ``<out>/settings.json``; skipped when already done."""
    import torch

    from driftlens import organism
    from driftlens.organism.evaluation import EvalSet, evaluate_model

    out = Path(out)
    done = result_path(out, seed, arm_name)
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    if threads:
        torch.set_num_threads(int(threads))
    plan = json.loads((out / "settings.json").read_text(encoding="utf-8"))
    settings = Settings(**plan["settings"])
    traj = organism.build_seeds([seed], progress=False, cache=cache)[0]
    recipe = traj.recipe
    _, processor = organism.load_checkpoint(traj.checkpoints["base"])
    bank = organism.training_bank(processor, recipe)
    t0 = time.perf_counter()
    model, processor, info = train_arm(arm_name, traj.checkpoints["base"], recipe, bank, plan, settings, progress)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = evaluate_model(model, processor, EvalSet(processor, recipe.image_size))
    res = {"arm": arm_name, "seed": int(seed), **ev, **info, "train_seconds": round(train_s, 1),
           "eval_seconds": round(time.perf_counter() - t0, 1)}
    organism.save_checkpoint(model, processor, done.parent / "model")
    atomic_write(done, json.dumps(res, ensure_ascii=False) + "\n")
    return res


def _unit_in_worker(args) -> tuple[str, int, float]:
    arm_name, seed, out, cache = args
    t0 = time.perf_counter()
    run_unit(arm_name, seed, out, cache, progress=False, threads=1)
    return arm_name, seed, time.perf_counter() - t0


def run_units(units, out: Path, cache, jobs: int, progress: bool) -> None:
    """Train the (arm, seed) units not yet done, ``jobs`` worker processes at a time (1 torch thread each)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    todo = [(a, s) for a, s in units if not result_path(out, s, a).exists()]
    if not todo:
        return
    if jobs <= 1:
        for a, s in todo:
            t0 = time.perf_counter()
            run_unit(a, s, out, cache, progress=progress)
            _say(progress, f"seed {s}, {a}: {time.perf_counter() - t0:.0f} s")
        return
    env_cache = None if cache is None else str(cache)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_unit_in_worker, (a, s, str(out), env_cache)) for a, s in todo]
        try:
            for i, f in enumerate(as_completed(futures), 1):
                a, s, sec = f.result()
                _say(progress, f"[{i}/{len(todo)}] seed {s}, {a}: {sec:.0f} s")
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _say(progress: bool, text: str) -> None:
    if progress:
        import sys

        print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- one seed: the arms against the base

def measure_arms(seed: int, traj, plan: dict, out: Path, arms, settings: Settings, progress: bool = False) -> dict:
    """The arms' final models against the base on the seed's probe set; cached in ``measures.json``.

    ``drift``: the report's visual ``mmd`` (site hidden) per layer and its cluster-bootstrap draws
    of the mean over layers; ``displacement``: per layer and scene
    (:func:`driftlens.outcomes.cluster_displacement`); ``association``: per language, the Spearman
    association across scenes between the last layer's displacement and the change of the scene's
    grounding gain (log-likelihood, base -> arm; :func:`driftlens.outcomes.association`);
    ``probe_transfer``: per attribute and layer, the accuracy of the base's linear probe
    (:func:`driftlens.probing.linear_probe`, reference ``base``, image-pooled visual tokens) on the arm.
    """
    from driftlens import organism
    from driftlens.capture import capture
    from driftlens.drift import drift
    from driftlens.organism.labels import world_label
    from driftlens.outcomes import association, cluster_displacement
    from driftlens.probing import linear_probe
    from driftlens.store import open_store

    folder = out / f"seed-{seed}"
    cached = folder / "measures.json"
    if cached.exists():
        m = json.loads(cached.read_text(encoding="utf-8"))
        if set(m.get("arms", [])) >= set(arms):
            return m
    seconds = {}
    tick = time.perf_counter()
    ckpts = {"base": traj.checkpoints["base"], **{a: folder / a / "model" for a in arms}}
    store = folder / "arms.zarr"
    capture(ckpts["base"], plan["stores"][str(seed)]["probes"], ckpts, out=store, sites=("hidden",), batch_size=16,
            progress=progress)
    ds = open_store(store)
    seconds["capture"] = time.perf_counter() - tick
    tick = time.perf_counter()
    with warnings.catch_warnings():        # effects and cluster-bootstrap draws; no permutation test (see drift)
        warnings.simplefilter("ignore")
        report = drift(ds, reference="base", metrics=("mmd",), sites=("hidden",), modalities=("visual",),
                       n_permutations=1, correction=None, n_bootstrap=settings.n_bootstrap, progress=progress,
                       out=folder / "arms_drift.nc")
    mmd = report["mmd"].sel(site="hidden", modality="visual")
    boot = report["mmd_boot"].sel(site="hidden", modality="visual")
    seconds["drift"] = time.perf_counter() - tick
    tick = time.perf_counter()
    ev = organism.evaluate(traj, progress=False)
    scenes = ev["scenes"]
    m = {"arms": list(arms), "drift": {}, "drift_boot_mean": {}, "displacement": {}, "association": {},
         "probe_transfer": {}, "scenes": scenes}
    for a in list(arms):
        res = json.loads(result_path(out, seed, a).read_text(encoding="utf-8"))
        m["drift"][a] = [float(v) for v in mmd.sel(checkpoint=a).values]
        m["drift_boot_mean"][a] = [float(v) for v in boot.sel(checkpoint=a).mean("layer").values]
        disp = cluster_displacement(ds, "base", a)                                  # [layer, cluster]
        by_scene = {str(c): [float(v) for v in disp.sel(cluster=c).values] for c in disp.cluster.values}
        m["displacement"][a] = by_scene
        last = {c: v[-1] for c, v in by_scene.items()}
        m["association"][a] = {}
        for lang in ("en", "ko"):
            change = {k: res["per_scene"][lang]["gain_logprob"][i] - ev["per_scene"]["base"][lang]["gain_logprob"][i]
                      for i, k in enumerate(scenes)}
            m["association"][a][lang] = association(last, change, seed=seed)._asdict()
    seconds["displacement_association"] = time.perf_counter() - tick
    tick = time.perf_counter()
    for attr in PROBE_ATTRIBUTES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pr = linear_probe(ds, world_label(attr), reference="base", checkpoints=["base", *arms], n_shuffles=0,
                              seed=0, progress=False)
        for a in ["base", *arms]:
            m["probe_transfer"].setdefault(a, {})[attr] = [float(v) for v in pr["transfer"].sel(checkpoint=a).values]
    seconds["probe"] = time.perf_counter() - tick
    m["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    atomic_write(cached, json.dumps(m) + "\n")
    return m


# ----------------------------------------------------------------------------- all seeds

def run_experiment(out="driftlens-experiment", seeds=(0, 1, 2, 3, 4), arms=ARMS, cache=None,
                   settings: Settings | None = None, jobs: int = 2, progress: bool = True) -> dict:
    """Run the experiment; returns the results, also written by
    :func:`driftlens.organism.experiment_results.write_outputs` into ``out``.

    Parameters
    ----------
    out : path
        Output folder (``settings.json``, per-seed arm models and results, the arms' stores and reports).
    seeds, arms : sequences
        Organism seeds (at least 2 for the across-seed inference) and arms (:data:`ARMS`; an arm's
        parent is added when missing).
    cache : path, optional
        Organism cache root; each seed's measured example (store, report) lives there too.
    settings : Settings, optional
    jobs : int
        Worker processes training (arm, seed) units at once (1 torch thread each).
    """
    from driftlens import organism
    from driftlens.organism.experiment_results import assemble, write_outputs

    check_tree()
    settings = settings or Settings()
    arms = _with_parents(arms)
    out = Path(out)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds must be distinct and at least one, got {seeds}")
    trajs = organism.build_seeds(seeds, progress=progress, cache=cache)
    plan = prepare(out, seeds, trajs, arms, settings, cache, progress)
    order = sorted(arms, key=PRIORITY.index)
    run_units([(a, s) for a in order for s in seeds], out, cache, jobs, progress)
    measures = {s: measure_arms(s, t, plan, out, order, settings, progress) for s, t in zip(seeds, trajs)}
    results = {s: {a: json.loads(result_path(out, s, a).read_text(encoding="utf-8")) for a in order} for s in seeds}
    base = {s: organism.evaluate(t, progress=False) for s, t in zip(seeds, trajs)}
    result = assemble(plan, order, results, measures, base)
    write_outputs(result, out)
    return result


def _with_parents(arms) -> list[str]:
    names = []
    for name in arms:
        a = arm(name)
        chain = []
        while a is not None:
            chain.append(a.name)
            a = arm(a.parent) if a.parent else None
        names += [n for n in reversed(chain) if n not in names]
    return names
