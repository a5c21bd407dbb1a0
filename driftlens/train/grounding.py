"""The grounding contrast: a margin on how much the image helps the answer, for the training objective.

:class:`GroundingContrast` runs one extra, text-only forward (the image tokens removed from the
batch, :func:`text_only_batch`) and penalizes the answer's log-probability with the image falling
less than ``margin`` nats above its log-probability without it (:func:`grounding_contrast`); the
objective (:class:`driftlens.train.objective.DriftObjective`) adds it with ``contrast_weight``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from driftlens.errors import UsageError

TEXT_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids")


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, reduce: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Log-probability of each row's labelled tokens (labels ``!= -100``), differentiable.

    Parameters
    ----------
    logits : tensor [B, T, V]
        Model output for the batch (position t predicts token t + 1, as HF's LM loss).
    labels : tensor [B, T]
        Token ids, ``-100`` where nothing is scored (prompt, padding).
    reduce : {"mean", "sum"}
        Per row: mean (per scored token) or sum of the log-probabilities.

    Returns
    -------
    tensor [B]
    """
    logp = torch.log_softmax(logits[:, :-1].float(), -1)               # [B, T-1, V]
    target = labels[:, 1:]                                               # [B, T-1]
    mask = (target != -100).to(logp.dtype)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask   # [B, T-1]
    total = picked.sum(1)
    if reduce == "sum":
        return total
    if reduce != "mean":
        raise UsageError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    return total / mask.sum(1).clamp(min=1.0)


def text_only_batch(batch: Mapping, image_token_id: int, pad_token_id: int) -> dict:
    """The same batch without its image: image-placeholder tokens removed from every row (and from
    ``labels`` / ``attention_mask`` / ``token_type_ids`` alike), rows re-padded on the side they were
    padded on, every vision input (pixel values, grids, sizes) dropped.

    The answer tokens are untouched, so ``labels`` score the same tokens with and without the image.
    """
    ids = batch["input_ids"]                                             # [B, T]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    keep = (ids != image_token_id) & (mask > 0)                          # [B, T]
    left = bool((mask[:, 0] == 0).any()) and not bool((mask[:, -1] == 0).any())
    width = int(keep.sum(1).max())
    present = [k for k in TEXT_KEYS if k in batch]
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100, "token_type_ids": 0}
    out = {k: torch.full((ids.shape[0], width), fill[k], dtype=batch[k].dtype, device=ids.device) for k in present}
    if "attention_mask" not in out:
        out["attention_mask"] = torch.zeros((ids.shape[0], width), dtype=torch.long, device=ids.device)
        present.append("attention_mask")
    for j in range(ids.shape[0]):
        n = int(keep[j].sum())
        cols = slice(width - n, width) if left else slice(0, n)
        for k in present:
            src = mask if k == "attention_mask" and k not in batch else batch[k]
            out[k][j, cols] = src[j][keep[j]]
    return out


def grounding_contrast(logp_image: torch.Tensor, logp_text: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Margin form of ``-log P(y | image, text) + log P(y | text)``: ``mean(relu(margin - delta))``.

    ``delta = logp_image - logp_text`` per row (mean log-probability of the answer tokens with and
    without the image). The plain difference rewards making text-only predictions worse without
    bound; the hinge stops once the image helps by ``margin`` nats per answer token, so the term
    lies in ``[0, margin + max(0, -delta)]`` and is 0 when grounding is already there.
    """
    if not margin >= 0:
        raise UsageError(f"margin must be >= 0, got {margin}")
    return torch.relu(margin - (logp_image - logp_text)).mean()


class GroundingContrast(torch.nn.Module):
    """The grounding contrast of a batch, given the model output with the image already computed.

    Calls the model once more on :func:`text_only_batch` (the one extra cost) and returns
    :func:`grounding_contrast` of the two answer log-probabilities. ``last`` keeps the mean
    ``delta`` for logging.
    """

    def __init__(self, image_token_id: int, pad_token_id: int, margin: float = 1.0):
        super().__init__()
        if not margin >= 0:
            raise UsageError(f"margin must be >= 0, got {margin}")
        self.image_token_id, self.pad_token_id, self.margin = int(image_token_id), int(pad_token_id), float(margin)
        self.last: dict[str, float] = {}

    def forward(self, model, batch: Mapping, logits_image: torch.Tensor) -> torch.Tensor:
        """The mean hinge over the batch's image rows (one text-only forward)."""
        if "labels" not in batch:
            raise UsageError("the grounding contrast needs `labels` (answer tokens, -100 elsewhere) in the batch")
        text = text_only_batch(batch, self.image_token_id, self.pad_token_id)
        labels = text.pop("labels")
        logits_text = model(**text, use_cache=False).logits
        lp_i = label_logprobs(logits_image, batch["labels"])            # [B]
        lp_t = label_logprobs(logits_text, labels)                       # [B]
        self.last = {"delta": float((lp_i - lp_t).mean().detach())}
        return grounding_contrast(lp_i, lp_t, self.margin)
