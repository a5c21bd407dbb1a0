"""Architecture specs: where the decoder blocks, keys, vision tower and projector live.

One TOML file per VLM family under ``hooks/`` (shipped in the wheel) says where to
look -- no code per model. A spec is picked by ``config.model_type`` and checked against the
loaded model before anything is traced; a wrong path fails with a message naming the spec
file, the path and the nearest module names that do exist.

Example spec (``hooks/llava.toml``)::

    family = "llava"
    model_types = ["llava"]
    decoder_layers = "model.language_model.layers"
    key_proj = "self_attn.k_proj"
    query_proj = "self_attn.q_proj"
    lora_targets = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    block_modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    vision_tower = "model.vision_tower"
    projector = "model.multi_modal_projector"
    embed = "model.language_model.embed_tokens"
    final_norm = "model.language_model.norm"
    image_token = ["image_token_id", "image_token_index"]
    prompt_template = "USER: <image>\\n{prompt} ASSISTANT:"

``block_modules`` (optional) lists every module of one decoder block that LoRA may adapt (its
``Linear`` layers: attention and MLP projections). When a spec has it, ``driftlens ranks
--modules`` / :func:`driftlens.ranks.allocate_ranks` refuse a target outside it before any file is
written, and :meth:`Spec.validate` checks each entry exists in block 0; without it targets are
checked only against a loaded model.

Mixture-of-experts decoders add four optional fields (``hooks/qwen3_vl_moe.toml``)::

    router = "mlp.gate"                      # the router, relative to one decoder block
    router_logits = 0                        # position of the logits [tokens, experts] in its output
    router_scores = "softmax"                # "softmax" or "sigmoid" (normalized to sum 1)
    router_top_k = ["num_experts_per_tok"]   # text-config fields holding the experts per token

Blocks that have the router are the sparse ones (:meth:`Spec.router_layers`); the capture site
``route`` reads the router's logits there and stores the routing distribution over experts.
"""
from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from driftlens.errors import DataError

_STR_FIELDS = ("family", "decoder_layers", "key_proj", "query_proj", "vision_tower", "projector", "embed",
               "final_norm")
_LIST_FIELDS = ("model_types", "lora_targets", "image_token")
_OPTIONAL = ("prompt_template", "block_modules", "router", "router_logits", "router_scores", "router_top_k")
#: how a router's logits become the routing distribution over experts (see :meth:`Spec.route_probabilities`)
ROUTER_SCORES = ("softmax", "sigmoid")

SEARCH_PATH_ENV = "DRIFTLENS_HOOKS"
HOW_TO_ADD = (
    "To add a model, write a TOML spec (copy hooks/llava.toml and list your config.model_type in "
    f"`model_types`) into a directory named by ${SEARCH_PATH_ENV} (several: separated by os.pathsep), "
    "or pass it explicitly: load_spec(path='my_model.toml') / capture(..., spec='my_model.toml')."
)


class SpecError(DataError):
    """A spec is missing, malformed, or does not match the model; the message says where."""


