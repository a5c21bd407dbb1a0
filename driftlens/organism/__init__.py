"""The model organism: a tiny bilingual LLaVA trained here, whose Korean adaptation really drifts.

- :mod:`~driftlens.organism.shapes`: the world (scenes, renderings, captions, questions);
- :mod:`~driftlens.organism.tokenizer`: its byte-level BPE tokenizer;
- :mod:`~driftlens.organism.data`: what it trains on as plain data (seen and held-out scenes, training
  renders that are never evaluation / validation / probe images, the batch streams, replayable);
- :mod:`~driftlens.organism.train`: recipe, model, training, the cached build (seeds in parallel processes);
- :mod:`~driftlens.organism.progress`: build progress on a terminal and in logs;
- :mod:`~driftlens.organism.evaluation`: grounding and image reliance per scene, LM losses on held-out text;
- :mod:`~driftlens.organism.probe_sets`: probe sets of the world;
- :mod:`~driftlens.organism.labels`: probe labels of the world (color, shape, position) for ``dl.linear_probe``;
- :mod:`~driftlens.organism.demo`: ``driftlens demo``;
- :mod:`~driftlens.organism.example`: one seed measured and cached -- what the notebooks start from;
- :mod:`~driftlens.organism.experiment`: ``driftlens experiment regularizer``.

This ``__init__`` only re-exports (``from driftlens import organism; organism.build_seeds(...)``).
"""
from driftlens.organism import data, shapes, tokenizer
from driftlens.organism.data import Step, TrainingRenders, base_plan, continuation_plan, reserved_images, training_plan
from driftlens.organism.evaluation import (  # noqa: F401
    EvalSet,
    answer_logprob,
    answer_scores,
    chance_accuracy,
    evaluate,
    evaluate_all,
    evaluate_model,
    heldout_en_texts,
    heldout_ko_texts,
    ko_lm_loss,
    lm_loss,
    new_form_ko_texts,
    seen_ko_texts,
    seen_texts,
    wilson_interval,
)
from driftlens.organism.example import Example, example
from driftlens.organism.labels import parse_group, world_label
from driftlens.organism.train import (  # noqa: F401
    CODE_VERSION,
    EN_SENTENCES,
    HELDOUT_KO_SENTENCES,
    HELDOUT_KO_TEMPLATES,
    KO_SENTENCES,
    PROMPT_CAPTION,
    QA_TEXT,
    SENTENCES,
    STAGE_PREFIX,
    TRAIN_SEEDS,
    VALIDATION_SEEDS,
    ImageBank,
    Recipe,
    Trajectory,
    build,
    build_seeds,
    cache_root,
    continuation_batches,
    corpus,
    encode_image_examples,
    encode_text,
    load_checkpoint,
    make_model,
    make_processor,
    render_seed,
    save_checkpoint,
    text_pool,
    training_bank,
    validation_set,
)

__all__ = ["CODE_VERSION", "EN_SENTENCES", "EvalSet", "Step", "TrainingRenders", "base_plan", "continuation_plan",
           "data", "evaluate_model", "heldout_en_texts", "lm_loss", "reserved_images", "seen_texts", "training_bank",
           "training_plan", "validation_set", "HELDOUT_KO_SENTENCES", "HELDOUT_KO_TEMPLATES", "ImageBank",
           "KO_SENTENCES", "PROMPT_CAPTION", "QA_TEXT", "Recipe", "SENTENCES", "STAGE_PREFIX",
           "TRAIN_SEEDS", "Example", "Trajectory", "VALIDATION_SEEDS", "answer_logprob", "answer_scores",
           "build", "build_seeds", "cache_root", "chance_accuracy", "continuation_batches", "corpus",
           "encode_image_examples", "encode_text", "evaluate", "evaluate_all", "example",
           "heldout_ko_texts", "ko_lm_loss", "load_checkpoint", "make_model", "make_processor",
           "new_form_ko_texts", "parse_group", "render_seed", "save_checkpoint", "seen_ko_texts", "shapes",
           "text_pool", "tokenizer", "wilson_interval", "world_label"]
