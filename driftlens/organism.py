"""The model organism: a tiny bilingual LLaVA whose Korean adaptation really drifts.

A ``LlavaForConditionalGeneration`` (CLIP-style vision tower, Llama decoder) is trained here,
on CPU, in minutes, in two stages on the :mod:`driftlens.shapes` world:

1. **base** -- English image-grounded data: captions and color / shape / position questions
   about rendered scenes (all weights train);
2. **Korean adaptation** -- Korean text without images (captions, question/answer text and
   plain sentences) with a little image-grounded Korean; the vision tower and projector are
   frozen, as in language adaptation of a real VLM, so the visual tokens entering the LLM do
   not change -- only the LLM that reads them does. Checkpoints ``ko-1 ... ko-N`` are saved
   along the way.

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

from driftlens import shapes

CODE_VERSION = "organism-6"
TRAIN_SEEDS = 10**6          # training renderings use seeds below this, evaluation seeds above
VALIDATION_SEEDS = 2 * 10**6  # model selection renderings (never the evaluation ones)
KO_SENTENCES = (
    "오늘은 날씨가 맑고 따뜻합니다.", "저는 아침마다 커피를 마십니다.", "도서관에서 책을 빌렸습니다.",
    "주말에 친구와 공원에 갔습니다.", "한국어를 공부하는 것은 재미있습니다.", "버스가 정류장에 도착했습니다.",
    "어머니께서 맛있는 저녁을 만드셨습니다.", "우리는 내일 아침 일찍 출발합니다.", "고양이가 창가에서 잠을 잡니다.",
    "학생들이 교실에서 노래를 부릅니다.", "겨울에는 눈이 많이 내립니다.", "시장에서 사과와 배를 샀습니다.",
    "기차는 서울역에서 출발합니다.", "저녁에는 가족과 함께 영화를 봅니다.", "강아지가 마당에서 뛰어놉니다.",
    "봄이 오면 꽃이 핍니다.", "그는 매일 운동을 합니다.", "바다에서 수영을 했습니다.",
)
HELDOUT_KO_SENTENCES = ("여름 방학에 할머니 댁에 갔습니다.", "선생님께서 숙제를 내주셨습니다.",
                        "아버지는 회사에서 일하십니다.", "밤하늘에 별이 많이 보입니다.")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the organism; its hash names the cache folder.

    Notes on the choices (measured on 2 CPU cores):
    - 32 px images with 8 px patches give 16 visual tokens per image. With shapes of radius
      0.17 x side nothing was learned in 1600 steps (loss stuck at the answer prior: the shape
      covered too few patches for a randomly initialized tower); radius 0.24 (the shape fills
      its quadrant) is learned.
    - The first recipe trained captions and questions equally with gradient clipping at 1.0
      at lr 3e-3; held-out grounding stayed at chance after 1500 steps. Questions only, no
      clipping, lr 2e-3 learn; even 5% captions left quadrant accuracy at 0.42 after 3600 steps.
    - Held-out *combinations* of color, shape and quadrant were not learnable for shape: the
      model predicts the shape from the (color, quadrant) pairs it has seen (0% shape accuracy
      on new combinations after 2400 steps). The base stage therefore trains on every scene and
      grounding is measured on held-out *renderings* (render seeds never used in training) of
      the 24 scenes of ``split_scenes()[1]``; color 1.00, shape 0.71, quadrant 1.00 after 2400
      steps with a 64-wide tower and a 96-wide decoder. Training this small model is chaotic:
      the same recipe at 3600 cosine steps ended at 0.67, and a constant learning rate for 4800
      steps at 0.72 (shape 0.3-0.7: a diamond at 16 px is hard to tell from a square or a circle
      through 8 px patches). The world therefore has three shapes (circle, square, triangle),
      and the base stage checks grounding every ``base_check_every`` steps on *validation*
      renderings (a third seed range, neither training nor evaluation images), keeps the best
      state and stops once it reaches ``base_target`` (at most ``base_steps``, cosine schedule).
    - The Korean stage's text comes from the training scenes only, so the Korean LM loss on
      the held-out scenes' Korean text (and held-out sentences) is a held-out loss.
    - The adaptation stage trains the LLM only, on 90% Korean text batches and 10% Korean
      image questions: enough to forget English grounding while the Korean language-model loss
      falls, as happens when a real VLM is adapted to a language. At lr 3e-3 with a cosine
      schedule everything happened before ``ko-1`` (English 0.96 -> 0.44 at step 120, then
      flat; visual drift flat from ``ko-1`` on), so the trajectory had one step in it. At a
      constant 1e-3 (after warmup) English grounding falls over the stage and visual drift
      rises at every checkpoint while the held-out Korean loss keeps falling (this recipe,
      measured on the cached build: English 0.963, 0.667, 0.648, 0.481, 0.481, 0.556 at steps
      0, 120, ..., 600; Korean LM loss 14.36 -> 0.34); 5e-4 moved too little (English 0.61 at
      step 600), and Korean text only (no Korean image questions) forgot less (0.57 at step 600).
    - The Korean LM loss is measured on held-out Korean text *of the world* (captions and
      question/answer text of the held-out scenes). A loss on unseen general sentences was
      tried and dropped: 18 training sentences cannot teach a language, and that loss rose
      (7.8 -> 10.1) as the training sentences were memorized.
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
    base_steps: int = 3000
    base_lr: float = 2e-3
    base_check_every: int = 300
    base_target: float = 0.97
    caption_fraction: float = 0.0
    ko_steps: int = 600
    ko_lr: float = 1e-3
    ko_constant_lr: bool = True
    ko_image_fraction: float = 0.1
    n_ko_checkpoints: int = 5
    warmup: int = 30
    code_version: str = CODE_VERSION

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class Trajectory:
    """A built organism: ordered checkpoint directories ("base", "ko-1", ...)."""

    root: Path
    checkpoints: dict = field(default_factory=dict)
    recipe: Recipe = field(default_factory=Recipe)
    build_seconds: float = 0.0


def cache_root() -> Path:
    """``$DRIFTLENS_CACHE``, else ``$XDG_CACHE_HOME/driftlens``, else ``~/.cache/driftlens``."""
    if os.environ.get("DRIFTLENS_CACHE"):
        return Path(os.environ["DRIFTLENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "driftlens"


# ----------------------------------------------------------------------------- data

PROMPT_CAPTION = {"en": "Describe the image.", "ko": "이미지를 설명하세요."}


def _examples(scene, lang: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs about one scene: the caption and the three questions."""
    out = [(PROMPT_CAPTION[lang], shapes.caption(scene, lang))]
    out += [(q.prompt, q.answer) for q in shapes.questions(scene, lang)]
    return out


