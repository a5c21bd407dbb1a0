"""What the model organism trains on, as plain data: scenes, renderings, text and batch streams.

Held out means never in any training batch of any stage, language or task. Here that is
built in, and checkable without training anything:

- **Scenes.** Every stage (English base, Korean adaptation, English control) draws image
  questions and text only from :func:`driftlens.organism.shapes.seen_scenes` (54 scenes); the 18
  :func:`~driftlens.organism.shapes.heldout_scenes` appear in no batch, in no language, as image
  or as text.
- **Images.** Evaluation renders (one per scene, every scene), validation renders (seen scenes)
  and the renders of the organism-world probe sets are *reserved*: a training render whose pixels
  hash to a reserved image is skipped for the next candidate seed (:func:`reserved_images`), and
  validation renders skip evaluation ones. The renderer makes about 240 distinct images of one
  scene, so without this a seed-derived render equals an evaluation image now and then.
- **Streams.** A stage's batches are :class:`Step` values (the scene, render, prompt and answer
  of every example, or the text strings and the scene each is about) drawn from a seeded
  generator (:func:`base_plan`, :func:`continuation_plan`); the training loop encodes them.
  :func:`training_plan` replays a recipe's streams in a second, without a model.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from driftlens.errors import UsageError
from driftlens.organism import shapes

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
# The English plain sentences: the same sentences in English.
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
# Korean sentence forms used only to measure the new-forms Korean LM loss (never trained on).
HELDOUT_KO_TEMPLATES = ("그림 속 도형은 {color} {shape}입니다.", "{position}에서 {color} 도형이 보입니다.",
                        "이 {shape}의 색은 {color}입니다.")
PROMPT_CAPTION = {"en": "Describe the image.", "ko": "이미지를 설명하세요."}
QA_TEXT = {"en": "Question: {prompt} Answer: {answer}", "ko": "질문: {prompt} 답: {answer}"}
SENTENCES = {"en": EN_SENTENCES, "ko": KO_SENTENCES}
# text batches: a caption with probability 0.4, question/answer text 0.3, a plain sentence 0.3
TEXT_MIX = (0.4, 0.7)


# ----------------------------------------------------------------------------- text

def _examples(scene, lang: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs about one scene: the caption and the three questions."""
    out = [(PROMPT_CAPTION[lang], shapes.caption(scene, lang))]
    out += [(q.prompt, q.answer) for q in shapes.questions(scene, lang)]
    return out


def text_pool(lang: str) -> list[str]:
    """Every text-only training string in ``lang`` (any stage).

    Captions and question/answer text of the seen scenes (:func:`~driftlens.organism.shapes.seen_scenes`),
    and plain sentences. A text batch draws a caption with probability 0.4, a question/answer
    string with 0.3, a sentence with 0.3.
    """
    scenes = shapes.seen_scenes()
    caps = [shapes.caption(s, lang) for s in scenes]
    qas = [QA_TEXT[lang].format(prompt=q.prompt, answer=q.answer) for s in scenes for q in shapes.questions(s, lang)]
    return caps + sorted(set(qas)) + list(SENTENCES[lang])


def _text(rng: random.Random, lang: str, scenes) -> tuple[str, shapes.Scene | None]:
    """One text-only training string and the scene it is about (None: a plain sentence)."""
    r = rng.random()
    s = rng.choice(scenes)
    if r < TEXT_MIX[0]:
        return shapes.caption(s, lang), s
    if r < TEXT_MIX[1]:
        q = rng.choice(shapes.questions(s, lang))
        return QA_TEXT[lang].format(prompt=q.prompt, answer=q.answer), s
    return rng.choice(SENTENCES[lang]), None


def corpus() -> list[str]:
    """Text the tokenizer is trained on: the seen scenes' text in both languages and the training sentences.

    Nothing of a held-out scene or a held-out sentence: every word of a held-out scene's caption
    and questions also occurs in seen scenes', so the vocabulary covers them.
    """
    texts = []
    for s in shapes.seen_scenes():
        for lang in shapes.LANGS:
            texts += [f"{p} {a}" for p, a in _examples(s, lang)]
    texts += list(KO_SENTENCES) + list(EN_SENTENCES)
    texts += ["USER: ASSISTANT: 질문: 답: Question: Answer:", "Describe the image. 이미지를 설명하세요."]
    return texts


