"""The synthetic bilingual world: one colored shape in one quadrant of an image.

Scenes are (color, shape, position) triples; images are drawn deterministically with PIL;
every scene has an English and a Korean caption and three question/answer pairs (color,
shape, position) with their candidate answers. This world feeds the ``shapes-bilingual``
probe set and the model organism.

>>> s = Scene("red", "circle", "top left")
>>> caption(s, "en"), caption(s, "ko")
('a red circle at the top left.', '왼쪽 위에 빨간색 원이 있습니다.')
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from driftlens.errors import UsageError

COLORS: dict[str, str] = {
    "red": "빨간색", "green": "초록색", "blue": "파란색",
    "yellow": "노란색", "purple": "보라색", "orange": "주황색",
}
SHAPES: dict[str, str] = {"circle": "원", "square": "사각형", "triangle": "삼각형"}
POSITIONS: dict[str, str] = {
    "top left": "왼쪽 위", "top right": "오른쪽 위",
    "bottom left": "왼쪽 아래", "bottom right": "오른쪽 아래",
}
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (235, 215, 20), "purple": (140, 40, 180), "orange": (245, 130, 20),
}
BACKGROUND = (245, 245, 245)
# quadrant centres as fractions of the image side
CENTRES: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25), "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75),
}
QUESTIONS = {
    "en": {"color": "What color is the shape?", "shape": "What shape is it?",
           "position": "Where is the shape?"},
    "ko": {"color": "도형은 무슨 색인가요?", "shape": "어떤 도형인가요?", "position": "도형은 어디에 있나요?"},
}
LANGS = ("en", "ko")


@dataclass(frozen=True)
class Scene:
    """One colored shape in one quadrant (English keys of COLORS, SHAPES, POSITIONS)."""

    color: str
    shape: str
    position: str

    def __post_init__(self):
        for value, table, what in ((self.color, COLORS, "color"), (self.shape, SHAPES, "shape"),
                                   (self.position, POSITIONS, "position")):
            if value not in table:
                raise UsageError(f"unknown {what} {value!r}; choose from {list(table)}")

    @property
    def key(self) -> str:
        """A readable unique name of the scene (``color-shape-position``)."""
        return f"{self.color}-{self.shape}-{self.position.replace(' ', '-')}"


@dataclass(frozen=True)
class Question:
    """A question about one attribute, its answer and the candidate answers (same language)."""

    attribute: str
    prompt: str
    answer: str
    candidates: tuple[str, ...]


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise UsageError(f"unknown language {lang!r}; choose from {LANGS}")


def _word(table: dict[str, str], key: str, lang: str) -> str:
    return key if lang == "en" else table[key]


def render(scene: Scene, size: int = 64, seed: int | None = None):
    """Draw ``scene`` as an RGB ``PIL.Image`` of ``size`` x ``size`` pixels.

    Without ``seed`` the shape sits at the quadrant centre with a fixed size; with a seed its
    centre moves by up to 1/16 of the side and its size varies by +-15%, deterministically.
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed) if seed is not None else None
    cx, cy = CENTRES[scene.position]
    r = 0.24 * size
    if rng is not None:
        cx += rng.uniform(-1, 1) / 16
        cy += rng.uniform(-1, 1) / 16
        r *= rng.uniform(0.85, 1.15)
    cx, cy = cx * size, cy * size
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fill = RGB[scene.color]
    box = (cx - r, cy - r, cx + r, cy + r)
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:  # triangle
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    return img


