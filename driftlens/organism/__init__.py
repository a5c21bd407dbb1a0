"""The model organism: a tiny bilingual LLaVA trained here, whose Korean adaptation really drifts.

- :mod:`~driftlens.organism.shapes`: the world (scenes, renderings, captions, questions);
- :mod:`~driftlens.organism.tokenizer`: its byte-level BPE tokenizer;
- :mod:`~driftlens.organism.train`: recipe, model, data streams, training, the cached build;
- :mod:`~driftlens.organism.evaluation`: grounding accuracy and Korean LM loss;
- :mod:`~driftlens.organism.probe_sets`: probe sets of the world;
- :mod:`~driftlens.organism.labels`: probe labels of the world (color, shape, position) for ``dl.probe``;
- :mod:`~driftlens.organism.demo`: ``driftlens demo``;
- :mod:`~driftlens.organism.example`: one seed measured and cached -- what the notebooks start from;
- :mod:`~driftlens.organism.experiment`: ``driftlens experiment regularizer``.

This ``__init__`` only re-exports (``from driftlens import organism; organism.build_seeds(...)``).
"""
from driftlens.organism import shapes, tokenizer
from driftlens.organism.evaluation import (  # noqa: F401
    EvalSet,
    answer_logprob,
    answer_scores,
    chance_accuracy,
    evaluate,
    evaluate_all,
    heldout_ko_texts,
    ko_lm_loss,
    new_form_ko_texts,
    seen_ko_texts,
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
)

__all__ = ["CODE_VERSION", "EN_SENTENCES", "EvalSet", "HELDOUT_KO_SENTENCES", "HELDOUT_KO_TEMPLATES", "ImageBank",
           "KO_SENTENCES", "PROMPT_CAPTION", "QA_TEXT", "Recipe", "SENTENCES", "STAGE_PREFIX",
           "TRAIN_SEEDS", "Example", "Trajectory", "VALIDATION_SEEDS", "answer_logprob", "answer_scores",
           "build", "build_seeds", "cache_root", "chance_accuracy", "continuation_batches", "corpus",
           "encode_image_examples", "encode_text", "evaluate", "evaluate_all", "example",
           "heldout_ko_texts", "ko_lm_loss", "load_checkpoint", "make_model", "make_processor",
           "new_form_ko_texts", "parse_group", "render_seed", "save_checkpoint", "seen_ko_texts", "shapes",
           "text_pool", "tokenizer", "wilson_interval", "world_label"]