# ----------------------------------------------------------------------------- images

def pixel_hash(image) -> str:
    """SHA-256 of an image's RGB pixels and size (two renders are the same image iff equal)."""
    import numpy as np

    a = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def evaluation_render_seeds() -> list[int]:
    """Render seed of each scene's evaluation image (:func:`shapes.all_scenes` order): ``TRAIN_SEEDS + k``."""
    return [TRAIN_SEEDS + k for k in range(len(shapes.all_scenes()))]


@lru_cache(maxsize=8)
def validation_render_seeds(size: int) -> tuple[int, ...]:
    """Render seed of each seen scene's validation image (:func:`shapes.seen_scenes` order).

    ``VALIDATION_SEEDS + k`` (``k`` the scene's index among all scenes), moved on by 1000 while its
    image equals an evaluation image.
    """
    index = {s: k for k, s in enumerate(shapes.all_scenes())}
    evaluation = {pixel_hash(shapes.render(s, size, seed=seed))
                  for s, seed in zip(shapes.all_scenes(), evaluation_render_seeds())}
    out = []
    for scene in shapes.seen_scenes():
        seed = VALIDATION_SEEDS + index[scene]
        while pixel_hash(shapes.render(scene, size, seed=seed)) in evaluation:
            seed += 1000
        out.append(seed)
    return tuple(out)


@lru_cache(maxsize=8)
def reserved_images(size: int) -> dict[str, str]:
    """``{pixel hash: what}`` of every image no training batch may show, at ``size`` pixels.

    The evaluation renders (every scene), the validation renders (seen scenes) and every image
    an organism-world probe set can hold (:func:`~driftlens.organism.probe_sets.shapes_probe_renders`
    with seed 0, all 72 scenes, up to 10 renders each: the demo's and the notebooks' probes).
    """
    from driftlens.organism.probe_sets import MAX_RENDERS, shapes_probe_renders

    out = {}
    for *_, scene, seed in shapes_probe_renders(0, len(shapes.all_scenes()), MAX_RENDERS):
        out[pixel_hash(shapes.render(scene, size, seed=seed))] = f"probe {scene.key} (render seed {seed})"
    for scene, seed in zip(shapes.seen_scenes(), validation_render_seeds(size)):
        out[pixel_hash(shapes.render(scene, size, seed=seed))] = f"validation {scene.key}"
    for scene, seed in zip(shapes.all_scenes(), evaluation_render_seeds()):
        out[pixel_hash(shapes.render(scene, size, seed=seed))] = f"evaluation {scene.key}"
    return out


class TrainingRenders:
    """Render seeds of the training images of one organism seed: ``renders(k, j)``.

    Rendering ``j`` of seen scene ``k`` (:func:`shapes.seen_scenes` order) is the ``j``-th candidate
    seed ``(seed * 100003 + k * 1009 + i * 7) % TRAIN_SEEDS`` (``i = 0, 1, ...``) whose image is not
    a reserved one (:func:`reserved_images`).

    Parameters
    ----------
    seed : int
        The organism's seed.
    size : int
        Image side in pixels.
    """

    def __init__(self, seed: int, size: int):
        self.seed, self.size = int(seed), int(size)
        self.scenes = shapes.seen_scenes()
        self._seeds: dict[int, list[int]] = {}
        self._next: dict[int, int] = {}
        self.skipped = 0

    def __call__(self, k: int, j: int) -> int:
        """Render seed of rendering ``j`` of seen scene ``k``."""
        if not 0 <= k < len(self.scenes):
            raise UsageError(f"scene index {k} is not one of the {len(self.scenes)} seen scenes")
        seeds = self._seeds.setdefault(k, [])
        reserved = reserved_images(self.size)
        while len(seeds) <= j:
            i = self._next.get(k, 0)
            self._next[k] = i + 1
            cand = (self.seed * 100_003 + k * 1_009 + i * 7) % TRAIN_SEEDS
            if pixel_hash(shapes.render(self.scenes[k], self.size, seed=cand)) in reserved:
                self.skipped += 1
                continue
            seeds.append(cand)
        return seeds[j]