@dataclass(frozen=True)
class Spec:
    """Where one VLM family keeps its parts (dotted module paths, see the module docstring).

    Attributes
    ----------
    family : str
        Family name, e.g. ``"llava"``.
    model_types : tuple of str
        ``config.model_type`` values this spec serves.
    decoder_layers : str
        Path from the top-level model to the ``ModuleList`` of decoder blocks.
    key_proj, query_proj : str
        Key / query projections, relative to one decoder block.
    lora_targets : tuple of str
        Modules to adapt with LoRA, relative to one decoder block.
    vision_tower, projector, embed, final_norm : str
        Paths from the top-level model: vision encoder, vision-to-LLM projector, LLM input
        embedding, the decoder's final norm (its output is HF's last ``hidden_states`` entry).
    image_token : tuple of str
        Config fields holding the image-placeholder token id; the first present wins.
    prompt_template : str or None
        ``str.format`` template with ``{prompt}``, used only when the processor has no chat template.
    path : pathlib.Path
        The TOML file the spec came from.
    block_modules : tuple of str
        Every module of one decoder block LoRA may adapt (relative to the block); empty when the
        spec does not say (optional field).
    router : str or None
        The mixture-of-experts router, relative to one decoder block (present in the sparse blocks
        only); None for a dense decoder.
    router_logits : int
        Position of the router logits ``[tokens, experts]`` in the router's output tuple.
    router_scores : {"softmax", "sigmoid"}
        How the logits become the routing distribution (sigmoid scores are normalized to sum 1).
    router_top_k : tuple of str
        Text-config fields holding the number of experts per token, first present wins.
    """

    family: str
    model_types: tuple[str, ...]
    decoder_layers: str
    key_proj: str
    query_proj: str
    lora_targets: tuple[str, ...]
    vision_tower: str
    projector: str
    embed: str
    final_norm: str
    image_token: tuple[str, ...]
    prompt_template: str | None
    path: Path
    block_modules: tuple[str, ...] = ()
    router: str | None = None
    router_logits: int = 0
    router_scores: str = "softmax"
    router_top_k: tuple[str, ...] = ()

    # ------------------------------------------------------------------ paths
    def layer_path(self, i: int) -> str:
        """Dotted path of decoder block ``i``."""
        return f"{self.decoder_layers}.{int(i)}"

    def module_path(self, i: int, rel: str) -> str:
        """Dotted path of module ``rel`` (e.g. ``"self_attn.k_proj"``) inside decoder block ``i``."""
        return f"{self.decoder_layers}.{int(i)}.{rel}"

    def num_layers(self, model) -> int:
        """Number of decoder blocks of ``model`` (a PEFT-wrapped model is unwrapped)."""
        model = unwrap(model)
        return len(self._get(model, self.decoder_layers, _names(model)))

    def image_token_id(self, config) -> int:
        """Image-placeholder token id: the first of ``image_token`` present on ``config``.

        ``config`` may also be a model (its ``.config`` is used).
        """
        config = getattr(unwrap(config), "config", config)
        for name in self.image_token:
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        raise SpecError(
            f"spec {self.path}: none of the image-token config fields {list(self.image_token)} is set on "
            f"{type(config).__name__} (model_type {getattr(config, 'model_type', None)!r}); "
            f"fix `image_token` in the spec to name the field that holds the image-placeholder token id"
        )

    # ------------------------------------------------------------------ mixture of experts
    def router_layers(self, model) -> list[int]:
        """Decoder blocks of ``model`` that have the spec's router (the sparse ones); [] without a router."""
        if self.router is None:
            return []
        model = unwrap(model)
        blocks = self._get(model, self.decoder_layers, _names(model))
        return [i for i, block in enumerate(blocks) if self._find(block, self.router) is not None]

    def n_experts(self, model) -> int:
        """Routed experts per sparse block: the rows of the first router's weight."""
        layers = self.router_layers(model)
        if not layers:
            raise SpecError(f"spec {self.path}: {type(unwrap(model)).__name__} has no router {self.router!r} in any "
                            f"decoder block" if self.router else f"spec {self.path} names no router (a dense decoder)")
        router = unwrap(model).get_submodule(self.module_path(layers[0], self.router))
        return int(router.weight.shape[0])

    def top_k(self, config) -> int | None:
        """Experts per token: the first ``router_top_k`` field present on the text config (None if none)."""
        config = getattr(unwrap(config), "config", config)
        try:
            text = config.get_text_config()
        except (AttributeError, TypeError, ValueError):
            text = config
        for name in self.router_top_k:
            for cfg in (text, config):
                value = getattr(cfg, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return None

    def route_probabilities(self, logits):
        """The routing distribution over experts from router logits ``[..., experts]`` (float32).

        ``softmax``: the softmax of the logits (Qwen3-VL-MoE, Aria); ``sigmoid``: the sigmoid
        scores normalized to sum 1 (Llama 4, GLM-4.5V). Either way the top-k experts of the
        distribution are the top-k logits.
        """
        import torch

        logits = logits.float()
        if self.router_scores == "sigmoid":
            s = torch.sigmoid(logits)
            return s / s.sum(-1, keepdim=True)
        return torch.softmax(logits, dim=-1)

    # ------------------------------------------------------------------ validation
    def validate(self, model) -> None:
        """Check every path of the spec on ``model``; raise :class:`SpecError` listing each problem.

        Checked: ``decoder_layers`` (a non-empty ModuleList), ``key_proj``, ``query_proj``,
        every ``lora_targets`` and ``block_modules`` entry in block 0, ``vision_tower``, ``projector``, ``embed``,
        ``final_norm``, and
        that one of the ``image_token`` config fields is set. A PEFT model is unwrapped first.
        """
        import torch.nn as nn

        model = unwrap(model)
        names = _names(model)
        problems = []
        layers = self._find(model, self.decoder_layers)
        if layers is None:
            problems.append(self._missing("decoder_layers", self.decoder_layers, names))
        elif not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            problems.append(f"decoder_layers = {self.decoder_layers!r} is a {type(layers).__name__} "
                            f"with {len(list(layers.children()))} children, not a non-empty ModuleList "
                            f"of decoder blocks")
        else:
            rels = [("key_proj", self.key_proj), ("query_proj", self.query_proj)]
            rels += [("lora_targets", t) for t in self.lora_targets]
            rels += [("block_modules", t) for t in self.block_modules if t not in {r for _, r in rels}]
            for field, rel in rels:
                full = self.module_path(0, rel)
                if self._find(model, full) is None:
                    problems.append(self._missing(field, full, names))
        for field in ("vision_tower", "projector", "embed", "final_norm"):
            path = getattr(self, field)
            if self._find(model, path) is None:
                problems.append(self._missing(field, path, names))
        if self.router is not None and isinstance(layers, nn.ModuleList) and len(layers) \
                and not self.router_layers(model):
            problems.append(self._missing("router", self.module_path(0, self.router), names)
                            + " (in no decoder block: the router names the mixture-of-experts gate of a sparse block)")
        config = getattr(model, "config", None)
        if config is not None and not any(getattr(config, f, None) is not None for f in self.image_token):
            fields = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
            have = sorted(k for k in fields if "token" in k and ("image" in k or "img" in k))
            problems.append(f"image_token = {list(self.image_token)}: none of these config fields is set on "
                            f"{type(config).__name__}; image-token fields it has: {have}")
        if problems:
            raise SpecError(
                f"spec {self.path} (family {self.family!r}) does not match {type(model).__name__} "
                f"(model_type {getattr(config, 'model_type', None)!r}):\n  - " + "\n  - ".join(problems)
                + f"\nEdit {self.path} or pass spec=<path to a corrected TOML file>."
            )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _find(model, path: str):
        try:
            return model.get_submodule(path)
        except AttributeError:
            return None

    def _get(self, model, path: str, names: list[str]):
        module = self._find(model, path)
        if module is None:
            raise SpecError(f"spec {self.path}: " + self._missing("decoder_layers", path, names))
        return module

    @staticmethod
    def _missing(field: str, path: str, names: list[str]) -> str:
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.4)
        hint = f"; nearest existing: {', '.join(close)}" if close else "; no similar module name exists"
        return f"{field}: module {path!r} not found{hint}"


