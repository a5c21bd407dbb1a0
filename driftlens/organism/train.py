"""The model organism: a tiny bilingual LLaVA whose Korean adaptation really drifts.

A ``LlavaForConditionalGeneration`` (CLIP-style vision tower, Llama decoder) is trained here,
on CPU, in minutes, on the :mod:`driftlens.organism.shapes` world, once per seed:

1. **base** -- English color / shape / position questions about rendered scenes (all weights
   train; the best state on *validation* renderings is kept);
2. **Korean adaptation** -- from the base, text-heavy Korean data (captions, question/answer
   text, plain sentences) with a share of Korean image questions; the vision tower and
   projector are frozen, as in language adaptation of a real VLM, so the visual tokens entering
   the LLM do not change -- only the LLM that reads them does. Checkpoints ``ko-1 ... ko-N``;
3. **English control** -- from the same base, the same optimizer, steps, learning rate,
   trainable parameters and image/text mix (the same sequence of batch kinds and scenes) in
   English: checkpoints ``en-1 ... en-N``. Drift along the control is what any fine-tuning
   does; drift beyond it is the language change.

Every stage trains on the 54 seen scenes only: the 18 held-out scenes
(:func:`~driftlens.organism.shapes.heldout_scenes`) are in no batch of any stage, language or
task, and no training image equals an evaluation, validation or probe image (pixel hash; see
:mod:`driftlens.organism.data`). Every checkpoint is evaluated at build time
(:mod:`driftlens.organism.evaluation`, ``evaluation.json``): grounding on one new rendering per
scene of all 72 (seen and held-out reported apart) with the true image, a mismatched image and
no image, per scene; English and Korean LM loss on held-out text. Training this small model is
chaotic -- figures differ between seeds, CPUs and thread counts -- so every figure of the
organism is a mean over seeds with its spread (:func:`build_seeds`; lab notes and measurements
in ``bench/RESULTS.md``).

Every checkpoint is a real model directory (safetensors, config, tokenizer, processor with a
chat template) loaded back through :mod:`driftlens.sources`. The trajectory is cached under
``$DRIFTLENS_CACHE`` (or ``$XDG_CACHE_HOME/driftlens``, or ``~/.cache/driftlens``) in
``organism/<recipe hash>/``, built in a temporary folder and renamed, so an interrupted build
leaves nothing half-written; it is rebuilt only when the recipe changes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from driftlens.errors import DataError, UsageError
from driftlens.organism import shapes
from driftlens.organism.data import (  # noqa: F401 - re-exported: organism.train.X as before
    EN_SENTENCES,
    HELDOUT_KO_SENTENCES,
    HELDOUT_KO_TEMPLATES,
    KO_SENTENCES,
    PROMPT_CAPTION,
    QA_TEXT,
    SENTENCES,
    TRAIN_SEEDS,
    VALIDATION_SEEDS,
    Step,
    TrainingRenders,
    base_plan,
    continuation_plan,
    corpus,
    question_step,
    text_pool,
    validation_render_seeds,
)

CODE_VERSION = "organism-9"
STAGE_PREFIX = {"ko": "ko", "en": "en"}


@dataclass(frozen=True)
class Recipe:
    """Everything that determines one organism build; its hash names the cache folder.

    Attributes
    ----------
    seed : int
        Seeds the weights, the data stream and the training renderings.
    image_size, patch_size : int
        32 px images in 8 px patches: 16 visual tokens per image.
    vision_hidden, vision_layers : int
        CLIP vision tower width and depth.
    hidden, n_layers, heads, kv_heads : int
        Llama decoder width, depth, attention and key/value heads.
    vocab_size : int
        Byte-level BPE vocabulary (English and Korean of the world).
    batch_size : int
        Examples per step, every stage.
    render_pool : int
        Training renderings per seen scene, rendered once per build (seeds below ``TRAIN_SEEDS``,
        never an evaluation, validation or probe image: :class:`~driftlens.organism.data.TrainingRenders`).
    base_steps, base_lr, base_check_every, base_target : int, float, int, float
        English base stage (all weights, cosine schedule): at most ``base_steps`` steps,
        English grounding checked every ``base_check_every`` steps on *validation* renderings
        of the seen scenes (never the evaluation ones), the best state kept, early stop at
        ``base_target``.
    base_text_fraction : float
        Share of base batches that are English text (captions, question/answer text, plain
        sentences of the seen scenes); the rest are English image questions. 0 (organism-9):
        with 0.2 the English control's visual drift exceeded the Korean adaptation's (two seeds,
        ``bench/RESULTS.md``), so the base learns English from image questions only.
    adapt_steps, adapt_lr : int, float
        Both continuation stages (Korean adaptation and the English control): steps and the
        constant learning rate after ``warmup`` steps; vision tower and projector frozen.
    adapt_image_fraction : float
        Share of continuation batches that are image questions (in the stage's language); the
        rest are text-only batches (captions, question/answer text, plain sentences).
    n_checkpoints : int
        Checkpoints saved along each continuation stage (``ko-1 ...``, ``en-1 ...``).
    warmup : int
        Linear warmup steps of every stage.
    """

    seed: int = 0
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    hidden: int = 96
    n_layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 700
    batch_size: int = 32
    render_pool: int = 24
    base_steps: int = 1200
    base_lr: float = 1e-3
    base_check_every: int = 200
    base_target: float = 0.97
    base_text_fraction: float = 0.0
    adapt_steps: int = 600
    adapt_lr: float = 1e-3
    adapt_image_fraction: float = 0.3
    n_checkpoints: int = 5
    warmup: int = 30
    code_version: str = CODE_VERSION

    def key(self) -> str:
        """The first 12 hex digits of the recipe's SHA-256: the cache folder name."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class Trajectory:
    """A built organism: the Korean trajectory and its English control, from one base.

    Attributes
    ----------
    root : Path
    checkpoints : dict
        ``{"base": dir, "ko-1": dir, ...}``: the Korean adaptation, in order.
    control : dict
        ``{"base": dir, "en-1": dir, ...}``: the English continuation with the same optimizer,
        steps, learning rate, trainable parameters and image/text mix.
    recipe : Recipe
    build_seconds : float
    """

    root: Path
    checkpoints: dict = field(default_factory=dict)
    control: dict = field(default_factory=dict)
    recipe: Recipe = field(default_factory=Recipe)
    build_seconds: float = 0.0

    @property
    def seed(self) -> int:
        """The recipe's seed."""
        return self.recipe.seed

    @property
    def all_checkpoints(self) -> dict:
        """Every checkpoint once: base, the Korean ones, then the control's."""
        return {**self.checkpoints, **{k: v for k, v in self.control.items() if k != "base"}}


def cache_root() -> Path:
    """``$DRIFTLENS_CACHE``, else ``$XDG_CACHE_HOME/driftlens``, else ``~/.cache/driftlens``."""
    if os.environ.get("DRIFTLENS_CACHE"):
        return Path(os.environ["DRIFTLENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "driftlens"


# ----------------------------------------------------------------------------- model

def make_processor(recipe: Recipe):
    """A real ``LlavaProcessor`` built offline (CLIP image processor, BPE tokenizer, chat template)."""
    from transformers import (  # the PIL backend: no torchvision
        CLIPImageProcessorPil,
        LlavaProcessor,
    )

    from driftlens.inputs import chat_template
    from driftlens.organism.tokenizer import build_tokenizer

    tok = build_tokenizer(corpus=corpus(), vocab_size=recipe.vocab_size, extra_special_tokens=("<image>",))
    tok._set_model_specific_special_tokens({"image_token": "<image>"})
    tok.padding_side = "right"
    size = recipe.image_size
    ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    template = chat_template("USER: ", "<image>\n", " ", "ASSISTANT:", "</s>")
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=recipe.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=template)


def make_model(recipe: Recipe, tokenizer):
    """A randomly initialized ``LlavaForConditionalGeneration`` (CLIP vision tower, Llama decoder)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = {"model_type": "clip_vision_model", "hidden_size": recipe.vision_hidden,
              "intermediate_size": 2 * recipe.vision_hidden, "num_hidden_layers": recipe.vision_layers,
              "num_attention_heads": recipe.heads, "image_size": recipe.image_size,
              "patch_size": recipe.patch_size, "projection_dim": recipe.vision_hidden}
    text = {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": recipe.hidden,
            "intermediate_size": 2 * recipe.hidden, "num_hidden_layers": recipe.n_layers,
            "num_attention_heads": recipe.heads, "num_key_value_heads": recipe.kv_heads,
            "max_position_embeddings": 256, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    cfg = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(recipe.image_size // recipe.patch_size) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg)


def _prompt(processor, prompt: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def encode_image_examples(processor, images, prompts, answers, eos: bool = True):
    """Model inputs and labels (answer tokens only) for image + prompt -> answer examples.

    The prompt goes through the processor (the real path: chat template, image-token
    expansion, pixel values); answer tokens are appended, so labels mark exactly them.
    """
    enc = processor(text=[_prompt(processor, p) for p in prompts], images=[[im] for im in images],
                    return_tensors="pt", padding=True)
    rows, labels = [], []
    for j, ans in enumerate(answers):
        n = int(enc["attention_mask"][j].sum())
        ids, lab = _append_answer(processor.tokenizer, enc["input_ids"][j, :n].tolist(), ans, eos)
        rows.append(ids)
        labels.append(lab)
    return {**_pad(processor.tokenizer, rows, labels), "pixel_values": enc["pixel_values"]}


def _append_answer(tok, prompt_ids: list[int], answer: str, eos: bool) -> tuple[list[int], list[int]]:
    a = tok(" " + answer + (tok.eos_token if eos else ""), add_special_tokens=False)["input_ids"]
    return prompt_ids + a, [-100] * len(prompt_ids) + a


def _pad(tok, rows: list[list[int]], labels: list[list[int]]) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` [B, T]."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, (r, lb) in enumerate(zip(rows, labels)):
        input_ids[j, :len(r)] = torch.tensor(r)
        lab[j, :len(lb)] = torch.tensor(lb)
        mask[j, :len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": lab}


def encode_text(processor, texts):
    """Text-only LM inputs (no image), labels on every token."""
    tok = processor.tokenizer
    enc = tok([t + tok.eos_token for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


class ImageBank:
    """Pre-encoded image questions: the text of every (scene, language, question) tokenized once,
    renderings of every scene preprocessed once; a batch is an index gather.

    The ids are those :func:`encode_image_examples` produces (tested), so training and evaluation
    go through the real processor's layout without paying for it at every step.

    Parameters
    ----------
    processor : LlavaProcessor
    size : int
        Image side in pixels.
    render_seeds : callable ``(scene index, j) -> int``
        Render seed of rendering ``j`` of scene ``k`` (index into ``scenes``).
    n_renders : int
        Renderings per scene.
    scenes : list of Scene, optional
        The scenes of the bank; default the seen scenes (:func:`shapes.seen_scenes`): a training
        bank never holds a held-out scene.
    """

    def __init__(self, processor, size: int, render_seeds, n_renders: int, scenes=None):
        self.processor, self.tok = processor, processor.tokenizer
        self.scenes = list(shapes.seen_scenes() if scenes is None else scenes)
        self.render_seeds = [[int(render_seeds(k, j)) for j in range(n_renders)] for k in range(len(self.scenes))]
        imgs = [shapes.render(s, size, seed=self.render_seeds[k][j]) for k, s in enumerate(self.scenes)
                for j in range(n_renders)]
        px = processor.image_processor(imgs, return_tensors="pt")["pixel_values"]
        self.pixels = px.reshape(len(self.scenes), n_renders, *px.shape[1:])      # [S, R, 3, H, W]
        self._prefix_cache: dict[str, list[int]] = {}

    @property
    def n_renders(self) -> int:
        """Renderings per scene."""
        return int(self.pixels.shape[1])

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the chat-templated prompt with the image placeholder expanded."""
        if prompt not in self._prefix_cache:
            enc = self.processor(text=[_prompt(self.processor, prompt)], images=[[self._blank()]],
                                 return_tensors="pt")
            self._prefix_cache[prompt] = enc["input_ids"][0].tolist()
        return self._prefix_cache[prompt]

    def _blank(self):
        from PIL import Image

        return Image.new("RGB", (self.pixels.shape[-1], self.pixels.shape[-2]))

    def text_rows(self, items, eos: bool = True) -> dict:
        """``input_ids``, ``attention_mask``, ``labels`` [B, T] of ``items`` = [(_, _, prompt, answer)]."""
        rows, labels = [], []
        for _, _, prompt, answer in items:
            ids, lab = _append_answer(self.tok, self.prompt_ids(prompt), answer, eos)
            rows.append(ids)
            labels.append(lab)
        return _pad(self.tok, rows, labels)

    def batch(self, items, eos: bool = True) -> dict:
        """Inputs for ``items`` = [(scene index, rendering, prompt, answer)]."""
        import torch

        px = torch.stack([self.pixels[k, j] for k, j, _, _ in items])
        return {**self.text_rows(items, eos), "pixel_values": px}

    def question_batch(self, rng: random.Random, lang: str, n: int) -> dict:
        """``n`` random (scene, rendering, question) examples in ``lang`` (:func:`data.question_step`)."""
        return self.batch(question_step(rng, lang, self.scenes, n, self.n_renders).items)

    def encode(self, step: Step) -> dict:
        """Model inputs of one :class:`~driftlens.organism.data.Step` (image questions or text)."""
        if step.kind == "image":
            if list(step.scenes) != [self.scenes[k] for k, *_ in step.items]:
                raise UsageError("a batch's scene indices do not point at its scenes in this image bank")
            return self.batch(step.items)
        return encode_text(self.processor, list(step.items))


# ----------------------------------------------------------------------------- training

def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train(model, batches, steps: int, lr: float, warmup: int, params, report, stage: str, on_step=None,
           constant: bool = False):
    """``steps`` AdamW steps on ``batches(step)``; ``report(stage, step, steps, note)`` (or None) hears of them."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    note = ""
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = min(lr, lr * (step + 1) / warmup) if constant else _lr(step, steps, lr, warmup)
        batch = batches(step)
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if report is not None:
            if step % 20 == 0:
                note = f"loss {loss.item():.3f}"
            report(stage, step + 1, steps, note)
        if on_step is not None and on_step(step + 1):
            break
    model.eval()


def save_checkpoint(model, processor, path: Path) -> Path:
    """Save model and processor into ``path`` (a real model directory)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def render_seed(recipe: Recipe) -> TrainingRenders:
    """``(seen scene index, rendering) -> render seed`` of the recipe's training renderings
    (:class:`~driftlens.organism.data.TrainingRenders`: never a reserved image)."""
    return TrainingRenders(recipe.seed, recipe.image_size)


def training_bank(processor, recipe: Recipe) -> ImageBank:
    """The recipe's training images: ``recipe.render_pool`` renderings of every seen scene."""
    return ImageBank(processor, recipe.image_size, render_seed(recipe), recipe.render_pool)


def validation_set(processor, recipe: Recipe, langs=("en",)):
    """The base stage's model-selection questions: one validation rendering per seen scene."""
    from driftlens.organism.evaluation import EvalSet

    renders = list(zip(shapes.seen_scenes(), validation_render_seeds(recipe.image_size)))
    return EvalSet(processor, recipe.image_size, renders=renders, langs=langs, conditions=("true",))


STAGE_NAMES = {"base": "English base", "ko": "Korean adaptation", "en": "English control"}


def _train_trajectory(recipe: Recipe, tmp: Path, progress) -> tuple[dict, dict, dict]:
    """Train base, Korean adaptation and English control into ``tmp``; returns
    (Korean checkpoints, control checkpoints, base-stage info). ``progress``: a reporter or None."""
    import torch

    report = progress if callable(progress) else None
    torch.manual_seed(recipe.seed)
    processor = make_processor(recipe)
    model = make_model(recipe, processor.tokenizer)
    renders = render_seed(recipe)
    bank = ImageBank(processor, recipe.image_size, renders, recipe.render_pool)
    val = validation_set(processor, recipe)
    best = {"acc": -1.0, "state": None, "step": 0, "curve": []}

    def check(step):
        if step % recipe.base_check_every and step != recipe.base_steps:
            return False
        acc = val.accuracy(model, "en")["accuracy"]
        best["curve"].append([step, round(acc, 4)])
        if acc > best["acc"]:
            best.update(acc=acc, step=step, state={k: v.detach().clone() for k, v in model.state_dict().items()})
        model.train()
        return acc >= recipe.base_target

    plan = base_plan(recipe, bank.n_renders)
    _train(model, lambda step: bank.encode(next(plan)), recipe.base_steps, recipe.base_lr, recipe.warmup,
           list(model.parameters()), report, STAGE_NAMES["base"], on_step=check)
    model.load_state_dict(best["state"])
    base_state = best["state"]
    info = {"base_validation_accuracy": best["acc"], "base_steps_kept": best["step"],
            "base_validation_curve": best["curve"], "training_renders_skipped": renders.skipped}
    base_dir = save_checkpoint(model, processor, tmp / "base")
    stages = {}
    for lang in ("ko", "en"):        # the same schedule of batch kinds and scenes for both stages
        model.load_state_dict(base_state)
        stages[lang] = {"base": base_dir, **_continue(model, processor, bank, recipe, lang, tmp, report)}
    return stages["ko"], stages["en"], info


def continuation_batches(processor, bank: ImageBank, recipe: Recipe, lang: str):
    """The continuation stages' batch stream: ``batch(step) -> dict``, one call per step in order.

    The batches of :func:`~driftlens.organism.data.continuation_plan` encoded with ``bank`` (which
    must hold the seen scenes, as :func:`training_bank`'s does) and ``processor``: the same kinds
    and scenes for the Korean stage, its English control and every arm of the regularizer
    experiment.
    """
    if bank.scenes != shapes.seen_scenes():
        raise UsageError("continuation_batches: the image bank must hold the seen scenes (shapes.seen_scenes()), "
                         "as organism.training_bank's does")
    plan = continuation_plan(recipe, lang, bank.n_renders)

    def batch(step):
        return bank.encode(next(plan))

    return batch


def _continue(model, processor, bank: ImageBank, recipe: Recipe, lang: str, tmp: Path, report) -> dict:
    """One continuation stage from the base: LLM only (vision tower and projector frozen), a
    constant learning rate after warmup, ``adapt_image_fraction`` of the batches image questions
    in ``lang``, the rest text; checkpoints ``{lang}-1 ...``."""
    frozen = ("vision_tower", "multi_modal_projector")
    for name, p in model.named_parameters():
        p.requires_grad_(not any(f in name for f in frozen))
    params = [p for p in model.parameters() if p.requires_grad]
    batch = continuation_batches(processor, bank, recipe, lang)
    every = recipe.adapt_steps // recipe.n_checkpoints
    ckpts = {}

    def save(step):
        if step % every == 0 and step // every <= recipe.n_checkpoints:
            label = f"{STAGE_PREFIX[lang]}-{step // every}"
            model.eval()
            ckpts[label] = save_checkpoint(model, processor, tmp / label)
            model.train()

    _train(model, batch, every * recipe.n_checkpoints, recipe.adapt_lr, recipe.warmup, params, report,
           STAGE_NAMES[lang], on_step=save, constant=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return ckpts


def build(out=None, recipe: Recipe | None = None, force: bool = False, progress: bool = True) -> Trajectory:
    """Build one organism (one seed: base, Korean trajectory, English control) or load it from the cache.

    Parameters
    ----------
    out : path, optional
        Folder of the trajectory (default: ``cache_root()/organism/<recipe hash>``).
    recipe : Recipe, optional
        Hyperparameters (default ``Recipe()``; ``Recipe(seed=1)`` for another seed).
    force : bool
        Rebuild even when a complete trajectory is there.
    progress : bool
        Progress on stderr (:class:`~driftlens.organism.progress.Board`: a status line on a terminal,
        whole lines at least every 15 s elsewhere).

    Returns
    -------
    Trajectory
        With ``evaluation.json`` (:func:`~driftlens.organism.evaluation.evaluate_all`) written.
    """
    from driftlens.organism.progress import Board, Reporter

    recipe = recipe or Recipe()
    root = Path(out) if out is not None else cache_root() / "organism" / recipe.key()
    board = Board() if progress else None
    try:
        return _ensure(root, recipe, force, Reporter(recipe.seed, board.update) if board else None, board)
    finally:
        if board is not None:
            board.close()


def _ensure(root: Path, recipe: Recipe, force: bool, report, board=None) -> Trajectory:
    """The trajectory in ``root``: loaded when complete (and not ``force``), else built under a lock."""
    if not force and (done := _complete(root, recipe)) is not None:
        return done
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root) as locked:    # a concurrent build of the same folder: wait, then reuse it
        if not force and (done := _complete(root, recipe)) is not None:
            return done
        if locked:                       # builds killed without cleanup (SIGKILL, SIGTERM) left these
            for stale in root.parent.glob(f".{root.name}-building-*"):
                shutil.rmtree(stale, ignore_errors=True)
        traj = _build(root, recipe, report)
    if board is not None:
        board.finish(recipe.seed, f"built in {traj.build_seconds:.0f} s ({root})")
    return traj


def build_seeds(seeds, recipe: Recipe | None = None, force: bool = False, progress: bool = True,
                jobs: int | None = None, cache=None) -> list[Trajectory]:
    """Build (or load) the organism for every seed; missing seeds are built in parallel processes.

    Parameters
    ----------
    seeds : sequence of int
    recipe : Recipe, optional
        Everything but the seed (default ``Recipe()``).
    force : bool
        Rebuild even when cached.
    progress : bool
        Progress of every seed and stage on stderr, from the worker processes too: a status line on
        a terminal; elsewhere a line per stage and a status line at least every 15 s.
    jobs : int, optional
        Worker processes for the missing seeds (default: one per missing seed), each with
        ``max(1, cores // jobs)`` torch threads; 1 builds one after another in this process.
    cache : path, optional
        Cache root (default :func:`cache_root`); seed ``s`` lives in ``<cache>/organism/<hash>``.

    Returns
    -------
    list of Trajectory, in the order of ``seeds``.
    """
    from driftlens.organism.progress import Board, Reporter

    recipe = recipe or Recipe()
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UsageError("seeds: give at least one seed")
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UsageError(f"seeds: {seeds} must be distinct and >= 0")
    if jobs is not None and jobs < 1:
        raise UsageError(f"jobs must be >= 1, got {jobs}")
    base = Path(cache) if cache is not None else cache_root()
    plan = [(dataclasses.replace(recipe, seed=s), base / "organism" / dataclasses.replace(recipe, seed=s).key())
            for s in seeds]
    missing = [(r, root) for r, root in plan if force or _complete(root, r) is None]
    jobs = min(len(missing), len(missing) if jobs is None else jobs)
    board = Board() if progress and missing else None
    try:
        if jobs > 1:
            _build_in_processes(missing, force, jobs, board)
            force = False
        return [_ensure(root, r, force, Reporter(r.seed, board.update) if board else None, board)
                for r, root in plan]
    finally:
        if board is not None:
            board.close()


def _build_in_processes(missing, force: bool, jobs: int, board=None) -> None:
    """Build ``[(recipe, root)]`` in at most ``jobs`` fresh Python processes at a time.

    Plain subprocesses (not multiprocessing): they work from scripts without a ``__main__``
    guard and from notebooks. Each gets ``max(1, cores // jobs)`` torch threads and reports its
    progress on its stdout (:func:`driftlens.organism.progress.emit`), which goes to ``board``.
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if board is not None:
        board.line(f"organism build: seed(s) {', '.join(str(r.seed) for r, _ in missing)} in up to {jobs} worker "
                   f"processes, {threads} torch thread(s) each")
    pending, running, failed = list(missing), [], []
    try:
        _drain(pending, running, failed, force, threads, jobs, env, board)
    finally:                                  # an interrupt or error here: no build left running
        for worker in running:
            worker.proc.kill()
            worker.proc.wait()
    if failed:
        raise DataError("organism build failed for " + "; ".join(failed))


class _Worker:
    """One build subprocess, with threads reading its progress (stdout) and its last stderr lines."""

    def __init__(self, recipe: Recipe, root: Path, force: bool, threads: int, env: dict, events):
        import collections
        import subprocess
        import sys
        import threading

        from driftlens.organism.progress import parse

        self.recipe, self.t0 = recipe, time.perf_counter()
        self.err: collections.deque[str] = collections.deque(maxlen=40)
        arg = json.dumps({"recipe": dataclasses.asdict(recipe), "root": str(root), "force": force, "threads": threads})
        code = "import driftlens.organism.train as o; o._worker_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code, arg], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, text=True, encoding="utf-8", errors="replace")

        def read_out():
            for line in self.proc.stdout:
                if (event := parse(line)) is not None:
                    events.put(event)

        self.readers = [threading.Thread(target=read_out, daemon=True),
                        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)]
        for t in self.readers:
            t.start()

    def failure(self) -> str | None:
        """None when the build succeeded, else what to say about it."""
        for t in self.readers:
            t.join()
        if self.proc.returncode == 0:
            return None
        last = next((ln.strip() for ln in reversed(self.err) if ln.strip()), "")
        return f"seed {self.recipe.seed} (exit {self.proc.returncode}): {last}"


def _drain(pending, running, failed, force, threads, jobs, env, board) -> None:
    import queue

    events: queue.Queue = queue.Queue()
    while pending or running:
        while pending and len(running) < jobs:
            r, root = pending.pop(0)
            running.append(_Worker(r, root, force, threads, env, events))
        try:
            event = events.get(timeout=0.5)
            while True:
                if board is not None:
                    board.update(int(event["seed"]), str(event["stage"]), int(event["step"]), int(event["total"]),
                                 str(event.get("note", "")))
                event = events.get_nowait()
        except queue.Empty:
            pass
        for worker in [w for w in running if w.proc.poll() is not None]:
            running.remove(worker)
            problem = worker.failure()
            if problem is not None:
                failed.append(problem)
            if board is not None:
                board.finish(worker.recipe.seed, problem or f"built in {time.perf_counter() - worker.t0:.0f} s")
        if board is not None:
            board.tick()


def _worker_main() -> None:
    """Entry point of a build subprocess: ``argv[1]`` is the JSON job of :func:`_build_in_processes`."""
    import sys

    import torch

    from driftlens.organism.progress import Reporter, emit

    job = json.loads(sys.argv[1])
    torch.set_num_threads(int(job["threads"]))
    recipe = Recipe(**job["recipe"])
    try:
        _ensure(Path(job["root"]), recipe, bool(job["force"]), Reporter(recipe.seed, emit))
    except KeyboardInterrupt:            # Ctrl-C reaches the whole process group: leave quietly
        sys.exit(130)


@contextlib.contextmanager
def _build_lock(root: Path):
    """Exclusive lock on ``.<root name>.lock`` beside ``root`` (released when the process dies).

    Yields whether the lock is held (False where ``fcntl`` is missing: builds stay atomic, but
    two processes may then build the same folder at once).
    """
    try:
        import fcntl
    except ImportError:                  # pragma: no cover - Windows
        yield False
        return
    with open(root.parent / f".{root.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(root: Path, recipe: Recipe, progress) -> Trajectory:
    """Train and evaluate into a temporary folder, then rename it to ``root``; ``progress``: a reporter or None."""
    import torch

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-building-", dir=root.parent))
    threads = torch.get_num_threads()
    try:
        ko, en, base_info = _train_trajectory(recipe, tmp, progress)
        train_seconds = round(time.perf_counter() - t0, 1)
        traj = Trajectory(tmp, ko, en, recipe)
        from driftlens.organism.evaluation import dumps, evaluate_all

        ev = evaluate_all(traj, progress)
        (tmp / "evaluation.json").write_text(dumps(ev), encoding="utf-8")
        seconds = round(time.perf_counter() - t0, 1)
        info = {"recipe": dataclasses.asdict(recipe), "build_seconds": seconds, "train_seconds": train_seconds,
                "torch_threads": threads, "checkpoints": {k: p.name for k, p in ko.items()},
                "control": {k: p.name for k, p in en.items()}, **base_info}
        (tmp / "trajectory.json").write_text(json.dumps(info, indent=2))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Trajectory(root, {k: root / v for k, v in info["checkpoints"].items()},
                      {k: root / v for k, v in info["control"].items()}, recipe, seconds)


def _complete(root: Path, recipe: Recipe) -> Trajectory | None:
    """The trajectory in ``root`` when it is complete, intact and was built from ``recipe``, else None.

    Intact: ``trajectory.json`` and ``evaluation.json`` parse, and every checkpoint folder has a
    readable ``config.json`` and whole safetensors files (:func:`_weights_intact`). A damaged build
    is rebuilt (with a warning), never reported as built.
    """
    meta = root / "trajectory.json"
    if not meta.exists() or not (root / "evaluation.json").exists():
        return None
    try:
        info = json.loads(meta.read_text())
        json.loads((root / "evaluation.json").read_text())
        ckpts = {k: root / v for k, v in info["checkpoints"].items()}
        control = {k: root / v for k, v in info.get("control", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return _damaged(root, "its trajectory.json or evaluation.json is unreadable")
    if info.get("recipe") != dataclasses.asdict(recipe):
        return None
    for label, folder in [*ckpts.items(), *control.items()]:
        why = _weights_intact(folder)
        if why:
            return _damaged(root, f"checkpoint {label} ({folder.name}): {why}")
    return Trajectory(root, ckpts, control, recipe, info.get("build_seconds", 0.0))


def _damaged(root: Path, why: str) -> None:
    import warnings

    warnings.warn(f"the organism build in {root} is damaged ({why}); it is rebuilt", stacklevel=3)
    return None


def _weights_intact(folder: Path) -> str | None:
    """Why a checkpoint folder is not whole (None when it is): ``config.json`` parses and every
    safetensors file holds its header and exactly the data its header describes (catches a deleted,
    emptied or cut file; reads only the headers)."""
    try:
        json.loads((folder / "config.json").read_text())
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return "no *.safetensors weights"
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n > f.stat().st_size:
                    return f"{f.name} is cut (its header alone would be {n} bytes)"
                header = json.loads(fh.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            if f.stat().st_size != 8 + n + end:
                return f"{f.name} is {f.stat().st_size} bytes, its header describes {8 + n + end}"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def load_checkpoint(path):
    """``(model, processor)`` of one checkpoint directory, through the real loading path."""
    from driftlens.sources import load_model_dir, load_processor

    return load_model_dir(path), load_processor(path)
