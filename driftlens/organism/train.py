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

Every checkpoint is evaluated at build time on renderings never trained on (one per scene,
216 questions per language; ``evaluation.json``) and on Korean text in forms never trained
on. Training this small model is chaotic -- figures differ between seeds, CPUs and thread
counts -- so every figure of the organism is a mean over seeds with its spread
(:func:`build_seeds`; lab notes and measurements in ``bench/RESULTS.md``).

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

CODE_VERSION = "organism-8"
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
# The English control's plain sentences: the same sentences in English.
EN_SENTENCES = (
    "Today the weather is clear and warm.", "I drink coffee every morning.", "I borrowed a book from the library.",
    "I went to the park with a friend on the weekend.", "Studying Korean is fun.", "The bus arrived at the stop.",
    "Mother made a delicious dinner.", "We leave early tomorrow morning.", "The cat sleeps by the window.",
    "The students sing in the classroom.", "It snows a lot in winter.", "I bought apples and pears at the market.",
    "The train leaves from Seoul Station.", "In the evening I watch a movie with my family.",
    "The puppy plays in the yard.", "When spring comes, the flowers bloom.", "He exercises every day.",
    "I swam in the sea.",
)
HELDOUT_KO_SENTENCES = ("여름 방학에 할머니 댁에 갔습니다.", "선생님께서 숙제를 내주셨습니다.",
                        "아버지는 회사에서 일하십니다.", "밤하늘에 별이 많이 보입니다.")
# Korean sentence forms used only to measure the held-out Korean LM loss (never trained on).
HELDOUT_KO_TEMPLATES = ("그림 속 도형은 {color} {shape}입니다.", "{position}에서 {color} 도형이 보입니다.",
                        "이 {shape}의 색은 {color}입니다.")
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
        Training renderings per scene, rendered once per build (seeds below ``TRAIN_SEEDS``).
    base_steps, base_lr, base_check_every, base_target : int, float, int, float
        English base stage (all weights, cosine schedule): at most ``base_steps`` steps,
        English grounding checked every ``base_check_every`` steps on *validation* renderings
        (never the evaluation ones), the best state kept, early stop at ``base_target``.
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


# ----------------------------------------------------------------------------- data

PROMPT_CAPTION = {"en": "Describe the image.", "ko": "이미지를 설명하세요."}
QA_TEXT = {"en": "Question: {prompt} Answer: {answer}", "ko": "질문: {prompt} 답: {answer}"}
SENTENCES = {"en": EN_SENTENCES, "ko": KO_SENTENCES}