def _ko_text(rng: random.Random, scenes) -> str:
    """One Korean text-only training sentence."""
    r = rng.random()
    s = rng.choice(scenes)
    if r < 0.4:
        return shapes.caption(s, "ko")
    if r < 0.7:
        q = rng.choice(shapes.questions(s, "ko"))
        return f"질문: {q.prompt} 답: {q.answer}"
    return rng.choice(KO_SENTENCES)


def corpus() -> list[str]:
    """Text the tokenizer is trained on (both languages, every word of the world)."""
    texts = []
    for s in shapes.all_scenes():
        for lang in shapes.LANGS:
            texts += [f"{p} {a}" for p, a in _examples(s, lang)]
    texts += list(KO_SENTENCES) + list(HELDOUT_KO_SENTENCES)
    texts += ["USER: ASSISTANT: 질문: 답:", "Describe the image. 이미지를 설명하세요."]
    return texts


# ----------------------------------------------------------------------------- model

def make_processor(recipe: Recipe):
    """A real ``LlavaProcessor`` built offline (CLIP image processor, BPE tokenizer, chat template)."""
    from transformers import (  # the PIL backend: no torchvision
        CLIPImageProcessorPil,
        LlavaProcessor,
    )

    from driftlens.tiny import _chat_template
    from driftlens.tokenizer import build_tokenizer

    tok = build_tokenizer(corpus=corpus(), vocab_size=recipe.vocab_size, extra_special_tokens=("<image>",))
    tok._set_model_specific_special_tokens({"image_token": "<image>"})
    tok.padding_side = "right"
    size = recipe.image_size
    ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    template = _chat_template("USER: ", "<image>\n", " ", "ASSISTANT:", "</s>")
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
    import torch

    tok = processor.tokenizer
    enc = processor(text=[_prompt(processor, p) for p in prompts], images=[[im] for im in images],
                    return_tensors="pt", padding=True)
    rows, labels = [], []
    pad = tok.pad_token_id
    for j, ans in enumerate(answers):
        n = int(enc["attention_mask"][j].sum())
        a = tok(" " + ans + (tok.eos_token if eos else ""), add_special_tokens=False)["input_ids"]
        ids = enc["input_ids"][j, :n].tolist() + a
        rows.append(ids)
        labels.append([-100] * n + a)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, (r, lb) in enumerate(zip(rows, labels)):
        input_ids[j, :len(r)] = torch.tensor(r)
        lab[j, :len(lb)] = torch.tensor(lb)
        mask[j, :len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": enc["pixel_values"], "labels": lab}


def encode_text(processor, texts):
    """Text-only LM inputs (no image), labels on every token."""
    tok = processor.tokenizer
    enc = tok([t + tok.eos_token for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _image_batch(processor, rng: random.Random, scenes, lang: str, n: int, size: int, caption_fraction: float):
    """Image-grounded examples: questions, and captions with probability ``caption_fraction``."""
    picks = [rng.choice(scenes) for _ in range(n)]
    imgs = [shapes.render(s, size, seed=rng.randrange(TRAIN_SEEDS)) for s in picks]
    pairs = [_examples(s, lang)[0] if rng.random() < caption_fraction else rng.choice(_examples(s, lang)[1:])
             for s in picks]
    return encode_image_examples(processor, imgs, [p for p, _ in pairs], [a for _, a in pairs])


# ----------------------------------------------------------------------------- training

def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train(model, batches, steps: int, lr: float, warmup: int, params, progress, desc, on_step=None,
           constant: bool = False):
    import torch
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = min(lr, lr * (step + 1) / warmup) if constant else _lr(step, steps, lr, warmup)
        batch = batches(step)
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None and on_step(step + 1):
            break
    model.eval()


def _save(model, processor, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def _train_trajectory(recipe: Recipe, tmp: Path, progress: bool) -> tuple[dict, dict]:
    import torch

    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    processor = make_processor(recipe)
    model = make_model(recipe, processor.tokenizer)
    train, _ = shapes.split_scenes(seed=0)
    everything = shapes.all_scenes()
    size = recipe.image_size
    B = recipe.batch_size

    best = {"acc": -1.0, "state": None, "step": 0}

    def check(step):
        if step % recipe.base_check_every:
            return False
        model.eval()
        acc = grounding_accuracy(model, processor, "en", size=size, seed_base=VALIDATION_SEEDS)
        model.train()
        if acc > best["acc"]:
            best.update(acc=acc, step=step, state={k: v.detach().clone() for k, v in model.state_dict().items()})
        return acc >= recipe.base_target

    _train(model, lambda step: _image_batch(processor, rng, everything, "en", B, size, recipe.caption_fraction),
           recipe.base_steps, recipe.base_lr, recipe.warmup, list(model.parameters()), progress,
           "organism: English base", on_step=check)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    base_info = {"base_validation_accuracy": best["acc"], "base_steps_kept": best["step"]}
    ckpts = {"base": _save(model, processor, tmp / "base")}

    frozen = ("vision_tower", "multi_modal_projector")
    for name, p in model.named_parameters():
        p.requires_grad_(not any(f in name for f in frozen))
    params = [p for p in model.parameters() if p.requires_grad]
    every = recipe.ko_steps // recipe.n_ko_checkpoints

    def ko_batch(step):
        if rng.random() < recipe.ko_image_fraction:
            return _image_batch(processor, rng, train, "ko", B, size, recipe.caption_fraction)
        return encode_text(processor, [_ko_text(rng, train) for _ in range(B)])

    def save_ko(step):
        if step % every == 0 and step // every <= recipe.n_ko_checkpoints:
            label = f"ko-{step // every}"
            model.eval()
            ckpts[label] = _save(model, processor, tmp / label)
            model.train()

    _train(model, ko_batch, every * recipe.n_ko_checkpoints, recipe.ko_lr, recipe.warmup, params, progress,
           "organism: Korean adaptation", on_step=save_ko, constant=recipe.ko_constant_lr)
    return ckpts, base_info


def build(out=None, recipe: Recipe | None = None, force: bool = False, progress: bool = True) -> Trajectory:
    """Build the organism's trajectory, or load it from the cache.

    Parameters
    ----------
    out : path, optional
        Folder of the trajectory (default: ``cache_root()/organism/<recipe hash>``).
    recipe : Recipe, optional
        Hyperparameters (default ``Recipe()``).
    force : bool
        Rebuild even when a complete trajectory is there.
    progress : bool
        tqdm bars.

    Returns
    -------
    Trajectory
        ``root`` and the ordered checkpoint directories (``base``, ``ko-1``, ...).
    """
    recipe = recipe or Recipe()
    root = Path(out) if out is not None else cache_root() / "organism" / recipe.key()
    if not force and (done := _complete(root, recipe)) is not None:
        return done
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root) as locked:    # a concurrent build of the same folder: wait, then reuse it
        if not force and (done := _complete(root, recipe)) is not None:
            return done
        if locked:                       # builds killed without cleanup (SIGKILL, SIGTERM) left these
            for stale in root.parent.glob(f".{root.name}-building-*"):
                shutil.rmtree(stale, ignore_errors=True)
        return _build(root, recipe, progress)


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


def _build(root: Path, recipe: Recipe, progress: bool) -> Trajectory:
    import torch

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-building-", dir=root.parent))
    threads = torch.get_num_threads()
    try:
        ckpts, base_info = _train_trajectory(recipe, tmp, progress)
        seconds = round(time.perf_counter() - t0, 1)
        info = {"recipe": dataclasses.asdict(recipe), "build_seconds": seconds, "torch_threads": threads,
                "checkpoints": {k: p.name for k, p in ckpts.items()}, **base_info}
        (tmp / "trajectory.json").write_text(json.dumps(info, indent=2))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Trajectory(root, {k: root / v for k, v in info["checkpoints"].items()}, recipe, seconds)


def _complete(root: Path, recipe: Recipe) -> Trajectory | None:
    """The trajectory in ``root`` when it is complete and was built from ``recipe``, else None."""
    meta = root / "trajectory.json"
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    if info.get("recipe") != dataclasses.asdict(recipe):
        return None
    ckpts = {k: root / v for k, v in info["checkpoints"].items()}
    if not all((p / "config.json").exists() for p in ckpts.values()):
        return None
    return Trajectory(root, ckpts, recipe, info.get("build_seconds", 0.0))


def load_checkpoint(path):
    """``(model, processor)`` of one checkpoint directory, through the real loading path."""
    from driftlens.sources import load_model_dir, load_processor

    return load_model_dir(path), load_processor(path)


# ----------------------------------------------------------------------------- evaluation

def chance_accuracy() -> float:
    """Mean over the held-out questions of 1 / number of candidates."""
    _, held = shapes.split_scenes(seed=0)
    qs = [q for s in held for q in shapes.questions(s, "en")]
    return sum(1.0 / len(q.candidates) for q in qs) / len(qs)


def grounding_accuracy(model, processor, lang: str, split: str = "heldout", size: int = 32,
                       seed_base: int = TRAIN_SEEDS) -> float:
    """Accuracy of likelihood ranking over candidate answers (sum of answer-token log-probs).

    One rendering per scene of the split, with a seed never used in training (held-out images),
    three questions each (color, shape, position); a question counts as right when the
    answer has the highest :func:`answer_scores`. ``seed_base`` picks the renderings (the
    default, ``TRAIN_SEEDS``, is the evaluation range; ``VALIDATION_SEEDS`` the model
    selection range of the base stage).
    """
    if split not in ("heldout", "train"):
        raise ValueError(f"unknown split {split!r}; choose 'heldout' or 'train'")
    train, held = shapes.split_scenes(seed=0)
    scenes = held if split == "heldout" else train
    correct = total = 0
    for k, scene in enumerate(scenes):
        img = shapes.render(scene, size, seed=seed_base + k)
        for q in shapes.questions(scene, lang):
            scores = answer_scores(model, processor, img, q)
            correct += int(q.candidates[int(scores.argmax())] == q.answer)
            total += 1
    return correct / total


def answer_scores(model, processor, image, question: shapes.Question):
    """Sum of the answer tokens' log-probabilities for each candidate, given image + prompt.

    Returns a float tensor ``[n_candidates]`` in the order of ``question.candidates``.
    """
    import torch

    n = len(question.candidates)
    batch = encode_image_examples(processor, [image] * n, [question.prompt] * n, list(question.candidates),
                                  eos=False)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)              # [n, T-1, vocab]
    target = batch["labels"][:, 1:]                                    # [n, T-1]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return picked.sum(1)                                               # [n]


def heldout_ko_texts() -> list[str]:
    """Held-out Korean text of the world: captions and question/answer text of the held-out scenes.

    The adaptation stage's Korean text comes from the training scenes only (``split_scenes()[0]``),
    so none of these strings was trained on.
    """
    _, held = shapes.split_scenes(seed=0)
    texts = [shapes.caption(s, "ko") for s in held]
    texts += [f"질문: {q.prompt} 답: {q.answer}" for s in held for q in shapes.questions(s, "ko")]
    return texts


def ko_lm_loss(model, processor, texts: list[str] | None = None) -> float:
    """Mean token cross-entropy (nats per token) on held-out Korean text, without an image.

    Parameters
    ----------
    texts : list of str, optional
        Default :func:`heldout_ko_texts` (captions and question/answer text of held-out scenes).
    """
    import torch

    texts = heldout_ko_texts() if texts is None else texts
    batch = encode_text(processor, texts)
    with torch.no_grad():
        return float(model(**batch, use_cache=False).loss)


def evaluate(trajectory: Trajectory, progress: bool = True) -> dict:
    """Grounding accuracy (en, ko) and Korean LM loss per checkpoint; cached in the trajectory."""
    from tqdm.auto import tqdm

    cache = trajectory.root / "evaluation.json"
    if cache.exists():
        ev = json.loads(cache.read_text())
        if list(ev.get("ko_lm_loss", {})) == list(trajectory.checkpoints):
            return ev
    ev = {"grounding_accuracy": {}, "ko_lm_loss": {}, "chance_accuracy": chance_accuracy()}
    for label, path in tqdm(trajectory.checkpoints.items(), desc="evaluate", disable=not progress, leave=False):
        model, processor = load_checkpoint(path)
        size = trajectory.recipe.image_size
        ev["grounding_accuracy"][label] = {lang: grounding_accuracy(model, processor, lang, size=size)
                                           for lang in shapes.LANGS}
        ev["ko_lm_loss"][label] = ko_lm_loss(model, processor)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(ev, indent=2))
    tmp.replace(cache)
    return ev


# ----------------------------------------------------------------------------- CLI

def add_parser(sub) -> None:
    """``driftlens organism build [--out DIR] [--force]``."""
    p = sub.add_parser("organism", help="build the model organism (a tiny bilingual LLaVA trained here)",
                       description="Build (or find in the cache) the model organism's trajectory: a base "
                                   "checkpoint trained on English shapes, then Korean-adaptation checkpoints.")
    p.add_argument("action", choices=["build"], help="what to do")
    p.add_argument("--out", default=None, help="trajectory folder (default: the cache)")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    traj = build(out=args.out, force=args.force, progress=not args.no_progress)
    ev = evaluate(traj, progress=not args.no_progress)
    print(f"organism: {traj.root} (built in {traj.build_seconds:.0f} s)")
    print(f"chance accuracy {ev['chance_accuracy']:.3f}")
    for label, path in traj.checkpoints.items():
        acc = ev["grounding_accuracy"][label]
        print(f"  {label:>6}: EN {acc['en']:.3f}  KO {acc['ko']:.3f}  KO LM loss {ev['ko_lm_loss'][label]:.3f}  {path}")
    return 0