# ----------------------------------------------------------------------------- batch streams

@dataclass(frozen=True)
class Step:
    """One training batch as plain data.

    Attributes
    ----------
    kind : str
        ``"image"`` (image questions) or ``"text"`` (text only).
    lang : str
    items : tuple
        ``"image"``: ``(scene index, rendering, prompt, answer)`` per example (scene index into
        :func:`shapes.seen_scenes`, rendering into its training renders); ``"text"``: the strings.
    scenes : tuple
        The scene each example is about (a :class:`~driftlens.organism.shapes.Scene`; None for a
        plain sentence).
    """

    kind: str
    lang: str
    items: tuple
    scenes: tuple


def question_step(rng: random.Random, lang: str, scenes, n: int, n_renders: int) -> Step:
    """``n`` random (scene, rendering, question) examples about ``scenes`` in ``lang``."""
    items, about = [], []
    for _ in range(n):
        k = rng.randrange(len(scenes))
        q = rng.choice(shapes.questions(scenes[k], lang))
        items.append((k, rng.randrange(n_renders), q.prompt, q.answer))
        about.append(scenes[k])
    return Step("image", lang, tuple(items), tuple(about))


def text_step(rng: random.Random, lang: str, scenes, n: int) -> Step:
    """``n`` random text-only strings about ``scenes`` (or plain sentences) in ``lang``."""
    pairs = [_text(rng, lang, scenes) for _ in range(n)]
    return Step("text", lang, tuple(t for t, _ in pairs), tuple(s for _, s in pairs))


def base_plan(recipe, n_renders: int | None = None) -> Iterator[Step]:
    """The English base stage's batches, endless (the stage takes at most ``recipe.base_steps``).

    A share ``recipe.base_text_fraction`` of the batches is English text (captions, question/answer
    text and plain sentences of the seen scenes), the rest English image questions about seen
    scenes; ``random.Random(recipe.seed)`` draws both.
    """
    rng = random.Random(recipe.seed)
    scenes = shapes.seen_scenes()
    n_renders = recipe.render_pool if n_renders is None else n_renders
    while True:
        if rng.random() < recipe.base_text_fraction:
            yield text_step(rng, "en", scenes, recipe.batch_size)
        else:
            yield question_step(rng, "en", scenes, recipe.batch_size, n_renders)


def continuation_plan(recipe, lang: str, n_renders: int | None = None) -> Iterator[Step]:
    """A continuation stage's batches in ``lang``, endless.

    ``recipe.adapt_image_fraction`` of the batches are image questions in ``lang``, the rest text
    (captions, question/answer text, plain sentences), all about seen scenes. The draws depend only
    on the recipe's seed, so the Korean stage, its English control and every arm of the regularizer
    experiment see the same kinds of batches about the same scenes in the same order.
    """
    rng = random.Random(f"{recipe.seed}-continuation")
    scenes = shapes.seen_scenes()
    n_renders = recipe.render_pool if n_renders is None else n_renders
    while True:
        if rng.random() < recipe.adapt_image_fraction:
            yield question_step(rng, lang, scenes, recipe.batch_size, n_renders)
        else:
            yield text_step(rng, lang, scenes, recipe.batch_size)


def training_plan(recipe) -> Iterator[tuple[str, int, Step]]:
    """Every batch a build of ``recipe`` can train on, without training: ``(stage, step, Step)``.

    Stages ``"base"`` (all ``recipe.base_steps``: the stage may stop early, never later), ``"ko"``
    (Korean adaptation) and ``"en"`` (English control), in order.
    """
    import itertools

    steps = (recipe.adapt_steps // recipe.n_checkpoints) * recipe.n_checkpoints
    for stage, plan, n in (("base", base_plan(recipe), recipe.base_steps),
                           ("ko", continuation_plan(recipe, "ko"), steps),
                           ("en", continuation_plan(recipe, "en"), steps)):
        for i, step in enumerate(itertools.islice(plan, n)):
            yield stage, i, step
