"""Evaluation of the model organism: grounding and image reliance per scene, and LM loss on held-out text.

**Grounding questions.** Every scene of the world (72) is rendered once, never trained on (no
training image has the same pixels, :mod:`driftlens.organism.data`); each has a color, a shape and
a position question (216 per language). A question counts as right when its answer has the highest
sum of answer-token log-probabilities among the candidates (likelihood ranking). Each question is
asked under three image conditions:

- ``true``: the scene's own rendering;
- ``mismatched``: the rendering of another scene that differs in every attribute
  (:func:`~driftlens.organism.shapes.mismatched_scene`), so the right answer is wrong for the image;
- ``none``: a blank image in the world's background color (no shape). A blank image, not a
  text-only prompt: the input keeps its layout (the same 16 image tokens, the same positions), so
  the condition differs from the others in the image's content only; the model never saw a
  question without an image, and a text-only prompt would also change the format.

The **grounding gain** is the true-image outcome minus the mismatched-image outcome: accuracy
(points) and the right answer's log-likelihood (nats). A model that answers from the image has a
large gain; one that answers from the question alone (its language prior) has none, whatever its
accuracy. Seen and held-out scenes (:func:`~driftlens.organism.shapes.heldout_scenes`) are reported
apart, and every scene's outcomes are kept (``per_scene``).

**Text.** Mean token cross-entropy without an image: Korean and English captions of the held-out
scenes (strings in a trained sentence form about scenes never trained on), Korean in sentence forms
never trained on, and Korean and English training strings.
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

CONDITIONS = ("true", "mismatched", "none")
ATTRIBUTES = ("color", "shape", "position")
LOSSES = ("ko_lm_loss", "ko_lm_loss_new_forms", "ko_lm_loss_seen", "en_lm_loss", "en_lm_loss_seen")
SPLITS = {"": None, "_seen": False, "_heldout": True}       # key suffix -> held-out scenes only / seen only / all
NO_IMAGE = ("a blank image in the world's background color (no shape): same input layout and image tokens as the "
            "other conditions, no visual evidence")


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
    """Grounding questions on one rendering per scene, never trained on, under three image conditions.

    Parameters
    ----------
    processor : LlavaProcessor
    size : int
        Image side in pixels.
    seed_base : int
        Scene ``k`` (:func:`shapes.all_scenes` order) is rendered with seed ``seed_base + k``.
    langs : sequence of str
    batch_rows : int
        Images per forward pass (each with its candidates; :meth:`candidate_scores`).
    renders : list of (Scene, int), optional
        The scenes and their render seeds instead (the validation set: seen scenes only).
    conditions : sequence of str
        Image conditions to score (``true`` always; ``mismatched`` needs every scene's
        mismatched scene among ``renders``).
    """

    def __init__(self, processor, size: int = 32, seed_base: int = TRAIN_SEEDS, langs=shapes.LANGS,
                 batch_rows: int = 128, renders=None, conditions=CONDITIONS):
        import torch
        from PIL import Image

        if renders is None:
            renders = [(s, seed_base + k) for k, s in enumerate(shapes.all_scenes())]
        if "true" not in conditions or set(conditions) - set(CONDITIONS):
            raise UsageError(f"conditions must include 'true' and be among {CONDITIONS}, got {conditions!r}")
        self.scenes = [s for s, _ in renders]
        self.render_seeds = [int(seed) for _, seed in renders]
        self.conditions = tuple(conditions)
        self.bank = ImageBank(processor, size, lambda k, j: self.render_seeds[k], 1, scenes=self.scenes)
        blank = processor.image_processor([Image.new("RGB", (size, size), shapes.BACKGROUND)],
                                          return_tensors="pt")["pixel_values"]
        self.images = torch.cat([self.bank.pixels[:, 0], blank])              # [S + 1, 3, H, W]; blank last
        index = {s: k for k, s in enumerate(self.scenes)}
        if "mismatched" in self.conditions:
            missing = [s.key for s in self.scenes if shapes.mismatched_scene(s) not in index]
            if missing:
                raise UsageError(f"the mismatched condition needs the mismatched scenes of {missing[:3]} ... "
                                 "among the rendered scenes")
            self.mismatch = [index[shapes.mismatched_scene(s)] for s in self.scenes]
        self.heldout = [shapes.is_heldout(s) for s in self.scenes]
        self.batch_rows = batch_rows
        self.rows: dict[str, list] = {}
        self.questions: dict[str, list] = {}
        self.blank_rows: dict[str, list] = {}
        self.blank_questions: dict[str, dict] = {}
        for lang in langs:
            rows, qs = [], []
            for k, scene in enumerate(self.scenes):
                for q in shapes.questions(scene, lang):
                    qs.append((q, len(rows), len(q.candidates)))
                    rows += [(k, 0, q.prompt, cand) for cand in q.candidates]
            self.rows[lang], self.questions[lang] = rows, qs
            blank, where = [], {}
            for q in shapes.questions(self.scenes[0], lang):      # the candidates do not depend on the scene
                where[q.attribute] = (len(blank), q.candidates)
                blank += [(len(self.scenes), 0, q.prompt, cand) for cand in q.candidates]
            self.blank_rows[lang], self.blank_questions[lang] = blank, where

    def candidate_scores(self, model, prompt: str, candidates, images):
        """Sum of answer-token log-probabilities of every candidate after ``prompt`` on each image [Q, n].

        The image and prompt (one prefix length for every image) go through the model once per
        image with a key/value cache; the candidates' tokens then continue from that cache (the
        first token's log-probability is read off the prefix's last position). Equal to scoring
        each (image, prompt, candidate) row alone (tested), at a fraction of the cost.

        Parameters
        ----------
        images : sequence of int
            Rows of :attr:`images` (scene renders; the blank image last).
        """
        import torch

        tok = self.bank.tok
        prefix = torch.tensor(self.bank.prompt_ids(prompt))                           # [T]
        cands = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in candidates]
        n, longest = len(cands), max(len(c) for c in cands)
        first = torch.tensor([c[0] for c in cands])                                    # [n]
        out = []
        for i in range(0, len(images), self.batch_rows):
            chunk = list(images[i:i + self.batch_rows])
            q = len(chunk)
            ids = prefix.expand(q, -1)                                                  # [Q, T]
            with torch.no_grad():
                res = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=self.images[chunk],
                            use_cache=longest > 1)
                scores = torch.log_softmax(res.logits[:, -1].float(), -1)[:, first]       # [Q, n]
                if longest > 1:
                    name = _cache_name(model)
                    cache = getattr(res, name, None)
                    cache.batch_repeat_interleave(n)                                     # row q * n + j
                    inp = torch.full((q * n, longest - 1), tok.pad_token_id)
                    mask = torch.zeros(q * n, longest - 1, dtype=torch.long)
                    for j, c in enumerate(cands):
                        inp[j::n, :len(c) - 1] = torch.tensor(c[:-1])
                        mask[j::n, :len(c) - 1] = 1
                    attn = torch.cat([torch.ones(q * n, ids.shape[1], dtype=torch.long), mask], 1)
                    logp = torch.log_softmax(model(input_ids=inp, attention_mask=attn, use_cache=True,
                                                   **{name: cache}).logits.float(), -1)   # [Q n, L - 1, V]
                    for j, c in enumerate(cands):
                        for t in range(1, len(c)):
                            scores[:, j] += logp[j::n, t - 1, c[t]]
            out.append(scores)
        return torch.cat(out)

    def scores(self, model, lang: str, condition: str = "true"):
        """Sum of answer-token log-probabilities of every row [n_rows].

        ``true`` and ``mismatched``: one row per (question, candidate) in :attr:`rows` order;
        ``none``: one row per (question kind, candidate) in :attr:`blank_rows` order.
        """
        import torch

        if condition not in self.conditions:
            raise UsageError(f"condition {condition!r} was not prepared; this set has {self.conditions}")
        if condition == "none":
            parts = [self.candidate_scores(model, q.prompt, q.candidates, [len(self.scenes)])[0]
                     for q in shapes.questions(self.scenes[0], lang)]
            return torch.cat(parts)
        images = list(range(len(self.scenes))) if condition == "true" else self.mismatch
        out = torch.empty(len(self.rows[lang]))
        for a, q0 in enumerate(shapes.questions(self.scenes[0], lang)):   # prompt and candidates: every scene's
            sc = self.candidate_scores(model, q0.prompt, q0.candidates, images)      # [S, n]
            for k in range(len(self.scenes)):
                q, start, n = self.questions[lang][3 * k + a]
                out[start:start + n] = sc[k]
        return out

    def accuracy(self, model, lang: str) -> dict:
        """True-image accuracy, every scene: ``{"accuracy", "correct", "n", "lo", "hi", "by_attribute"}``
        (Wilson 95% interval)."""
        was_training = model.training
        model.eval()
        sc = self.scores(model, lang)
        model.train(was_training)
        right: dict[str, list[int]] = {}
        for q, start, n in self.questions[lang]:
            best = int(sc[start:start + n].argmax())
            right.setdefault(q.attribute, []).append(int(q.candidates[best] == q.answer))
        return _accuracy_dict(right)

    def outcomes(self, model, lang: str) -> dict:
        """Every condition's outcomes: ``{"grounding", "image_reliance", "per_scene"}`` for ``lang``.

        ``per_scene`` (lists in :attr:`scenes` order; per question in :data:`ATTRIBUTES` order):
        ``correct``, ``correct_mismatched``, ``correct_none`` (0/1) and ``logprob``,
        ``logprob_mismatched``, ``logprob_none`` (the right answer's log-likelihood, nats), and per
        scene ``gain_accuracy`` (mean correct, true minus mismatched) and ``gain_logprob`` (mean
        log-likelihood, true minus mismatched). ``image_reliance``: means over scenes of all of it,
        for all scenes, seen (``_seen``) and held-out (``_heldout``) ones (:func:`reliance_summary`).
        """
        if set(self.conditions) != set(CONDITIONS):
            raise UsageError(f"outcomes need every condition {CONDITIONS}; this set has {self.conditions}")
        was_training = model.training
        model.eval()
        sc = {c: self.scores(model, lang, c).tolist() for c in CONDITIONS}
        model.train(was_training)
        per: dict[str, list] = {k: [] for k in ("correct", "correct_mismatched", "correct_none", "logprob",
                                                "logprob_mismatched", "logprob_none")}
        right: dict[str, list[int]] = {}
        for k in range(len(self.scenes)):
            rows = {key: [] for key in per}
            for q, start, n in self.questions[lang][3 * k:3 * k + 3]:
                ans = q.candidates.index(q.answer)
                for cond, suf in (("true", ""), ("mismatched", "_mismatched")):
                    s = sc[cond][start:start + n]
                    rows["correct" + suf].append(int(max(range(n), key=s.__getitem__) == ans))
                    rows["logprob" + suf].append(round(s[ans], 5))
                b0, cands = self.blank_questions[lang][q.attribute]
                s = sc["none"][b0:b0 + len(cands)]
                rows["correct_none"].append(int(max(range(len(cands)), key=s.__getitem__) == ans))
                rows["logprob_none"].append(round(s[ans], 5))
                right.setdefault(q.attribute, []).append(rows["correct"][-1])
            for key in per:
                per[key].append(rows[key])
        for gain, measure in (("gain_accuracy", "correct"), ("gain_logprob", "logprob")):
            per[gain] = [round(_mean(a) - _mean(b), 5) for a, b in zip(per[measure], per[measure + "_mismatched"])]
        return {"grounding": _accuracy_dict(right), "image_reliance": reliance_summary(per, self.heldout),
                "per_scene": per}


def _cache_name(model) -> str:
    """The key/value cache's argument and output name: ``cache`` (transformers >= 5.2x), else ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _accuracy_dict(right: dict[str, list[int]]) -> dict:
    correct = sum(sum(v) for v in right.values())
    n = sum(len(v) for v in right.values())
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": correct / n, "correct": correct, "n": n, "lo": lo, "hi": hi,
            "by_attribute": {a: sum(v) / len(v) for a, v in right.items()}}


