"""Model inputs for a batch of (image, prompt) probes, for any spec'd VLM family.

One image and one user prompt per sample. The prompt is wrapped by the processor's chat
template when it has one (``add_generation_prompt=True``), else by the spec's
``prompt_template``; the processor then expands the image placeholder into exactly as many
image tokens as the model produces visual features (Qwen2-VL ``image_grid_thw``, Idefics3
tiles, LLaVA-NeXT/OneVision anyres ``image_sizes``, the PaliGemma prefix, ...).
"""
from __future__ import annotations

from driftlens.errors import DataError, UsageError

# Training-only outputs some processors add (PaliGemma builds ``labels`` from the prefix).
_DROP = ("labels",)


def token_rows(input_ids, attention_mask, image_token_id: int):
    """Which positions of a batch are visual and which are text: the one rule every reader of a batch follows.

    A position is *visual* when it is not padding and holds the image token, *text* when it is not
    padding and holds any other token; padding (``attention_mask == 0``) is neither. Capture's
    rows, the :class:`~driftlens.train.tap.VisualTap`'s rows and the probe batches' clusters
    (:func:`driftlens.train.hf.probe_batches`) all come from here.

    Parameters
    ----------
    input_ids : numpy.ndarray or torch.Tensor
        ``[batch, seq]`` token ids.
    attention_mask : numpy.ndarray or torch.Tensor, optional
        ``[batch, seq]``, > 0 at real tokens (of the same kind and device as ``input_ids``); None:
        no padding.
    image_token_id : int
        The id of the image placeholder token (``spec.image_token_id(config)``).

    Returns
    -------
    visual, text : boolean arrays of the inputs' kind
        ``[batch, seq]`` each.
    """
    keep = input_ids == input_ids if attention_mask is None else attention_mask > 0       # [B, S] non-padding
    visual = (input_ids == image_token_id) & keep                                          # [B, S]
    return visual, keep & ~visual


def prompt_text(processor, spec, prompt: str) -> str:
    """The text of one sample before placeholder expansion.

    Uses ``processor.apply_chat_template`` with one user turn ``[image, text]`` when the
    processor has a chat template, else ``spec.prompt_template.format(prompt=prompt)``,
    else the bare prompt (the processor then places the image itself, as PaliGemma does).
    """
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    template = getattr(spec, "prompt_template", None)
    return template.format(prompt=prompt) if template else prompt


def model_inputs(processor, spec, images, prompts):
    """Build a right-padded batch, one image and one user prompt per sample.

    Parameters
    ----------
    processor : transformers.ProcessorMixin
        The model's processor (image processor + tokenizer).
    spec : driftlens.specs.Spec
        Architecture spec; its ``prompt_template`` is used when the processor has no chat template.
    images : list of PIL.Image.Image
        One image per sample (converted to RGB).
    prompts : list of str
        One user prompt per sample.

    Returns
    -------
    transformers.BatchFeature
        ``input_ids`` and ``attention_mask`` ``[B, S]`` (right padding), ``pixel_values`` and
        whatever else the family needs (``image_grid_thw``, ``image_sizes``,
        ``pixel_attention_mask``, ``token_type_ids``, ...), as torch tensors.
    """
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise UsageError(f"model_inputs needs one image per prompt, got {len(images)} images "
                         f"and {len(prompts)} prompts")
    if not images:
        raise UsageError("model_inputs needs at least one (image, prompt) pair")
    images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
    texts = [prompt_text(processor, spec, p) for p in prompts]
    # images nested one per sample ([[im], [im], ...]): every processor reads that as
    # "sample i has one image"; padding_side is passed per call because some processors
    # (InternVL) default to left padding in their own text kwargs.
    batch = processor(text=texts, images=[[im] for im in images], return_tensors="pt",
                      padding=True, padding_side="right")
    for k in _DROP:
        batch.pop(k, None)
    return batch


def chat_template(user: str, image: str, end_user: str, assistant: str, end_assistant: str,
                   bos: str = "") -> str:
    """A minimal Jinja chat template in the layout of a real model's.

    Messages are ``{"role", "content"}`` with content a string or a list of
    ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts; an image part renders
    as ``image`` (the processor expands it to the model's placeholder tokens).
    """
    return (
        bos
        + "{% for m in messages %}"
        "{% if m['role'] == 'user' %}" + user
        + "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
          "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image
        + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}" + end_user
        + "{% else %}" + assistant
        + "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
          "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
          "{% endif %}" + end_assistant
        + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + assistant + "{% endif %}"
    )


def max_positions(config) -> int | None:
    """The most token positions the language model takes (``max_position_embeddings`` of its text
    config, else of the config itself); None when the config does not say."""
    try:
        text = config.get_text_config()
    except (AttributeError, TypeError, ValueError):
        text = config
    for cfg in (text, config):
        n = getattr(cfg, "max_position_embeddings", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def check_positions(inputs, config, probes) -> None:
    """Refuse a batch whose sequences are longer than the model's positions, before any forward.

    A sequence past ``max_position_embeddings`` runs into position embeddings the model never
    learned (or past its rotary range), and a very long prompt costs attention memory quadratic in
    its length: such a probe is refused, naming it and both lengths. driftlens does not truncate --
    cutting the prompt would change what the probe asks, and the cut would differ between families.

    Parameters
    ----------
    inputs : mapping
        The batch (``input_ids``, optional ``attention_mask``).
    config : transformers.PretrainedConfig
        The model's config.
    probes : sequence of Probe
        The batch's probes, in order (for the message).
    """
    limit = max_positions(config)
    if limit is None:
        return
    ids = inputs["input_ids"]                                    # [B, S]
    mask = inputs.get("attention_mask")
    lengths = [int(ids.shape[1])] * int(ids.shape[0]) if mask is None else [int(v) for v in mask.sum(1)]
    for p, n in zip(probes, lengths):
        if n > limit:
            raise DataError(f"probe {p.id!r}: its input is {n} tokens (prompt of {len(p.prompt)} characters, "
                            f"with the image's tokens), longer than the model's {limit} positions "
                            f"(max_position_embeddings); shorten the prompt in the probe set -- driftlens does "
                            f"not truncate probes")
