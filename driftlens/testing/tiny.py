"""Tiny random-weight vision-language models of every spec'd family, built offline.

Each family is built from its transformers config classes (hidden sizes 32-64, two decoder
blocks by default, 32-64 px images) with a processor assembled from processor classes and
the offline tokenizer of :mod:`driftlens.organism.tokenizer`. The models keep the real checkpoints'
module tree, image-placeholder expansion (tiles, grids, anyres, prefix) and chat layout, so a
spec, a capture or a PEFT schedule that works here meets the same structure on the real
model. Nothing is downloaded.

Examples
--------
>>> model, processor = build("llava", seed=0, n_layers=2)      # doctest: +SKIP
>>> save("qwen2_vl", "/tmp/tiny-qwen2-vl")                      # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from driftlens.errors import UsageError
from driftlens.inputs import chat_template
from driftlens.sources import image_only_processor as _image_only

FAMILIES: tuple[str, ...] = (
    "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl",
    "idefics3", "paligemma", "internvl", "gemma3",
    "qwen3_vl", "qwen3_vl_moe", "llama4", "glm4v", "glm4v_moe", "aria",
)
#: families whose decoder has mixture-of-experts blocks (their specs name the router)
MOE_FAMILIES: tuple[str, ...] = ("qwen3_vl_moe", "llama4", "glm4v_moe", "aria")

HIDDEN = 64          # LLM hidden size
VISION_HIDDEN = 32   # vision tower hidden size
HEADS = 4            # attention heads (LLM and vision tower)
EXPERTS = 4          # routed experts of an MoE decoder block
TOP_K = 2            # experts per token (Llama 4 routes each token to one)
KV_HEADS = 2         # LLM key/value heads (grouped-query attention, as in most real VLMs)
IMAGE = 32           # vision tower input resolution (px)
PATCH = 8            # vision patch size (px): (32 / 8)^2 = 16 patches per tile


_CHATML = dict(user="<|im_start|>user\n", end_user="<|im_end|>\n",
               assistant="<|im_start|>assistant\n", end_assistant="<|im_end|>\n")


# ----------------------------------------------------------------------------- helpers

def _tokenizer(extra: tuple[str, ...], named: dict[str, str] | None = None):
    """Offline BPE tokenizer with ``extra`` special tokens; ``named`` registers model-specific
    special-token attributes (e.g. ``tokenizer.image_token``) that save and reload."""
    from driftlens.organism.tokenizer import build_tokenizer

    tok = build_tokenizer(extra_special_tokens=extra)
    if named:
        # transformers >= 5: named multimodal tokens are saved in tokenizer_config.json and
        # restored as attributes (``image_token``, ``image_token_id``) on load.
        tok._set_model_specific_special_tokens(dict(named))
    tok.padding_side = "right"
    return tok


def _ids(tok) -> dict:
    return dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _text(tok, n_layers: int, overrides: dict, **family) -> dict:
    """Decoder-LM config fields: shared tiny defaults (vocab sized to the tokenizer), then the
    family's own, then the caller's overrides."""
    cfg = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
               num_hidden_layers=n_layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
               max_position_embeddings=1024, **_ids(tok))
    cfg.update(family)
    cfg.update(overrides)
    return cfg


def _vit(overrides: dict, **family) -> dict:
    """Vision-tower config fields: tiny defaults, then the family's own, then the overrides."""
    cfg = dict(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=2,
               num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH)
    cfg.update(family)
    cfg.update(overrides)
    return cfg


def _split(overrides: dict) -> tuple[dict, dict, dict]:
    """Split overrides into (text, vision, top-level) config fields.

    ``vision_config={...}`` updates the vision config, ``top_config={...}`` the top-level
    config, any other keyword the text (LLM) config.
    """
    text = dict(overrides)
    vision = dict(text.pop("vision_config", None) or {})
    top = dict(text.pop("top_config", None) or {})
    return text, vision, top


# Families whose processors take a video processor (transformers >= 5 makes it mandatory).
VIDEO_FAMILIES = frozenset({"llava_onevision", "qwen2_vl", "qwen2_5_vl", "internvl", "qwen3_vl", "qwen3_vl_moe",
                            "glm4v", "glm4v_moe"})


