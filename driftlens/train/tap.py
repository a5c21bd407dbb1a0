"""Read visual- and text-token hidden states during a training forward pass, with autograd.

:class:`VisualTap` puts light forward hooks on chosen decoder blocks of a VLM. While a forward
pass of the model runs, each hook gathers -- with one ``index_select`` on the block's output --
the rows of the visual tokens and of the text tokens, and keeps them connected to the autograd
graph, so a loss on them (:class:`driftlens.AnchorDriftLoss`) can be added to the LM loss:
no second forward, no ``torch.no_grad``, no nnsight::

    loss_fn = dl.AnchorDriftLoss.from_store(ds, checkpoint="base", layers=[1, 2, 3])
    with VisualTap(model, loss_fn.layers) as tap:
        for batch in loader:
            out = model(**batch)                     # the tap reads input_ids from this call
            loss = out.loss + lam * loss_fn(tap.visual, tap.text)
            loss.backward()

The rows are exactly those the capture engine (:func:`driftlens.capture.plan_tokens` /
``trace_batch``, site ``hidden``) stores: visual = positions where ``input_ids`` is the image
token among the attention-mask positions, text = every other attention-mask position; the
state of layer ``i`` is the output of decoder block ``i`` (element 0 when the block returns a
tuple); rows come in (batch, position) order.

Which rows
----------
A forward pre-hook on the transformers model reads ``input_ids`` and ``attention_mask`` from each
call, so a training loop (or a Hugging Face ``Trainer``) needs nothing more than ``model(**batch)``.
:meth:`VisualTap.set_batch` overrides that for the next forward (a forward given
``inputs_embeds`` only, or a call that bypasses the top-level model). Forwards the tap must not
read -- the text-only pass of the grounding contrast, ``generate``, an evaluation pass -- go inside
``with tap.paused():``.

Wrapping
--------
The decoder blocks are found through the spec's ``decoder_layers`` path on the *transformers*
model (a PEFT ``PeftModel`` is unwrapped with :func:`driftlens.specs.unwrap`), so the same block
objects are hooked whether or not LoRA wraps the model's Linear layers; wrappers around the whole
model (DDP, accelerate) leave the hooks in place.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Literal, Self

from driftlens.errors import UsageError
from driftlens.inputs import token_rows
from driftlens.specs import Spec, load_spec, unwrap

SITES = ("hidden", "key")


class VisualTap:
    """Forward hooks on decoder blocks that keep, for the current forward, the visual-token and
    text-token hidden states of chosen layers (autograd-connected).

    Parameters
    ----------
    model : nn.Module
        A transformers VLM of a spec'd family, or a PEFT model wrapping one.
    layers : int or sequence of int, optional
        Decoder blocks to read (distinct, ``0 .. n_layers - 1``); default every block.
    spec : Spec or path, optional
        Architecture spec; default picked by ``config.model_type``.
    site : {"hidden", "key"}
        What is read: ``"hidden"``, the output of each decoder block (the store's ``hidden``
        variable); ``"key"``, the output of each block's key projection (``spec.key_proj``, the
        store's ``key`` variable: the attention keys before rotary embedding, ``[rows, n_kv x
        head_dim]``). The hook sits on the module found at that path when the tap is made, so a
        PEFT model's LoRA-wrapped projection is read with its adapter. The store's ``final`` is
        unlayered (one final-norm vector per token) and is not a site here.
    keep_text : bool
        Also keep the text-token rows (``text``); the tracking mode of the regularizer needs them.

    Attributes
    ----------
    visual : dict of int -> Tensor
        ``layer -> [n_visual_rows, d]`` of the last forward, rows in (batch, position) order.
    text : dict of int -> Tensor
        ``layer -> [n_text_rows, d]`` of the last forward (empty with ``keep_text=False``).
    layers : list of int
        The layers read, sorted.
    image_token_id : int
        The image-placeholder token id (``spec.image_token_id`` of the model's config).
    """

    def __init__(self, model, layers=None, spec=None, site: Literal["hidden", "key"] = "hidden",
                 keep_text: bool = True):
        if site not in SITES:
            raise UsageError(f"VisualTap site must be one of {SITES}, got {site!r}")
        self.model = model
        self.base = unwrap(model)                     # the transformers model (PEFT unwrapped)
        self.spec = _resolve_spec(self.base, spec)
        self.blocks = _decoder_blocks(self.base, self.spec)
        self.layers = _check_layers(layers, len(self.blocks), self.spec)
        if site == "key":                   # the key projection of each block (LoRA-wrapped or not)
            self.blocks = [_key_module(block, self.spec, i) for i, block in enumerate(self.blocks)]
        self.image_token_id = int(self.spec.image_token_id(self.base.config))
        self.site = site
        self.keep_text = bool(keep_text)
        self.visual: dict = {}
        self.text: dict = {}
        self._handles: list = []
        self._mask = None          # [B, S] bool: non-padding positions of the current forward
        self._rows: dict = {}      # device -> (visual flat indices [n_v], text flat indices [n_t])
        self._explicit = False     # set_batch was called for the next forward
        self._paused = False
        self._signature = None

    # ------------------------------------------------------------------ hooks
    def attach(self) -> Self:
        """Register the hooks: a forward pre-hook on the model and one forward hook per layer."""
        if self._handles:
            raise UsageError("this VisualTap is already attached; detach() it before attaching again")
        self._handles.append(self.base.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        for layer in self.layers:
            self._handles.append(self.blocks[layer].register_forward_hook(self._block_hook(layer)))
        return self

    def detach(self) -> None:
        """Remove every hook. The states of the last forward stay readable until :meth:`clear`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._mask, self._rows, self._explicit = None, {}, False

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (f"VisualTap({self.spec.family}, layers={self.layers}, image_token_id={self.image_token_id}, "
                f"attached={self.attached})")

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside this block are not read (and need no image token): the text-only
        pass of the grounding contrast, ``generate``, evaluation. The states already read stay."""
        was, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = was

    # ------------------------------------------------------------------ rows
    def set_batch(self, input_ids, attention_mask=None) -> None:
        """Choose the rows of the next forward from its ``input_ids`` ``[B, S]`` (and mask).

        Overrides what the next forward's own ``input_ids`` would give; needed only when the
        forward gets ``inputs_embeds`` or does not go through the top-level model. Clears the
        states of the previous forward.

        Raises
        ------
        UsageError
            When the batch holds no image token, or the mask's shape differs from ``input_ids``'.
        """
        self._select(input_ids, attention_mask)
        self._explicit = True

    def clear(self) -> None:
        """Drop the states of the last forward (and the autograd graph they hold on to)."""
        self.visual = {}
        self.text = {}

    def _select(self, input_ids, attention_mask) -> None:
        import torch

        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise UsageError(f"VisualTap needs input_ids as a [batch, seq] tensor, got "
                             f"{_describe(input_ids)}")
        if attention_mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)                  # [B, S]
        else:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise UsageError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                                 f"{tuple(input_ids.shape)}; they must match")
            mask = attention_mask.to(input_ids.device) > 0                       # [B, S]
        visual, text = token_rows(input_ids, mask, self.image_token_id)           # [B, S] each
        n_visual = int(visual.sum())
        if n_visual == 0:
            raise UsageError(
                f"the batch holds no image token (id {self.image_token_id}) among its "
                f"{int(mask.sum())} non-padding positions: the tap reads visual tokens. Run forwards "
                f"without an image (text-only, generate) inside `with tap.paused():`"
            )
        self.clear()
        self._mask = mask
        self._rows = {input_ids.device: (visual.flatten().nonzero().squeeze(1),   # [n_visual]
                                         text.flatten().nonzero().squeeze(1))}    # [n_text]

    def _rows_on(self, device):
        """The flat row indices (visual, text) on ``device`` (copied there once per forward)."""
        if device not in self._rows:
            vis, txt = next(iter(self._rows.values()))
            self._rows[device] = (vis.to(device), txt.to(device))
        return self._rows[device]

    # ------------------------------------------------------------------ hook bodies
    def _on_forward(self, module, args, kwargs):
        """Forward pre-hook on the model: rows from this call's input_ids (unless set_batch ran)."""
        if self._paused:
            return
        if self._explicit:
            self._explicit = False                     # set_batch's rows serve this one forward
            return
        ids, mask = self._call_inputs(module, args, kwargs)
        if ids is None:
            raise UsageError(
                f"{type(module).__name__} was called without input_ids (inputs_embeds?); call "
                f"tap.set_batch(input_ids, attention_mask) before such a forward"
            )
        self._select(ids, mask)

    def _call_inputs(self, module, args, kwargs):
        """``input_ids`` and ``attention_mask`` of one call, given by keyword or position."""
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if args and (ids is None or mask is None):
            if self._signature is None:
                self._signature = inspect.signature(module.forward)
            try:
                bound = self._signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = {"input_ids": args[0]}
            ids = bound.get("input_ids") if ids is None else ids
            mask = bound.get("attention_mask") if mask is None else mask
        return ids, mask

    def _block_hook(self, layer: int):
        def hook(module, args, output):
            if not self._paused:
                self._gather(layer, output)

        return hook

    def _gather(self, layer: int, output) -> None:
        """Keep the visual (and text) rows of one block's output, autograd-connected."""
        if self._mask is None:
            raise UsageError(f"decoder block {self.spec.layer_path(layer)} ran before the tap knew the "
                             f"batch's rows: call the top-level model, or tap.set_batch(...) first")
        hidden = output[0] if isinstance(output, (tuple, list)) else output      # [B, S, d]
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(self._mask.shape):
            raise UsageError(
                f"decoder block {self.spec.layer_path(layer)} returned states of shape {tuple(hidden.shape)}, "
                f"but the tap's input_ids are {tuple(self._mask.shape)} [batch, seq]: the forward's sequence "
                f"does not match the input_ids the rows were chosen from"
            )
        vis, txt = self._rows_on(hidden.device)
        flat = hidden.reshape(-1, hidden.shape[-1])                               # [B*S, d]
        self.visual[layer] = flat.index_select(0, vis)                            # [n_visual, d]
        if self.keep_text:
            self.text[layer] = flat.index_select(0, txt)                          # [n_text, d]


# ---------------------------------------------------------------------- helpers

def _resolve_spec(model, spec) -> Spec:
    if spec is None:
        return load_spec(model)
    return spec if isinstance(spec, Spec) else load_spec(path=spec)


def _decoder_blocks(model, spec: Spec):
    """The ``ModuleList`` of decoder blocks at ``spec.decoder_layers`` on the transformers model."""
    from torch import nn

    try:
        blocks = model.get_submodule(spec.decoder_layers)
    except AttributeError:
        blocks = None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        from driftlens.specs import SpecError

        raise SpecError(f"spec {spec.path}: decoder_layers = {spec.decoder_layers!r} is not a non-empty "
                        f"ModuleList on {type(model).__name__}; check it with spec.validate(model)")
    return blocks


def _key_module(block, spec: Spec, i: int):
    """The key projection ``spec.key_proj`` inside decoder block ``i``."""
    try:
        return block.get_submodule(spec.key_proj)
    except AttributeError:
        from driftlens.specs import SpecError

        raise SpecError(f"spec {spec.path}: key_proj = {spec.key_proj!r} is not a module of "
                        f"{spec.layer_path(i)}; check it with spec.validate(model)") from None


def _check_layers(layers, n_layers: int, spec: Spec) -> list[int]:
    """Distinct decoder-layer indices in ``0 .. n_layers - 1``, sorted (``None``: all)."""
    import numbers

    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    try:
        ids = list(layers)
    except TypeError:
        raise UsageError(f"layers must be integers, got {layers!r}") from None
    if not ids or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        raise UsageError(f"layers must be a non-empty list of integers, got {layers!r}")
    ids = [int(i) for i in ids]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UsageError(f"layers {ids} repeat {dup}; give each decoder layer once")
    bad = [i for i in ids if not 0 <= i < n_layers]
    if bad:
        raise UsageError(f"layers {bad} out of range: {spec.decoder_layers} has {n_layers} decoder "
                         f"layers (0..{n_layers - 1})")
    return sorted(ids)


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__} of shape {tuple(shape)}" if shape is not None else type(x).__name__
