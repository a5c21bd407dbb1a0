"""Architecture specs (hooks/*.toml): parsing, lookup, error messages, validation."""
from __future__ import annotations

import json
import re
import tomllib
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest

from driftlens.specs import SpecError, list_specs, load_spec

REQUIRED = ("family", "model_types", "decoder_layers", "key_proj", "query_proj", "lora_targets",
            "vision_tower", "projector", "embed", "image_token")
EXPECTED = {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "paligemma",
            "internvl", "gemma3", "qwen3_vl", "qwen3_vl_moe", "llama4", "glm4v", "glm4v_moe", "aria"}
#: first parts of the top-level paths: ``model.`` in most families; Llama 4 keeps its towers at the top
TOP_LEVEL = {"model", "language_model", "vision_model", "multi_modal_projector"}
HOOKS = resources.files("driftlens.hooks")


def toml_files():
    return sorted(p for p in HOOKS.iterdir() if p.name.endswith(".toml"))


def write_spec(tmp_path: Path, name="custom.toml", **changes) -> Path:
    data = tomllib.loads((HOOKS / "llava.toml").read_text())
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}
    # JSON strings and string arrays are valid TOML values
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("entry", toml_files(), ids=lambda p: p.name)
def test_every_spec_file_parses_with_all_fields(entry):
    raw = tomllib.loads(entry.read_text())
    assert set(REQUIRED) <= set(raw), sorted(set(REQUIRED) - set(raw))
    spec = load_spec(path=Path(str(entry)))
    assert spec.family == entry.name[: -len(".toml")]
    assert spec.model_types and all(isinstance(t, str) for t in spec.model_types)
    for field in ("decoder_layers", "vision_tower", "projector", "embed"):
        assert getattr(spec, field).split(".")[0] in TOP_LEVEL, field   # from the top-level model
    for rel in (spec.key_proj, spec.query_proj, *spec.lora_targets):
        assert not rel.startswith("model.") and not rel[0].isdigit(), rel   # relative to one block
    assert spec.key_proj in spec.lora_targets and spec.query_proj in spec.lora_targets
    assert spec.prompt_template is None or "{prompt}" in spec.prompt_template
    assert spec.path.name == entry.name
    if spec.router is not None:          # a mixture-of-experts spec says how to read its router
        assert not spec.router.startswith(spec.decoder_layers) and spec.router_top_k, spec.path
        assert spec.router_scores in ("softmax", "sigmoid")


def test_router_fields_are_checked(tmp_path):
    spec = load_spec(path=write_spec(tmp_path, router="mlp.gate", router_scores="sigmoid",
                                     router_top_k=["num_experts_per_tok"]))
    assert spec.router == "mlp.gate" and spec.router_logits == 0 and spec.router_top_k == ("num_experts_per_tok",)
    assert load_spec(path=write_spec(tmp_path, name="dense.toml")).router is None
    for bad, match in ((dict(router_scores="relu", router="mlp.gate"), "router_scores.*softmax"),
                       (dict(router_logits=-1, router="mlp.gate"), "router_logits.*>= 0"),
                       (dict(router_top_k=["k"]), "no `router` field"),
                       (dict(router="model.language_model.layers.0.mlp.gate"), "relative to one decoder block")):
        with pytest.raises(SpecError, match=match):
            load_spec(path=write_spec(tmp_path, name="bad.toml", **bad))


def test_specs_cover_every_family_once():
    specs = list_specs()
    assert {s.family for s in specs} == EXPECTED
    types = [t for s in specs for t in s.model_types]
    assert len(types) == len(set(types)), "a model_type is claimed twice"
    for s in specs:
        for t in s.model_types:
            assert load_spec(t) == s
            assert load_spec(SimpleNamespace(model_type=t)) == s                   # a config
            assert load_spec(SimpleNamespace(config=SimpleNamespace(model_type=t))) == s  # a model


def test_unknown_model_type_lists_specs_and_how_to_add():
    with pytest.raises(SpecError) as err:
        load_spec(SimpleNamespace(config=SimpleNamespace(model_type="blip-2")))
    msg = str(err.value)
    assert "'blip-2'" in msg
    for family in EXPECTED:
        assert family in msg
    assert "hooks/" in msg and "spec=" in msg and "TOML" in msg


def test_layer_and_module_paths():
    spec = load_spec("idefics3")
    assert spec.layer_path(3) == "model.text_model.layers.3"
    assert spec.module_path(0, "self_attn.k_proj") == "model.text_model.layers.0.self_attn.k_proj"
    assert load_spec("smolvlm") == spec


def test_explicit_path_and_malformed_files(tmp_path):
    good = write_spec(tmp_path, family="mine", model_types=["my_vlm"])
    spec = load_spec(path=good)
    assert spec.family == "mine" and spec.path == good
    assert load_spec(str(good)) == spec and load_spec(good) == spec
    cases = {
        "missing.toml": (dict(embed=None), "missing field(s) ['embed']"),
        "unknown.toml": (dict(keyproj="self_attn.k_proj"), "unknown field(s) ['keyproj']"),
        "type.toml": (dict(lora_targets="self_attn.q_proj"), "'lora_targets' must be a non-empty list"),
        "template.toml": (dict(prompt_template="<image>"), "prompt_template must be a string containing"),
    }
    for name, (changes, expected) in cases.items():
        path = write_spec(tmp_path, name, **changes)
        with pytest.raises(SpecError, match=re.escape(expected)) as err:
            load_spec(path=path)
        assert str(path) in str(err.value)
    broken = tmp_path / "broken.toml"
    broken.write_text("family = \n")
    with pytest.raises(SpecError, match="not valid TOML") as err:
        load_spec(path=broken)
    assert str(broken) in str(err.value)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(path=tmp_path / "nope.toml")


def test_image_token_lookup():
    spec = load_spec("llava")                            # ["image_token_id", "image_token_index"]
    assert spec.image_token_id(SimpleNamespace(image_token_id=7, image_token_index=9)) == 7
    assert spec.image_token_id(SimpleNamespace(image_token_id=None, image_token_index=9)) == 9
    assert spec.image_token_id(SimpleNamespace(config=SimpleNamespace(image_token_index=5))) == 5
    with pytest.raises(SpecError, match="image_token_id.*image_token_index") as err:
        spec.image_token_id(SimpleNamespace(model_type="llava", vocab_size=3))
    assert str(spec.path) in str(err.value)
