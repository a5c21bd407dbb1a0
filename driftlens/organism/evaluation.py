"""Evaluation of the model organism: grounding accuracy (likelihood ranking of candidate answers on
renderings never trained on, with a Wilson interval) and Korean LM loss on text never trained on.
"""
from __future__ import annotations

import json
import math

from driftlens.errors import UsageError
from driftlens.organism import shapes
from driftlens.organism.train import (
    HELDOUT_KO_SENTENCES,
    HELDOUT_KO_TEMPLATES,
    QA_TEXT,
    TRAIN_SEEDS,
    ImageBank,
    Trajectory,
    encode_image_examples,
    encode_text,
    load_checkpoint,
)
from driftlens.outputs import atomic_write


def chance_accuracy() -> float:
    """Mean over the evaluation questions of 1 / number of candidates."""
    qs = [q for s in shapes.all_scenes() for q in shapes.questions(s, "en")]
    return sum(1.0 / len(q.candidates) for q in qs) / len(qs)


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a binomial proportion."""
    if n <= 0:
        raise UsageError("wilson_interval: n must be >= 1")
    p = correct / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


class EvalSet:
    """Grounding questions on one rendering per scene of the whole world, never trained on.

    Every scene (72) is rendered once with seed ``seed_base + k``; each has a color, a shape
    and a position question (216 per language). A question counts as right when its answer has
    the highest sum of answer-token log-probabilities among the candidates (likelihood
    ranking), every candidate of every question scored in batches.
    """

    def __init__(self, processor, size: int = 32, seed_base: int = TRAIN_SEEDS, langs=shapes.LANGS,
                 batch_rows: int = 128):
        self.bank = ImageBank(processor, size, lambda k, j: seed_base + k, 1)
        self.batch_rows = batch_rows
        self.rows: dict[str, list] = {}
        self.questions: dict[str, list] = {}
        for lang in langs:
            rows, qs = [], []
            for k, scene in enumerate(self.bank.scenes):
                for q in shapes.questions(scene, lang):
                    qs.append((q, len(rows), len(q.candidates)))
                    rows += [(k, 0, q.prompt, cand) for cand in q.candidates]
            self.rows[lang], self.questions[lang] = rows, qs

    def scores(self, model, lang: str):
        """Sum of answer-token log-probabilities of every (question, candidate) row [n_rows]."""
        import torch

        out = []
        for i in range(0, len(self.rows[lang]), self.batch_rows):
            batch = self.bank.batch(self.rows[lang][i:i + self.batch_rows], eos=False)
            out.append(answer_logprob(model, batch))
        return torch.cat(out)

    def accuracy(self, model, lang: str) -> dict:
        """``{"accuracy", "correct", "n", "lo", "hi", "by_attribute"}`` (Wilson 95% interval)."""
        was_training = model.training
        model.eval()
        sc = self.scores(model, lang)
        model.train(was_training)
        right: dict[str, list[int]] = {}
        for q, start, n in self.questions[lang]:
            best = int(sc[start:start + n].argmax())
            right.setdefault(q.attribute, []).append(int(q.candidates[best] == q.answer))
        correct = sum(sum(v) for v in right.values())
        n = sum(len(v) for v in right.values())
        lo, hi = wilson_interval(correct, n)
        return {"accuracy": correct / n, "correct": correct, "n": n, "lo": lo, "hi": hi,
                "by_attribute": {a: sum(v) / len(v) for a, v in right.items()}}


def answer_logprob(model, batch: dict):
    """Sum over the labelled (answer) tokens of each row's log-probability [B]."""
    import torch

    from driftlens.regularizer import label_logprobs

    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    return label_logprobs(logits, batch["labels"], reduce="sum")      # [B]


def answer_scores(model, processor, image, question: shapes.Question):
    """Sum of the answer tokens' log-probabilities for each candidate, given image + prompt.

    Returns a float tensor ``[n_candidates]`` in the order of ``question.candidates``.
    """
    n = len(question.candidates)
    batch = encode_image_examples(processor, [image] * n, [question.prompt] * n, list(question.candidates),
                                  eos=False)
    return answer_logprob(model, batch)