def all_scenes() -> list[Scene]:
    """Every (color, shape, position) scene, in a fixed order."""
    return [Scene(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


# The model organism's held-out scenes: color, shape and position indices (in the order of
# COLORS, SHAPES, POSITIONS) summing to 0 modulo 4 -- 18 of the 72 scenes, one position per
# (color, shape) pair. Fixed, whatever the organism's seed.
HELDOUT_MODULUS = 4


def _indices(scene: Scene) -> tuple[int, int, int]:
    return list(COLORS).index(scene.color), list(SHAPES).index(scene.shape), list(POSITIONS).index(scene.position)


def is_heldout(scene: Scene) -> bool:
    """Whether the model organism holds ``scene`` out of every training stage (:func:`heldout_scenes`)."""
    return sum(_indices(scene)) % HELDOUT_MODULUS == 0


def heldout_scenes() -> list[Scene]:
    """The model organism's held-out scenes: never in any training batch of any stage, language or task.

    The rule, the same for every organism seed: a scene is held out when the indices of its color,
    shape and position (in the order of :data:`COLORS`, :data:`SHAPES`, :data:`POSITIONS`) sum to
    0 modulo 4. That gives 18 of the 72 scenes, exactly one position per (color, shape) pair, and
    leaves every pair of attribute values in training with at least two scenes (a held-out scene's
    color and position still go with two or three trained shapes, so its shape cannot be guessed
    from the combination).

    >>> len(heldout_scenes()), heldout_scenes()[0].key
    (18, 'red-circle-top-left')
    """
    return [s for s in all_scenes() if is_heldout(s)]


def seen_scenes() -> list[Scene]:
    """The 54 scenes the model organism trains on (every scene not in :func:`heldout_scenes`)."""
    return [s for s in all_scenes() if not is_heldout(s)]


def mismatched_scene(scene: Scene) -> Scene:
    """The scene whose image stands in for ``scene``'s in the organism's mismatched-image evaluation.

    A fixed rule that changes every attribute: the color three places on (of six), the shape one
    place on (of three), the position two places on (of four: the other row, same column), so the
    right answer to each question about ``scene`` is wrong for the image shown. A bijection.
    """
    c, s, p = _indices(scene)
    return Scene(list(COLORS)[(c + 3) % len(COLORS)], list(SHAPES)[(s + 1) % len(SHAPES)],
                 list(POSITIONS)[(p + 2) % len(POSITIONS)])


def split_scenes(seed: int = 0, heldout_fraction: float = 0.25) -> tuple[list[Scene], list[Scene]]:
    """Disjoint train / held-out scene lists (the ``shapes-bilingual`` probe set's scene order).

    The held-out set is chosen so that every color, shape and position still occurs in
    training (held-out scenes are new *combinations*). The model organism does not use this
    split: it holds out :func:`heldout_scenes`.
    """
    if not 0 < heldout_fraction < 1:
        raise UsageError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    scenes = all_scenes()
    rng = random.Random(seed)
    order = scenes[:]
    rng.shuffle(order)
    n_held = round(len(scenes) * heldout_fraction)
    held: list[Scene] = []
    for s in order:
        if len(held) == n_held:
            break
        rest = [t for t in scenes if t not in held and t != s]
        if all(any(getattr(t, a) == getattr(s, a) for t in rest) for a in ("color", "shape", "position")):
            held.append(s)
    held_set = set(held)
    return [s for s in scenes if s not in held_set], held


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes drawn with replacement, deterministically for ``seed``."""
    rng = random.Random(seed)
    scenes = all_scenes()
    return [rng.choice(scenes) for _ in range(n)]


def caption(scene: Scene, lang: str) -> str:
    """One-sentence caption of ``scene`` in ``lang`` ("en" or "ko")."""
    _check_lang(lang)
    if lang == "en":
        return f"a {scene.color} {scene.shape} at the {scene.position}."
    return f"{POSITIONS[scene.position]}에 {COLORS[scene.color]} {SHAPES[scene.shape]}이 있습니다." \
        if _has_final_consonant(SHAPES[scene.shape]) else \
        f"{POSITIONS[scene.position]}에 {COLORS[scene.color]} {SHAPES[scene.shape]}가 있습니다."


def _has_final_consonant(word: str) -> bool:
    """Korean subject particle choice: 이 after a final consonant (batchim), 가 otherwise."""
    ch = word[-1]
    code = ord(ch) - 0xAC00
    return 0 <= code < 11172 and code % 28 != 0


def questions(scene: Scene, lang: str) -> list[Question]:
    """Color, shape and position questions about ``scene`` in ``lang``."""
    _check_lang(lang)
    out = []
    for attr, table in (("color", COLORS), ("shape", SHAPES), ("position", POSITIONS)):
        out.append(Question(
            attribute=attr,
            prompt=QUESTIONS[lang][attr],
            answer=_word(table, getattr(scene, attr), lang),
            candidates=tuple(_word(table, k, lang) for k in table),
        ))
    return out