def unwrap(model):
    """The transformers model inside a PEFT ``PeftModel`` (anything else is returned as is)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _names(model) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


# ---------------------------------------------------------------------- reading specs

def _hooks_dir():
    return resources.files("driftlens.hooks")


def search_path() -> list[Path]:
    """The user's spec directories, from ``$DRIFTLENS_HOOKS`` (``os.pathsep``-separated), in order.

    Their specs come before the shipped ones: a user spec replaces the shipped spec of the same
    ``family`` and wins the ``model_type`` it claims. A named directory that does not exist is an
    error (a typo would otherwise silently fall back to the shipped spec).
    """
    raw = os.environ.get(SEARCH_PATH_ENV, "")
    dirs = [Path(d).expanduser() for d in raw.split(os.pathsep) if d.strip()]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise SpecError(f"${SEARCH_PATH_ENV} names {', '.join(missing)}, which is not a directory")
    return dirs


def _user_specs() -> list[Spec]:
    return [parse_spec(f) for d in search_path() for f in sorted(d.glob("*.toml"))]


def parse_spec(path) -> Spec:
    """Read and check one TOML spec file; :class:`SpecError` names the file and the field."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"spec file {path} is not valid TOML: {e}") from None
    return _from_dict(data, path)


def _from_dict(data: dict, path: Path) -> Spec:
    known = set(_STR_FIELDS) | set(_LIST_FIELDS) | set(_OPTIONAL)
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"spec {path}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    missing = [k for k in (*_STR_FIELDS, *_LIST_FIELDS) if k not in data]
    if missing:
        raise SpecError(f"spec {path}: missing field(s) {missing}")
    for k in _STR_FIELDS:
        if not isinstance(data[k], str) or not data[k].strip():
            raise SpecError(f"spec {path}: field {k!r} must be a non-empty string, got {data[k]!r}")
    for k in _LIST_FIELDS:
        v = data[k]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise SpecError(f"spec {path}: field {k!r} must be a non-empty list of strings, got {v!r}")
    block_modules = _block_modules(data, path)
    template = data.get("prompt_template")
    if template is not None and (not isinstance(template, str) or "{prompt}" not in template):
        raise SpecError(f"spec {path}: prompt_template must be a string containing '{{prompt}}', got {template!r}")
    router = _router_fields(data, path)
    return Spec(
        family=data["family"], model_types=tuple(data["model_types"]),
        decoder_layers=data["decoder_layers"], key_proj=data["key_proj"], query_proj=data["query_proj"],
        lora_targets=tuple(data["lora_targets"]), vision_tower=data["vision_tower"],
        projector=data["projector"], embed=data["embed"], final_norm=data["final_norm"],
        image_token=tuple(data["image_token"]),
        prompt_template=template, path=path, block_modules=block_modules, **router,
    )