def reliance_summary(per_scene: dict, heldout: list[bool]) -> dict:
    """Means over scenes of one (checkpoint, language)'s per-scene outcomes, by split.

    Keys ``accuracy``, ``accuracy_mismatched``, ``accuracy_none``, ``logprob``, ``logprob_mismatched``,
    ``logprob_none``, ``gain`` (accuracy, true minus mismatched) and ``gain_logprob``; each for every
    scene, and with ``_seen`` / ``_heldout`` for the seen / held-out scenes only.
    """
    out = {}
    for suffix, which in SPLITS.items():
        keep = [k for k, h in enumerate(heldout) if which is None or h == which]
        if not keep:
            continue

        def avg(key, keep=keep):
            return _mean(v for k in keep for v in per_scene[key][k])

        for measure in ("correct", "logprob"):
            name = "accuracy" if measure == "correct" else "logprob"
            for cond in ("", "_mismatched", "_none"):
                out[name + cond + suffix] = avg(measure + cond)
        out["gain" + suffix] = out["accuracy" + suffix] - out["accuracy_mismatched" + suffix]
        out["gain_logprob" + suffix] = out["logprob" + suffix] - out["logprob_mismatched" + suffix]
    return out


def answer_logprob(model, batch: dict):
    """Sum over the labelled (answer) tokens of each row's log-probability [B]."""
    import torch

    from driftlens.train.grounding import label_logprobs

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
    """Korean captions of the held-out scenes (:func:`shapes.heldout_scenes`): never trained on.

    No stage trains on anything about a held-out scene, and image questions have one-word answers,
    so none of these captions (a trained sentence form, new combinations of color, shape and place)
    is a training string (tested).
    """
    return [shapes.caption(s, "ko") for s in shapes.heldout_scenes()]