def _examples(scene, lang: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs about one scene: the caption and the three questions."""
    out = [(PROMPT_CAPTION[lang], shapes.caption(scene, lang))]
    out += [(q.prompt, q.answer) for q in shapes.questions(scene, lang)]
    return out


def text_pool(lang: str) -> list[str]:
    """Every text-only training string of a continuation stage in ``lang``.

    Captions and question/answer text of the training scenes (``shapes.split_scenes()[0]``),
    and plain sentences. A text batch draws a caption with probability 0.4, a question/answer
    string with 0.3, a sentence with 0.3.
    """
    scenes = shapes.split_scenes(seed=0)[0]
    caps = [shapes.caption(s, lang) for s in scenes]
    qas = [QA_TEXT[lang].format(prompt=q.prompt, answer=q.answer) for s in scenes for q in shapes.questions(s, lang)]
    return caps + sorted(set(qas)) + list(SENTENCES[lang])


def _text(rng: random.Random, lang: str, scenes) -> str:
    """One text-only training string (caption 0.4, question/answer text 0.3, sentence 0.3)."""
    r = rng.random()
    s = rng.choice(scenes)
    if r < 0.4:
        return shapes.caption(s, lang)
    if r < 0.7:
        q = rng.choice(shapes.questions(s, lang))
        return QA_TEXT[lang].format(prompt=q.prompt, answer=q.answer)
    return rng.choice(SENTENCES[lang])


def corpus() -> list[str]:
    """Text the tokenizer is trained on (both languages, every word of the world)."""
    texts = []
    for s in shapes.all_scenes():
        for lang in shapes.LANGS:
            texts += [f"{p} {a}" for p, a in _examples(s, lang)]
    texts += list(KO_SENTENCES) + list(HELDOUT_KO_SENTENCES) + list(EN_SENTENCES)
    texts += ["USER: ASSISTANT: 질문: 답: Question: Answer:", "Describe the image. 이미지를 설명하세요."]
    return texts


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
        Render seed of rendering ``j`` of scene ``k``.
    n_renders : int
        Renderings per scene.
    """

    def __init__(self, processor, size: int, render_seeds, n_renders: int):
        self.processor, self.tok = processor, processor.tokenizer
        self.scenes = shapes.all_scenes()
        imgs = [shapes.render(s, size, seed=render_seeds(k, j)) for k, s in enumerate(self.scenes)
                for j in range(n_renders)]
        px = processor.image_processor(imgs, return_tensors="pt")["pixel_values"]
        self.pixels = px.reshape(len(self.scenes), n_renders, *px.shape[1:])      # [S, R, 3, H, W]
        self._prefix_cache: dict[str, list[int]] = {}

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

    def batch(self, items, eos: bool = True) -> dict:
        """Inputs for ``items`` = [(scene index, rendering, prompt, answer)]."""
        import torch

        rows, labels = [], []
        for _, _, prompt, answer in items:
            ids, lab = _append_answer(self.tok, self.prompt_ids(prompt), answer, eos)
            rows.append(ids)
            labels.append(lab)
        px = torch.stack([self.pixels[k, j] for k, j, _, _ in items])
        return {**_pad(self.tok, rows, labels), "pixel_values": px}

    def question_batch(self, rng: random.Random, lang: str, n: int) -> dict:
        """``n`` random (scene, rendering, question) examples in ``lang``."""
        items = []
        for _ in range(n):
            k = rng.randrange(len(self.scenes))
            q = rng.choice(shapes.questions(self.scenes[k], lang))
            items.append((k, rng.randrange(self.pixels.shape[1]), q.prompt, q.answer))
        return self.batch(items)


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


def save_checkpoint(model, processor, path: Path) -> Path:
    """Save model and processor into ``path`` (a real model directory)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def render_seed(recipe: Recipe):
    """``(scene index, rendering) -> render seed`` of the recipe's training renderings."""
    return lambda k, j: (recipe.seed * 100_003 + k * 1_009 + j * 7) % TRAIN_SEEDS


def _train_trajectory(recipe: Recipe, tmp: Path, progress: bool) -> tuple[dict, dict, dict]:
    """Train base, Korean adaptation and English control into ``tmp``; returns
    (Korean checkpoints, control checkpoints, base-stage info)."""
    import torch

    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    processor = make_processor(recipe)
    model = make_model(recipe, processor.tokenizer)
    bank = ImageBank(processor, recipe.image_size, render_seed(recipe), recipe.render_pool)
    from driftlens.organism.evaluation import EvalSet

    val = EvalSet(processor, recipe.image_size, VALIDATION_SEEDS, langs=("en",))
    B = recipe.batch_size
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

    _train(model, lambda step: bank.question_batch(rng, "en", B), recipe.base_steps, recipe.base_lr,
           recipe.warmup, list(model.parameters()), progress, f"organism seed {recipe.seed}: English base",
           on_step=check)
    model.load_state_dict(best["state"])
    base_state = best["state"]
    info = {"base_validation_accuracy": best["acc"], "base_steps_kept": best["step"],
            "base_validation_curve": best["curve"]}
    base_dir = save_checkpoint(model, processor, tmp / "base")
    stages = {}
    for lang in ("ko", "en"):        # the same schedule of batch kinds and scenes for both stages
        model.load_state_dict(base_state)
        stages[lang] = {"base": base_dir, **_continue(model, processor, bank, recipe, lang, tmp, progress)}
    return stages["ko"], stages["en"], info


def continuation_batches(processor, bank: ImageBank, recipe: Recipe, lang: str):
    """The continuation stages' batch stream: ``batch(step) -> dict``, one call per step in order.

    ``adapt_image_fraction`` of the batches are image questions in ``lang``, the rest text-only
    (captions, question/answer text, plain sentences of the training scenes); the stream depends
    only on the recipe's seed (the same kinds and scenes for the Korean stage, its English control
    and every arm of the regularizer experiment).
    """
    rng = random.Random(f"{recipe.seed}-continuation")
    scenes = shapes.split_scenes(seed=0)[0]        # text of the held-out scenes is never trained on

    def batch(step):
        if rng.random() < recipe.adapt_image_fraction:
            return bank.question_batch(rng, lang, recipe.batch_size)
        return encode_text(processor, [_text(rng, lang, scenes) for _ in range(recipe.batch_size)])

    return batch


def _continue(model, processor, bank: ImageBank, recipe: Recipe, lang: str, tmp: Path, progress: bool) -> dict:
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

    _train(model, batch, every * recipe.n_checkpoints, recipe.adapt_lr, recipe.warmup, params, progress,
           f"organism seed {recipe.seed}: {'Korean adaptation' if lang == 'ko' else 'English control'}",
           on_step=save, constant=True)
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
        tqdm bars.

    Returns
    -------
    Trajectory
        With ``evaluation.json`` (grounding and Korean LM loss of every checkpoint) written.
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
        tqdm bars (builds in worker processes show none).
    jobs : int, optional
        Worker processes for the missing seeds (default: one per missing seed), each with
        ``max(1, cores // jobs)`` torch threads; 1 builds one after another in this process.
    cache : path, optional
        Cache root (default :func:`cache_root`); seed ``s`` lives in ``<cache>/organism/<hash>``.

    Returns
    -------
    list of Trajectory, in the order of ``seeds``.
    """
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
    if jobs > 1:
        _build_in_processes(missing, force, jobs)
        force = False
    return [build(out=root, recipe=r, force=force, progress=progress) for r, root in plan]


def _build_in_processes(missing, force: bool, jobs: int) -> None:
    """Build ``[(recipe, root)]`` in at most ``jobs`` fresh Python processes at a time.

    Plain subprocesses (not multiprocessing): they work from scripts without a ``__main__``
    guard and from notebooks. Each gets ``max(1, cores // jobs)`` torch threads.
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    queue, running, failed = list(missing), [], []
    try:
        _drain(queue, running, failed, force, threads, jobs, env)
    finally:                                  # an interrupt or error here: no build left running
        for _, proc in running:
            proc.kill()
            proc.wait()
    if failed:
        raise DataError("organism build failed for " + "; ".join(failed))


def _drain(queue, running, failed, force, threads, jobs, env) -> None:
    import subprocess
    import sys

    while queue or running:
        while queue and len(running) < jobs:
            r, root = queue.pop(0)
            arg = json.dumps({"recipe": dataclasses.asdict(r), "root": str(root), "force": force,
                              "threads": threads})
            code = "import driftlens.organism.train as o; o._worker_main()"
            proc = subprocess.Popen([sys.executable, "-c", code, arg],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
            running.append((r, proc))
        r, proc = running[0]
        err = proc.communicate()[1].decode(errors="replace")
        running.pop(0)
        if proc.returncode != 0:
            last = err.strip().splitlines()[-1] if err.strip() else ""
            failed.append(f"seed {r.seed} (exit {proc.returncode}): {last}")


def _worker_main() -> None:
    """Entry point of a build subprocess: ``argv[1]`` is the JSON job of :func:`_build_in_processes`."""
    import sys

    import torch

    job = json.loads(sys.argv[1])
    torch.set_num_threads(int(job["threads"]))
    try:
        build(out=Path(job["root"]), recipe=Recipe(**job["recipe"]), force=bool(job["force"]), progress=False)
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


def _build(root: Path, recipe: Recipe, progress: bool) -> Trajectory:
    import torch

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-building-", dir=root.parent))
    threads = torch.get_num_threads()
    try:
        ko, en, base_info = _train_trajectory(recipe, tmp, progress)
        train_seconds = round(time.perf_counter() - t0, 1)
        traj = Trajectory(tmp, ko, en, recipe)
        from driftlens.organism.evaluation import evaluate_all

        ev = evaluate_all(traj, progress)
        (tmp / "evaluation.json").write_text(json.dumps(ev, indent=2, ensure_ascii=False))
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