def _router_fields(data: dict, path: Path) -> dict:
    """The optional mixture-of-experts fields, checked (``router`` is required by the others)."""
    given = [k for k in ("router_logits", "router_scores", "router_top_k") if k in data]
    router = data.get("router")
    if router is None:
        if given:
            raise SpecError(f"spec {path}: {given} describe a router, but the spec has no `router` field")
        return {}
    if not isinstance(router, str) or not router.strip() or router.startswith(data["decoder_layers"] + "."):
        raise SpecError(f"spec {path}: field 'router' must be a module path relative to one decoder block "
                        f"(e.g. 'mlp.gate'), got {router!r}")
    logits = data.get("router_logits", 0)
    if isinstance(logits, bool) or not isinstance(logits, int) or logits < 0:
        raise SpecError(f"spec {path}: field 'router_logits' must be an integer >= 0 (the logits' position in "
                        f"the router's output tuple), got {logits!r}")
    scores = data.get("router_scores", "softmax")
    if scores not in ROUTER_SCORES:
        raise SpecError(f"spec {path}: field 'router_scores' must be one of {list(ROUTER_SCORES)}, got {scores!r}")
    top_k = data.get("router_top_k", [])
    if not isinstance(top_k, list) or not all(isinstance(x, str) and x for x in top_k):
        raise SpecError(f"spec {path}: field 'router_top_k' must be a list of config field names, got {top_k!r}")
    return {"router": router, "router_logits": logits, "router_scores": scores, "router_top_k": tuple(top_k)}


def _block_modules(data: dict, path: Path) -> tuple[str, ...]:
    """The optional ``block_modules`` list: distinct non-empty strings relative to one decoder block."""
    v = data.get("block_modules")
    if v is None:
        return ()
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
        raise SpecError(f"spec {path}: field 'block_modules' must be a non-empty list of strings, got {v!r}")
    twice = sorted({x for x in v if v.count(x) > 1})
    if twice:
        raise SpecError(f"spec {path}: block_modules lists {twice} more than once")
    absolute = [x for x in v if x.startswith(data["decoder_layers"] + ".") or x[0].isdigit()]
    if absolute:
        raise SpecError(f"spec {path}: block_modules entries must be relative to one decoder block "
                        f"(e.g. 'self_attn.q_proj'), got {absolute}")
    return tuple(v)


def _shipped_specs() -> list[Spec]:
    specs = []
    for entry in _hooks_dir().iterdir():
        if entry.name.endswith(".toml"):
            with resources.as_file(entry) as p:
                specs.append(parse_spec(p))
    return specs


def list_specs() -> list[Spec]:
    """Every spec: the user's (``$DRIFTLENS_HOOKS``) and those shipped in ``hooks/``, sorted by family.

    A user spec replaces the shipped spec of the same family.
    """
    user = _user_specs()
    families = {s.family for s in user}
    return sorted(user + [s for s in _shipped_specs() if s.family not in families], key=lambda s: s.family)


def _available() -> str:
    return "; ".join(f"{s.family} ({', '.join(s.model_types)})" for s in list_specs())


def load_spec(model_or_config_or_model_type=None, path=None) -> Spec:
    """The spec for a model, a config, a ``model_type`` string, or a TOML file.

    Parameters
    ----------
    model_or_config_or_model_type : nn.Module, PretrainedConfig, str or path, optional
        A model (PEFT models are unwrapped) or config is matched by ``config.model_type``
        against the ``model_types`` of the shipped specs; a string is a ``model_type``, or a
        TOML path when it ends in ``.toml``.
    path : str or pathlib.Path, optional
        An explicit TOML spec file (takes precedence).

    Returns
    -------
    Spec

    Raises
    ------
    SpecError
        When no shipped spec serves the model type (the message lists the available specs
        and how to add one), or the file is missing or malformed.
    """
    if path is not None:
        return parse_spec(path)
    obj = model_or_config_or_model_type
    if obj is None:
        raise SpecError("load_spec needs a model, a config, a model_type or path=<spec TOML file>")
    if isinstance(obj, Path) or (isinstance(obj, str) and obj.endswith(".toml")):
        return parse_spec(obj)
    if isinstance(obj, str):
        model_type = obj
    else:
        obj = unwrap(obj)
        config = getattr(obj, "config", obj)
        model_type = getattr(config, "model_type", None)
        if not model_type:
            raise SpecError(f"cannot tell the model type of {type(obj).__name__}: it has no config.model_type. "
                            + HOW_TO_ADD)
    matches = [s for s in _user_specs() if model_type in s.model_types]        # the user's first
    if not matches:
        matches = [s for s in list_specs() if model_type in s.model_types]
    if not matches:
        raise SpecError(f"no spec for model_type {model_type!r}. Available specs: {_available()}. " + HOW_TO_ADD)
    if len(matches) > 1:
        raise SpecError(f"model_type {model_type!r} is claimed by several specs: "
                        f"{', '.join(str(s.path) for s in matches)}; keep it in one file")
    return matches[0]