def heldout_en_texts() -> list[str]:
    """English captions of the held-out scenes: never trained on (as :func:`heldout_ko_texts`)."""
    return [shapes.caption(s, "en") for s in shapes.heldout_scenes()]


def new_form_ko_texts() -> list[str]:
    """Korean in sentence forms never trained on (:data:`HELDOUT_KO_TEMPLATES`, one per scene)
    and unseen plain sentences: how far the adaptation generalizes beyond its templates."""
    out = []
    for k, s in enumerate(shapes.all_scenes()):
        t = HELDOUT_KO_TEMPLATES[k % len(HELDOUT_KO_TEMPLATES)]
        out.append(t.format(color=shapes.COLORS[s.color], shape=shapes.SHAPES[s.shape],
                            position=shapes.POSITIONS[s.position]))
    return out + list(HELDOUT_KO_SENTENCES)


def seen_texts(lang: str) -> list[str]:
    """Training strings in ``lang``: captions and question/answer text of every third seen scene."""
    scenes = shapes.seen_scenes()[::3]
    return [shapes.caption(s, lang) for s in scenes] + \
        [QA_TEXT[lang].format(prompt=q.prompt, answer=q.answer) for s in scenes for q in shapes.questions(s, lang)]


def seen_ko_texts() -> list[str]:
    """Korean training strings (:func:`seen_texts`)."""
    return seen_texts("ko")