def _with_video(cls, video_cls: str, **parts):
    """Instantiate processor ``cls`` whose ``__init__`` wants a video processor.

    With torchvision the family's video processor is built with its defaults (videos are
    never used here). Without it -- video processors in transformers 5 are torchvision-only
    and the processor refuses ``None`` -- an image-only processor is made (see
    :func:`_image_only`): it processes images exactly like ``cls`` and saves the same files
    minus the video processor; :func:`load_processor` reads them back.
    """
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        import transformers

        return cls(video_processor=getattr(transformers, video_cls)(), **parts)
    return _image_only(cls)(video_processor=None, **parts)


# ----------------------------------------------------------------------------- families
# Each returns (config, processor). ``t``/``v``/``c`` are the text/vision/top-level overrides.

def _llava(n_layers, t, v, c):
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaProcessor

    tok = _tokenizer(("<image>",), {"image_token": "<image>"})
    # llava-1.5-hf: "USER: <image>\n{prompt} ASSISTANT:"
    template = chat_template("USER: ", "<image>\n", " ", "ASSISTANT:", "</s>")
    ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=template)
    cfg = LlavaConfig(
        vision_config=_vit(v, model_type="clip_vision_model", projection_dim=VISION_HIDDEN),
        text_config=_text(tok, n_layers, t, model_type="llama"),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE // PATCH) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2, **c)
    return cfg, proc


_PINPOINTS = [[IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE], [2 * IMAGE, 2 * IMAGE]]


def _llava_next(n_layers, t, v, c):
    from transformers import LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor

    tok = _tokenizer(("<image>",), {"image_token": "<image>"})
    # llava-v1.6-mistral-7b-hf: "[INST] <image>\n{prompt} [/INST]"
    template = chat_template("[INST] ", "<image>\n", " [/INST]", "", "</s>", bos="<s>")
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                                    image_grid_pinpoints=_PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=template)
    cfg = LlavaNextConfig(
        vision_config=_vit(v, model_type="clip_vision_model", projection_dim=VISION_HIDDEN),
        text_config=_text(tok, n_layers, t, model_type="mistral"),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=_PINPOINTS,
        image_seq_length=(IMAGE // PATCH) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2, **c)
    return cfg, proc


def _llava_onevision(n_layers, t, v, c):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    tok = _tokenizer(("<image>", "<video>", "<|im_start|>", "<|im_end|>"),
                     {"image_token": "<image>", "video_token": "<video>"})
    # llava-onevision-qwen2 (and VARCO-VISION): ChatML with "<image>\n" before the text
    template = chat_template(image="<image>\n", **_CHATML)
    ip = LlavaOnevisionImageProcessorPil(size={"height": IMAGE, "width": IMAGE},
                                         image_grid_pinpoints=_PINPOINTS)
    proc = _with_video(LlavaOnevisionProcessor, "LlavaOnevisionVideoProcessor", image_processor=ip,
                       tokenizer=tok, num_image_tokens=(IMAGE // PATCH) ** 2,
                       vision_feature_select_strategy="full", chat_template=template)
    cfg = LlavaOnevisionConfig(
        vision_config=_vit(v, model_type="siglip_vision_model"),
        text_config=_text(tok, n_layers, t, model_type="qwen2"),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=_PINPOINTS, vision_feature_select_strategy="full", vision_feature_layer=-1, **c)
    return cfg, proc


def _qwen_tokenizer():
    return _tokenizer(("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                       "<|im_start|>", "<|im_end|>"),
                      {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                       "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})


def _qwen_processor(tok, proc_cls, video: str = "Qwen2VLVideoProcessor"):
    from transformers import Qwen2VLImageProcessorPil

    # Qwen2-VL: "<|vision_start|><|image_pad|><|vision_end|>" before the text, ChatML turns.
    template = chat_template(image="<|vision_start|><|image_pad|><|vision_end|>", **_CHATML)
    factor = PATCH * 2   # patch * spatial merge: images are resized to multiples of 16 px
    ip = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 4 * factor * factor,
                                        "longest_edge": 16 * factor * factor})
    return _with_video(proc_cls, video, image_processor=ip, tokenizer=tok, chat_template=template)


def _qwen_top(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _mrope(head_dim: int) -> dict:
    half = head_dim // 2            # mrope sections (t, h, w) sum to head_dim / 2
    h = (half - half // 4) // 2
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * h, h, h]}


def _qwen2_vl(n_layers, t, v, c):
    from transformers import Qwen2VLConfig, Qwen2VLProcessor

    tok = _qwen_tokenizer()
    proc = _qwen_processor(tok, Qwen2VLProcessor)
    text = _text(tok, n_layers, t)
    text.setdefault("rope_parameters", _mrope(text["hidden_size"] // text["num_attention_heads"]))
    vision = dict(depth=2, embed_dim=VISION_HIDDEN, hidden_size=text["hidden_size"], num_heads=HEADS,
                  mlp_ratio=2, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
    vision.update(v)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_top(tok), **c)
    return cfg, proc


def _qwen2_5_vl(n_layers, t, v, c):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

    tok = _qwen_tokenizer()
    proc = _qwen_processor(tok, Qwen2_5_VLProcessor)
    text = _text(tok, n_layers, t)
    text.setdefault("rope_parameters", _mrope(text["hidden_size"] // text["num_attention_heads"]))
    # window attention over 2x2 merged patches (window_size px // merge // patch = 2), last block full
    vision = dict(depth=2, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_heads=HEADS,
                  out_hidden_size=text["hidden_size"], patch_size=PATCH, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=4 * PATCH, fullatt_block_indexes=[1])
    vision.update(v)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_top(tok), **c)
    return cfg, proc


def _idefics3(n_layers, t, v, c):
    from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

    rows = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
    tok = _tokenizer(("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                      "<|im_start|>") + rows, {"image_token": "<image>"})
    # SmolVLM: "<|im_start|>User:<image>{prompt}<end_of_utterance>\nAssistant:"
    template = chat_template("User:", "<image>", "<end_of_utterance>\n", "Assistant:",
                              "<end_of_utterance>\n", bos="<|im_start|>")
    scale = 2
    seq_len = (IMAGE // PATCH) ** 2 // scale ** 2
    # images up to 64 px are split into 32 px tiles (2x2 for a square) plus one global tile
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 2 * IMAGE}, max_image_size={"longest_edge": IMAGE},
                                   do_image_splitting=True)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq_len, chat_template=template)
    cfg = Idefics3Config(
        vision_config=_vit(v), text_config=_text(tok, n_layers, t, model_type="llama"),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale, **c)
    return cfg, proc


def _paligemma(n_layers, t, v, c):
    from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessorPil

    tok = _tokenizer(("<image>",), {"image_token": "<image>"})
    ip = SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    ip.image_seq_length = (IMAGE // PATCH) ** 2
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)   # no chat template (prefix LM)
    text = _text(tok, n_layers, t, model_type="gemma", head_dim=HIDDEN // HEADS,
                 hidden_activation="gelu_pytorch_tanh")
    cfg = PaliGemmaConfig(
        vision_config=_vit(v, model_type="siglip_vision_model", projection_dim=text["hidden_size"]),
        text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vocab_size=text["vocab_size"], projection_dim=text["hidden_size"], hidden_size=text["hidden_size"], **c)
    return cfg, proc


def _internvl(n_layers, t, v, c):
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLProcessor

    tok = _tokenizer(("<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|im_start|>", "<|im_end|>"),
                     {"start_image_token": "<img>", "end_image_token": "</img>",
                      "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    # InternVL3-hf: ChatML with "<IMG_CONTEXT>\n" before the text; the processor expands it
    # to "<img>" + "<IMG_CONTEXT>" * (image_seq_length * tiles) + "</img>"
    template = chat_template(image="<IMG_CONTEXT>\n", **_CHATML)
    ratio = 0.5
    seq_len = int((IMAGE // PATCH) ** 2 * ratio ** 2)
    ip = GotOcr2ImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, crop_to_patches=True,
                                  min_patches=1, max_patches=4)
    proc = _with_video(InternVLProcessor, "InternVLVideoProcessor", image_processor=ip, tokenizer=tok,
                       image_seq_length=seq_len, chat_template=template)
    vision = _vit(v, image_size=[IMAGE, IMAGE], patch_size=[PATCH, PATCH])
    cfg = InternVLConfig(
        vision_config=vision, text_config=_text(tok, n_layers, t, model_type="qwen2"),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=seq_len,
        downsample_ratio=ratio, **c)
    return cfg, proc


def _gemma3(n_layers, t, v, c):
    from transformers import Gemma3Config, Gemma3ImageProcessorPil, Gemma3Processor

    tok = _tokenizer(("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>",
                      "<end_of_turn>"),
                     {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                      "image_token": "<image_soft_token>"})
    # gemma-3-it: "<bos><start_of_turn>user\n<start_of_image>{prompt}<end_of_turn>\n<start_of_turn>model\n"
    template = chat_template("<start_of_turn>user\n", "<start_of_image>", "<end_of_turn>\n",
                              "<start_of_turn>model\n", "<end_of_turn>\n", bos="<s>")
    tokens = 4          # mm_tokens_per_image: 4x4 patches average-pooled to 2x2
    ip = Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=tokens, chat_template=template)
    text = _text(tok, n_layers, t, head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS,
                 sliding_window=16)
    ids = tok.convert_tokens_to_ids
    cfg = Gemma3Config(
        text_config=text, vision_config=_vit(v, model_type="siglip_vision_model"),
        mm_tokens_per_image=tokens, boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"), **c)
    return cfg, proc


def _qwen3_vl(n_layers, t, v, c, moe: bool = False):
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig, Qwen3VLProcessor

    tok = _qwen_tokenizer()
    proc = _qwen_processor(tok, Qwen3VLProcessor, video="Qwen3VLVideoProcessor")
    head_dim = HIDDEN // HEADS
    text = _text(tok, n_layers, t, head_dim=head_dim)
    text.setdefault("rope_parameters", {**_mrope(head_dim), "mrope_interleaved": True})
    if moe:      # every block sparse (decoder_sparse_step 1), as Qwen3-VL-30B-A3B
        text = {"num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "moe_intermediate_size": HIDDEN // 2,
                "decoder_sparse_step": 1, **text}
    # DeepStack: visual features of vision block 0 are also added to the first decoder block's output
    vision = dict(depth=2, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_heads=HEADS,
                  out_hidden_size=text["hidden_size"], patch_size=PATCH, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=(IMAGE // PATCH) ** 2, deepstack_visual_indexes=[0])
    vision.update(v)
    cfg = (Qwen3VLMoeConfig if moe else Qwen3VLConfig)(text_config=text, vision_config=vision, **_qwen_top(tok), **c)
    return cfg, proc


def _qwen3_vl_moe(n_layers, t, v, c):
    return _qwen3_vl(n_layers, t, v, c, moe=True)


def _glm4v(n_layers, t, v, c, moe: bool = False):
    from transformers import Glm4vConfig, Glm4vImageProcessorPil, Glm4vMoeConfig, Glm4vProcessor

    tok = _tokenizer(("<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                      "<|end_of_video|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|endoftext|>"),
                     {"image_token": "<|image|>", "video_token": "<|video|>"})
    # GLM-4.1V / GLM-4.5V: "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>{prompt}<|assistant|>\n"
    template = chat_template("<|user|>\n", "<|begin_of_image|><|image|><|end_of_image|>", "", "<|assistant|>\n",
                              "<|endoftext|>", bos="[gMASK]<sop>")
    factor = PATCH * 2
    ip = Glm4vImageProcessorPil(patch_size=PATCH, merge_size=2, temporal_patch_size=2,
                                size={"shortest_edge": 4 * factor * factor, "longest_edge": 16 * factor * factor})
    proc = _with_video(Glm4vProcessor, "Glm4vVideoProcessor", image_processor=ip, tokenizer=tok,
                       chat_template=template)
    head_dim = HIDDEN // HEADS
    text = _text(tok, n_layers, t, head_dim=head_dim)
    # rotary on half of each head (partial_rotary_factor 0.5), M-RoPE sections over that half, as GLM-4.1V / 4.5V
    text.setdefault("rope_parameters", {**_mrope(head_dim // 2), "partial_rotary_factor": 0.5})
    if moe:      # block 0 dense, the others sparse with a shared expert, as GLM-4.5V (one block: sparse)
        text = {"n_routed_experts": EXPERTS, "num_experts_per_tok": TOP_K, "moe_intermediate_size": HIDDEN // 2,
                "first_k_dense_replace": 1 if n_layers > 1 else 0, "n_shared_experts": 1, "n_group": 1,
                "topk_group": 1, **text}
    vision = dict(depth=2, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_heads=HEADS,
                  out_hidden_size=text["hidden_size"], patch_size=PATCH, spatial_merge_size=2,
                  temporal_patch_size=2, image_size=IMAGE)
    vision.update(v)
    ids = tok.convert_tokens_to_ids
    cfg = (Glm4vMoeConfig if moe else Glm4vConfig)(
        text_config=text, vision_config=vision, image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"), image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"), video_end_token_id=ids("<|end_of_video|>"), **c)
    return cfg, proc


def _glm4v_moe(n_layers, t, v, c):
    return _glm4v(n_layers, t, v, c, moe=True)


ARIA_IMAGE = 980     # Aria's processor always resizes to its max_image_size (a processor default: 490 or 980)
ARIA_PATCH = 140     # so that the tiny tower sees 7 x 7 patches of a 980 px image


def _aria(n_layers, t, v, c):
    from transformers import AriaConfig, AriaImageProcessorPil, AriaProcessor

    tok = _tokenizer(("<|img|>", "<|im_start|>", "<|im_end|>"), {"image_token": "<|img|>"})
    # Aria: ChatML turns with the image placeholder before the text; the processor expands <|img|>
    template = chat_template(image="<|img|>\n", **_CHATML)
    queries = 4           # the projector's cross-attention turns 7 x 7 patches into 4 visual tokens
    ip = AriaImageProcessorPil(max_image_size=ARIA_IMAGE, min_image_size=ARIA_IMAGE // 2, split_image=False)
    proc = AriaProcessor(image_processor=ip, tokenizer=tok, chat_template=template,
                         size_conversion={ARIA_IMAGE // 2: queries, ARIA_IMAGE: queries})
    text = _text(tok, n_layers, t, moe_num_experts=EXPERTS, moe_topk=TOP_K, moe_num_shared_experts=1)
    vision = _vit(v, model_type="idefics3_vision", image_size=ARIA_IMAGE, patch_size=ARIA_PATCH)
    cfg = AriaConfig(text_config=text, vision_config=vision,
                     image_token_index=tok.convert_tokens_to_ids("<|img|>"),
                     projector_patch_to_query_dict={(ARIA_IMAGE // ARIA_PATCH) ** 2: queries}, **c)
    return cfg, proc


def _llama4_image_processor(**kwargs):
    """transformers' Llama4ImageProcessor (torchvision), or driftlens's NumPy/PIL port without torchvision."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Llama4ImageProcessor

        return Llama4ImageProcessor(**kwargs)
    from driftlens.testing.processors import Llama4ImageProcessorPil

    return Llama4ImageProcessorPil(**kwargs)


def _llama4(n_layers, t, v, c):
    from transformers import Llama4Config, Llama4Processor

    tok = _tokenizer(("<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>",
                      "<|tile_y_separator|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|begin_of_text|>"),
                     {"image_token": "<|image|>"})
    # Llama-4-*-Instruct: "<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>{prompt}<|eot|>..."
    template = chat_template("<|header_start|>user<|header_end|>\n\n", "<|image|>", "<|eot|>",
                              "<|header_start|>assistant<|header_end|>\n\n", "<|eot|>", bos="<|begin_of_text|>")
    # up to 2 x 2 tiles of 32 px plus a global tile, as the real processor tiles 336 px
    ip = _llama4_image_processor(size={"height": IMAGE, "width": IMAGE}, max_patches=4)
    proc = Llama4Processor(image_processor=ip, tokenizer=tok, patch_size=PATCH, pixel_shuffle_ratio=0.5,
                           chat_template=template)
    # blocks alternate dense / sparse (interleave_moe_layer_step 2), as Llama-4-Maverick (one block: sparse);
    # one expert per token
    text = _text(tok, n_layers, t, head_dim=HIDDEN // HEADS, num_local_experts=EXPERTS, num_experts_per_tok=1,
                 intermediate_size=HIDDEN, intermediate_size_mlp=2 * HIDDEN,
                 interleave_moe_layer_step=2 if n_layers > 1 else 1,
                 attention_chunk_size=256, no_rope_layer_interval=2)
    vision = dict(hidden_size=VISION_HIDDEN, intermediate_size=4 * VISION_HIDDEN, num_hidden_layers=2,
                  num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH, pixel_shuffle_ratio=0.5,
                  vision_output_dim=text["hidden_size"], projector_input_dim=text["hidden_size"],
                  projector_output_dim=text["hidden_size"])
    vision.update(v)
    ids = tok.convert_tokens_to_ids
    cfg = Llama4Config(text_config=text, vision_config=vision, image_token_index=ids("<|patch|>"),
                       boi_token_index=ids("<|image_start|>"), eoi_token_index=ids("<|image_end|>"), **c)
    return cfg, proc


_BUILDERS: dict[str, Callable] = {
    "llava": _llava, "llava_next": _llava_next, "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "idefics3": _idefics3,
    "paligemma": _paligemma, "internvl": _internvl, "gemma3": _gemma3,
    "qwen3_vl": _qwen3_vl, "qwen3_vl_moe": _qwen3_vl_moe, "llama4": _llama4, "glm4v": _glm4v,
    "glm4v_moe": _glm4v_moe, "aria": _aria,
}


# ----------------------------------------------------------------------------- public API

def build_config(family: str, n_layers: int = 2, **overrides):
    """The config and processor of a tiny ``family`` model, without weights.

    Parameters
    ----------
    family : str
        One of :data:`FAMILIES`.
    n_layers : int
        Decoder blocks in the language model.
    **overrides
        Text (LLM) config fields (``hidden_size=32``); ``vision_config={...}`` updates the
        vision config and ``top_config={...}`` the top-level config. Image and patch sizes
        are fixed (:data:`IMAGE`, :data:`PATCH`): the processor is built to match them.

    Returns
    -------
    (transformers.PretrainedConfig, transformers.ProcessorMixin)
    """
    if family not in _BUILDERS:
        raise UsageError(f"unknown tiny family {family!r}; available: {', '.join(FAMILIES)}")
    if n_layers < 1:
        raise UsageError(f"n_layers must be >= 1, got {n_layers}")
    return _BUILDERS[family](n_layers, *_split(overrides))


def build(family: str, seed: int = 0, n_layers: int = 2, **overrides):
    """A tiny random-weight model of ``family`` and its processor (offline, deterministic).

    Parameters
    ----------
    family : str
        One of :data:`FAMILIES`.
    seed : int
        Seeds the weight initialization: the same seed gives identical weights.
    n_layers : int
        Decoder blocks in the language model (default 2).
    **overrides
        Config fields, see :func:`build_config`.

    Returns
    -------
    (transformers.PreTrainedModel, transformers.ProcessorMixin)
        The model in ``eval()`` mode, float32, on CPU; the processor pads on the right.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    config, processor = build_config(family, n_layers, **overrides)
    with _seeded(seed):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.eval()
    return model, processor


def save(family: str, out_dir, seed: int = 0, **overrides) -> Path:
    """Build a tiny model and write it to ``out_dir`` (safetensors, config, processor).

    The directory loads offline with ``AutoModelForImageTextToText.from_pretrained(out_dir)``
    and ``AutoProcessor.from_pretrained(out_dir)``. ``**overrides`` (``n_layers`` included)
    are passed to :func:`build`.

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """
    out = Path(out_dir)
    model, processor = build(family, seed=seed, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def load_processor(path):
    """Load a saved processor offline (see :func:`driftlens.sources.load_processor`).

    A Llama 4 processor saved without torchvision (its image processor the NumPy/PIL port of
    :mod:`driftlens.testing.processors`, saved as ``Llama4ImageProcessor``) is read back with the
    port where transformers' own class would need torchvision.
    """
    import json

    from transformers.utils import is_torchvision_available

    from driftlens.sources import load_processor as _load

    config = Path(path) / "processor_config.json"
    body = json.loads(config.read_text()) if config.is_file() else {}
    image = body.get("image_processor", {}) if isinstance(body.get("image_processor"), dict) else {}
    if body.get("processor_class") == "Llama4Processor" and not is_torchvision_available() \
            and image.get("image_processor_type") == "Llama4ImageProcessor":
        from transformers import AutoTokenizer, Llama4Processor

        from driftlens.testing.processors import Llama4ImageProcessorPil

        kept = {k: v for k, v in image.items() if k not in ("image_processor_type", "processor_class", "backend")}
        extra = {k: v for k, v in body.items() if k not in ("processor_class", "image_processor")}
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        template = Path(path) / "chat_template.jinja"
        if template.is_file():
            extra["chat_template"] = template.read_text(encoding="utf-8")
        return Llama4Processor(image_processor=Llama4ImageProcessorPil(**kept), tokenizer=tok, **extra)
    return _load(path)


class _seeded:
    """Context manager: fork the torch RNG, seed it, restore it on exit."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def __enter__(self):
        import torch

        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)
