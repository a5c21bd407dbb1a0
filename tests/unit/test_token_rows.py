"""The visual/text row rule (driftlens.inputs.token_rows) and its three readers: capture's token plan, the
training tap and the probe batches of drift-while-training agree on a batch with padding and two images."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from driftlens import inputs as inputs_mod
from driftlens.inputs import token_rows

IMG, PAD = 9, 0
# two probes, one image each; the second is left-padded, and one of its padding positions holds the image id
IDS = torch.tensor([[9, 9, 9, 5, 6, 7, 8],
                    [9, 0, 9, 9, 4, 5, 3]])          # [B=2, S=7]
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1],
                     [0, 0, 1, 1, 1, 1, 1]])
VISUAL = {(0, 0), (0, 1), (0, 2), (1, 2), (1, 3)}
TEXT = {(0, 3), (0, 4), (0, 5), (0, 6), (1, 4), (1, 5), (1, 6)}


@dataclass
class _Probe:
    id: str
    cluster: str
    prompt: str = "what is this?"
    group: str = ""
    lang: str = "en"


class _Probes(list):
    def image(self, p):
        return None


class _Spec:
    def image_token_id(self, config):
        return IMG


def _pairs(mask) -> set:
    return {(int(b), int(s)) for b, s in np.argwhere(np.asarray(mask))}


def test_the_rule_on_numpy_and_torch():
    for ids, mask in ((IDS, MASK), (IDS.numpy(), MASK.numpy())):
        visual, text = token_rows(ids, mask, IMG)
        assert _pairs(visual) == VISUAL and _pairs(text) == TEXT
    visual, text = token_rows(IDS, None, IMG)                     # no mask: nothing is padding
    assert _pairs(visual) == VISUAL | {(1, 0)} and _pairs(text) == TEXT | {(1, 1)}


def test_capture_the_tap_and_the_probe_batches_agree(monkeypatch):
    from driftlens.capture import plan_tokens
    from driftlens.train.hf import probe_batches
    from driftlens.train.tap import VisualTap

    monkeypatch.setattr(inputs_mod, "model_inputs", lambda *a, **k: {"input_ids": IDS, "attention_mask": MASK})
    monkeypatch.setattr(inputs_mod, "check_positions", lambda *a, **k: None)
    probes = _Probes([_Probe("a", "scene-a"), _Probe("b", "scene-b")])

    plan = plan_tokens(None, _Spec(), None, probes, batch_size=2)             # capture's rows
    b = plan.batches[0]
    rows = {(int(i), int(p)): m for i, p, m in zip(b.rows_b, b.rows_p, plan.tokens["modality"])}
    assert {k for k, m in rows.items() if m == "visual"} == VISUAL
    assert {k for k, m in rows.items() if m == "text"} == TEXT

    _, clusters = probe_batches(probes, None, _Spec(), None, batch_size=2)   # one cluster per visual row
    assert clusters.tolist() == ["scene-a"] * 3 + ["scene-b"] * 2

    tap = VisualTap.__new__(VisualTap)          # only the row selection: no model to hook
    tap.image_token_id = IMG
    tap._select(IDS, MASK)
    vis, txt = tap._rows[IDS.device]            # flat (batch, position) indices, in that order
    S = IDS.shape[1]
    assert [divmod(int(i), S) for i in vis] == sorted(VISUAL)
    assert [divmod(int(i), S) for i in txt] == sorted(TEXT)


def test_a_batch_without_an_image_token_is_refused_by_the_tap():
    from driftlens.errors import UsageError
    from driftlens.train.tap import VisualTap

    tap = VisualTap.__new__(VisualTap)
    tap.image_token_id = IMG
    with pytest.raises(UsageError, match="no image token"):
        tap._select(torch.tensor([[9, 1, 2]]), torch.tensor([[0, 1, 1]]))     # the image id only at padding