def lm_loss(model, processor, texts: list[str]) -> float:
    """Mean token cross-entropy (nats per token) on ``texts``, without an image."""
    import torch

    batch = encode_text(processor, texts)
    with torch.no_grad():
        return float(model(**batch, use_cache=False).loss)


def ko_lm_loss(model, processor, texts: list[str] | None = None) -> float:
    """Mean token cross-entropy (nats per token) on Korean text, without an image.

    Parameters
    ----------
    texts : list of str, optional
        Default :func:`heldout_ko_texts` (captions of held-out scenes, never trained on).
    """
    return lm_loss(model, processor, heldout_ko_texts() if texts is None else texts)


def text_losses(model, processor) -> dict[str, float]:
    """Every LM loss of :data:`LOSSES` for one model."""
    return {"ko_lm_loss": ko_lm_loss(model, processor),
            "ko_lm_loss_new_forms": lm_loss(model, processor, new_form_ko_texts()),
            "ko_lm_loss_seen": lm_loss(model, processor, seen_texts("ko")),
            "en_lm_loss": lm_loss(model, processor, heldout_en_texts()),
            "en_lm_loss_seen": lm_loss(model, processor, seen_texts("en"))}


def evaluate_model(model, processor, evalset: EvalSet) -> dict:
    """One model's outcomes: ``{"grounding": {lang: ...}, "image_reliance": {lang: ...},
    "per_scene": {lang: ...}, <each LM loss>: float}`` (see :meth:`EvalSet.outcomes`)."""
    out: dict = {"grounding": {}, "image_reliance": {}, "per_scene": {}}
    for lang in evalset.rows:
        o = evalset.outcomes(model, lang)
        for key in ("grounding", "image_reliance", "per_scene"):
            out[key][lang] = o[key]
    out.update(text_losses(model, processor))
    return out


