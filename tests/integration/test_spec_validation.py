"""Spec validation against a model: the error messages name the file, the broken path and the nearest module.

(The spec tests that load no model are in ``tests/unit/test_specs.py``.)
"""
from __future__ import annotations

import dataclasses

import pytest

from driftlens.specs import Spec, SpecError, load_spec
from tests.unit.test_specs import write_spec


@pytest.fixture(scope="module")
def tiny_llava():
    from driftlens.testing.tiny import build

    return build("llava", seed=0, n_layers=2)[0]


def test_wrong_path_names_file_path_and_nearest_module(tmp_path, tiny_llava):
    load_spec(tiny_llava).validate(tiny_llava)
    path = write_spec(tmp_path, "typo.toml", key_proj="self_attn.key_proj", projector="model.mm_projector",
                      lora_targets=["self_attn.q_proj", "self_attn.v_prj"])
    spec = load_spec(path=path)
    with pytest.raises(SpecError) as err:
        spec.validate(tiny_llava)
    msg = str(err.value)
    assert str(path) in msg
    assert "'model.language_model.layers.0.self_attn.key_proj' not found" in msg
    assert "nearest existing: model.language_model.layers.0.self_attn.k_proj" in msg
    assert "'model.mm_projector' not found" in msg and "model.multi_modal_projector" in msg
    assert "layers.0.self_attn.v_prj' not found" in msg and "model.language_model.layers.0.self_attn.v_proj" in msg
    assert "query_proj" not in msg                                         # only the broken paths


def test_validate_checks_layers_and_image_token_fields(tiny_llava):
    spec = load_spec(tiny_llava)
    not_list = dataclasses.replace(spec, decoder_layers="model.language_model")
    with pytest.raises(SpecError, match="not a non-empty ModuleList"):
        not_list.validate(tiny_llava)
    missing = dataclasses.replace(spec, decoder_layers="model.language_model.blocks")
    with pytest.raises(SpecError, match=r"decoder_layers: module 'model.language_model.blocks' not found"
                                        r".*nearest existing: model.language_model.layers"):
        missing.validate(tiny_llava)
    with pytest.raises(SpecError, match="model.language_model.blocks' not found"):
        missing.num_layers(tiny_llava)
    no_token = dataclasses.replace(spec, image_token=("img_id",))
    with pytest.raises(SpecError, match=r"image_token = \['img_id'\].*image_token_id"):
        no_token.validate(tiny_llava)
    assert isinstance(spec, Spec) and spec.num_layers(tiny_llava) == 2