def heldout_ko_texts() -> list[str]:
    """Korean captions of the held-out scenes (``shapes.split_scenes()[1]``): strings never trained on.

    The continuation stages' text comes from the training scenes only, and image questions have
    one-word answers, so none of these captions (new combinations of color, shape and place) is
    a training string (tested).
    """
    return [shapes.caption(s, "ko") for s in shapes.split_scenes(seed=0)[1]]


def new_form_ko_texts() -> list[str]:
    """Korean in sentence forms never trained on (:data:`HELDOUT_KO_TEMPLATES`, one per scene)
    and unseen plain sentences: how far the adaptation generalizes beyond its templates."""
    out = []
    for k, s in enumerate(shapes.all_scenes()):
        t = HELDOUT_KO_TEMPLATES[k % len(HELDOUT_KO_TEMPLATES)]
        out.append(t.format(color=shapes.COLORS[s.color], shape=shapes.SHAPES[s.shape],
                            position=shapes.POSITIONS[s.position]))
    return out + list(HELDOUT_KO_SENTENCES)


def seen_ko_texts() -> list[str]:
    """Korean training strings (captions and question/answer text of training scenes)."""
    scenes = shapes.split_scenes(seed=0)[0][::3]
    return [shapes.caption(s, "ko") for s in scenes] + \
        [QA_TEXT["ko"].format(prompt=q.prompt, answer=q.answer) for s in scenes for q in shapes.questions(s, "ko")]


def ko_lm_loss(model, processor, texts: list[str] | None = None) -> float:
    """Mean token cross-entropy (nats per token) on Korean text, without an image.

    Parameters
    ----------
    texts : list of str, optional
        Default :func:`heldout_ko_texts` (captions of held-out scenes, never trained on).
    """
    import torch

    texts = heldout_ko_texts() if texts is None else texts
    batch = encode_text(processor, texts)
    with torch.no_grad():
        return float(model(**batch, use_cache=False).loss)


def evaluate_all(trajectory: Trajectory, progress: bool) -> dict:
    """Evaluate every checkpoint of ``trajectory`` (no cache; see :func:`evaluate`)."""
    from tqdm.auto import tqdm

    ev = {"chance_accuracy": chance_accuracy(), "grounding": {}, "grounding_accuracy": {},
          "ko_lm_loss": {}, "ko_lm_loss_new_forms": {}, "ko_lm_loss_seen": {}}
    evalset = None
    for label, path in tqdm(trajectory.all_checkpoints.items(), desc="evaluate", disable=not progress, leave=False):
        model, processor = load_checkpoint(path)
        if evalset is None:
            evalset = EvalSet(processor, trajectory.recipe.image_size)
        ev["grounding"][label] = {lang: evalset.accuracy(model, lang) for lang in shapes.LANGS}
        ev["grounding_accuracy"][label] = {lang: g["accuracy"] for lang, g in ev["grounding"][label].items()}
        ev["ko_lm_loss"][label] = ko_lm_loss(model, processor)
        ev["ko_lm_loss_new_forms"][label] = ko_lm_loss(model, processor, new_form_ko_texts())
        ev["ko_lm_loss_seen"][label] = ko_lm_loss(model, processor, seen_ko_texts())
    return ev


def evaluate(trajectory: Trajectory, progress: bool = True) -> dict:
    """Grounding (en, ko; accuracy with a Wilson interval and per attribute) and Korean LM loss
    (held-out captions, new sentence forms, seen text) of every checkpoint of the trajectory
    and its control.

    Computed at build time and read from the trajectory's ``evaluation.json``.
    """
    cache = trajectory.root / "evaluation.json"
    if cache.exists():
        ev = json.loads(cache.read_text())
        if set(ev.get("ko_lm_loss", {})) == set(trajectory.all_checkpoints):
            return ev
    ev = evaluate_all(trajectory, progress)
    atomic_write(cache, json.dumps(ev, indent=2, ensure_ascii=False))
    return ev