def evaluate_all(trajectory: Trajectory, progress) -> dict:
    """Evaluate every checkpoint of ``trajectory`` (no cache; see :func:`evaluate`).

    ``progress``: a reporter ``(stage, step, total, note)``, True (a progress board on stderr) or False.
    """
    report, board = _reporter(progress, trajectory.seed)
    ev = {"chance_accuracy": chance_accuracy(), "scenes": [s.key for s in shapes.all_scenes()],
          "heldout_scenes": [s.key for s in shapes.heldout_scenes()],
          "mismatched_scene": [shapes.mismatched_scene(s).key for s in shapes.all_scenes()],
          "attributes": list(ATTRIBUTES), "no_image": NO_IMAGE,
          "grounding": {}, "grounding_accuracy": {}, "image_reliance": {}, **{key: {} for key in LOSSES},
          "per_scene": {}}
    evalset = None
    labels = list(trajectory.all_checkpoints.items())
    try:
        for i, (label, path) in enumerate(labels):
            if report is not None:
                report("evaluation", i, len(labels), label)
            model, processor = load_checkpoint(path)
            if evalset is None:
                evalset = EvalSet(processor, trajectory.recipe.image_size)
            one = evaluate_model(model, processor, evalset)
            ev["grounding"][label] = one["grounding"]
            ev["grounding_accuracy"][label] = {lang: g["accuracy"] for lang, g in one["grounding"].items()}
            ev["image_reliance"][label] = one["image_reliance"]
            ev["per_scene"][label] = one["per_scene"]
            for key in LOSSES:
                ev[key][label] = one[key]
        if report is not None:
            report("evaluation", len(labels), len(labels), "")
    finally:
        if board is not None:
            board.close()
    return ev


def _reporter(progress, seed: int):
    """``(reporter or None, board to close or None)`` from a reporter, True or False."""
    if callable(progress):
        return progress, None
    if not progress:
        return None, None
    from driftlens.organism.progress import Board, Reporter

    board = Board()
    return Reporter(seed, board.update), board


def dumps(ev: dict) -> str:
    """``evaluation.json``'s text: indented, with each per-scene list on one line."""
    per = ev.get("per_scene", {})
    text = json.dumps({**ev, "per_scene": "\0"}, indent=2, ensure_ascii=False)
    lines = []
    for label, by_lang in per.items():
        for lang, arrays in by_lang.items():
            body = ", ".join(f'"{k}": {json.dumps(v, separators=(",", ":"))}' for k, v in arrays.items())
            lines.append(f'    "{label}/{lang}": {{{body}}}')
    block = "{\n" + ",\n".join(lines) + "\n  }" if lines else "{}"
    return text.replace('"\\u0000"', block)


def loads(text: str) -> dict:
    """``evaluation.json`` back into the dict :func:`evaluate_all` made (per-scene keys ``label/lang`` split)."""
    ev = json.loads(text)
    per: dict = {}
    for key, arrays in ev.get("per_scene", {}).items():
        label, _, lang = key.rpartition("/")
        per.setdefault(label, {})[lang] = arrays
    ev["per_scene"] = per
    return ev


def evaluate(trajectory: Trajectory, progress: bool = True) -> dict:
    """Every outcome of every checkpoint of the trajectory and its control (:func:`evaluate_all`).

    Computed at build time and read from the trajectory's ``evaluation.json``; computed again
    (and the file replaced) when it lacks a checkpoint or an outcome.
    """
    cache = trajectory.root / "evaluation.json"
    if cache.exists():
        ev = loads(cache.read_text(encoding="utf-8"))
        if set(ev.get("ko_lm_loss", {})) == set(trajectory.all_checkpoints) and \
                set(ev.get("per_scene", {})) == set(trajectory.all_checkpoints):
            return ev
    ev = evaluate_all(trajectory, progress)
    atomic_write(cache, dumps(ev))
    return ev

