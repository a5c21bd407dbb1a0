"""Rank schedules refuse what they cannot be: impossible values in rank files, targets a family's
decoder blocks lack, and non-finite signals -- each with a message naming the file / module / layer.

No model is built here: reports are synthetic (:func:`driftlens.testing.make_report`), specs are read
from ``hooks/``.
"""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from driftlens.cli import build_parser
from driftlens.errors import EXIT_DATA, EXIT_USAGE, DataError, ScheduleError, ScheduleFileError, exit_code_of
from driftlens.ranks import allocate_ranks
from driftlens.schedule import _AXOLOTL_META, RankSchedule, key_to_path, pattern_key
from driftlens.specs import SpecError, list_specs, load_spec
from driftlens.testing import make_report

SPEC = load_spec("llava")
LAYER0_Q = "model.language_model.layers.0.self_attn.q_proj"


def _schedule(**kw) -> RankSchedule:
    kw = {"rule": "uniform", "min_rank": 1, "max_rank": 8, "spec": SPEC} | kw
    return allocate_ranks(make_report(n_layers=2, seed=7), 16, "mmd", **kw)


@pytest.fixture
def peft_file(tmp_path):
    """(path, body) of a valid PEFT-format schedule; tests edit ``body`` and write it back."""
    path = _schedule().save(tmp_path / "ranks.json")
    return path, json.loads(path.read_text())


def _refused(path, *needles) -> ScheduleError:
    with pytest.raises(ScheduleError) as err:
        RankSchedule.load(path)
    msg = str(err.value)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert isinstance(err.value, ScheduleFileError) and isinstance(err.value, DataError)
    assert exit_code_of(err.value) == EXIT_DATA   # a damaged file is a data error, like the other inputs
    return err.value


# ------------------------------------------------------------------------------------------------
# ranks and alphas in the config fields
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [-3, 0, 3.5, 4.0, True, "4", None, [4], 2 ** 40])
def test_rank_that_is_not_a_positive_integer_is_refused(peft_file, rank):
    path, body = peft_file
    body["rank_pattern"][pattern_key(LAYER0_Q)] = rank
    path.write_text(json.dumps(body))
    _refused(path, f"rank of {LAYER0_Q!r} must be a positive integer", f"got {rank!r}")


@pytest.mark.parametrize("rank", ["4", -1, 0, 2.5, False])
def test_axolotl_rank_that_is_not_a_positive_integer_is_refused(tmp_path, rank):
    import yaml

    path = _schedule().save(tmp_path / "ranks.yaml")
    text = path.read_text()
    head, body = text.split("\n", 2)[:2], yaml.safe_load(text)
    body["lora_rank_pattern"][pattern_key(LAYER0_Q)] = rank
    path.write_text("\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False))
    _refused(path, f"rank of {LAYER0_Q!r} must be a positive integer")


@pytest.mark.parametrize("alpha", [-2, float("nan"), float("inf"), -float("inf"), "4", True, None, 10 ** 400])
def test_alpha_that_is_negative_or_not_finite_is_refused(peft_file, alpha):
    path, body = peft_file
    body["alpha_pattern"][pattern_key(LAYER0_Q)] = alpha
    path.write_text(json.dumps(body))      # nan / inf as NaN / Infinity, which json reads back
    _refused(path, f"alpha of {LAYER0_Q!r} must be a finite number >= 0")


def test_rslora_alpha_is_checked(tmp_path):
    path = _schedule(use_rslora=True).save(tmp_path / "r.json")
    body = json.loads(path.read_text())
    for bad in (float("nan"), -1.0, None):
        body["lora_alpha"] = bad
        path.write_text(json.dumps(body))
        _refused(path, "lora_alpha (the rsLoRA alpha) must be a finite number >= 0")
    body["lora_alpha"], body["use_rslora"] = 3.0, "yes"
    path.write_text(json.dumps(body))
    _refused(path, "use_rslora must be true or false, got 'yes'")


def test_pattern_keys_the_metadata_does_not_list_are_refused(peft_file):
    path, body = peft_file
    body["alpha_pattern"][pattern_key("model.language_model.layers.9.self_attn.q_proj")] = 4
    path.write_text(json.dumps(body))
    _refused(path, "alpha pattern names modules that the metadata does not list",
             "model.language_model.layers.9.self_attn.q_proj")
    body = json.loads(json.dumps(body))
    body["alpha_pattern"].pop(pattern_key("model.language_model.layers.9.self_attn.q_proj"))
    body["rank_pattern"][LAYER0_Q] = 2                  # the same module under an unanchored key
    path.write_text(json.dumps(body))
    _refused(path, f"rank_pattern names module {LAYER0_Q!r} twice")


# ------------------------------------------------------------------------------------------------
# the driftlens metadata
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["modules", "n_layers", "decoder_layers", "targets", "family", "model_type",
                                   "rule", "alpha_ratio"])
def test_missing_metadata_field_is_refused(peft_file, field):
    path, body = peft_file
    del body["driftlens"][field]
    path.write_text(json.dumps(body))
    _refused(path, f"driftlens metadata lacks field(s) [{field!r}]")


@pytest.mark.parametrize("field", ["path", "layer", "module", "signal", "alpha"])
def test_unit_missing_a_field_is_refused(peft_file, field):
    path, body = peft_file
    del body["driftlens"]["modules"][0][field]
    path.write_text(json.dumps(body))
    _refused(path, "modules[0]", f"lacks field(s) [{field!r}]")


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.update(n_layers=0), "n_layers must be a positive integer, got 0"),
    (lambda m: m.update(n_layers=5), "n_layers 5 but lists units for layers [0, 1]"),
    (lambda m: m.update(decoder_layers=3), "decoder_layers must be a non-empty string, got 3"),
    (lambda m: m.update(targets="self_attn.q_proj"), "targets must be a non-empty list of strings"),
    (lambda m: m.update(signals=["mmd"]), "signals must be a mapping or null"),
    (lambda m: m.update(alpha_ratio=float("inf")), "alpha_ratio must be a finite number >= 0"),
    (lambda m: m.update(modules={}), "modules must be a non-empty list of units"),
    (lambda m: m["modules"].__setitem__(0, "x"), "modules[0] must be a mapping, got str"),
    (lambda m: m["modules"][0].update(layer="0"), f"modules[0] ({LAYER0_Q!r}): layer must be an integer in 0..1"),
    (lambda m: m["modules"][0].update(layer=7), "layer must be an integer in 0..1, got 7"),
    (lambda m: m["modules"][0].update(module="mlp.up_proj"), "module 'mlp.up_proj' is not one of the metadata's"),
    (lambda m: m["modules"][0].update(path="model.layers.0.q"), "path 'model.layers.0.q' is not decoder_layers"),
    (lambda m: m["modules"][0].update(signal="high"), f"({LAYER0_Q!r}): signal must be a finite number"),
    (lambda m: m["modules"][0].update(signal=float("nan")), "signal must be a finite number, got nan"),
    (lambda m: m["modules"][0].update(alpha=-1), f"({LAYER0_Q!r}): alpha must be a finite number >= 0"),
    (lambda m: m["modules"].append(dict(m["modules"][0])), f"module {LAYER0_Q!r} is listed twice"),
])
def test_bad_metadata_values_are_refused(peft_file, edit, needle):
    path, body = peft_file
    edit(body["driftlens"])
    path.write_text(json.dumps(body))
    _refused(path, needle)


def test_the_driftlens_block_must_be_a_mapping(peft_file):
    path, body = peft_file
    body["driftlens"] = ["not", "a", "mapping"]
    path.write_text(json.dumps(body))
    _refused(path, "driftlens metadata must be a mapping, got list")


# ------------------------------------------------------------------------------------------------
# the file as a whole
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,data,needle", [
    ("a.json", b"\xff\xfe{}", "not a UTF-8 text file"),
    ("a.json", b'{"rank_pattern": {', "is not valid JSON (Expecting"),
    ("a.json", b"[1, 2]", "got a list"),
    ("a.yaml", b"- 1\n- 2\n", "got a list"),
    ("a.yaml", b"just text", "got a str"),
    ("a.yaml", b"x: 2001-13-45\n", "not valid YAML (month must be in 1..12)"),
    ("a.yaml", b"a: [\n", "not valid YAML"),
    ("a.yaml", b"[" * 1000 + b"]" * 1000, "nested too deeply"),
    ("a.json", b'{"a": ' * 3000, "nested too deeply"),
    ("a.yaml", b"lora_rank_pattern: {1: 2}\n", "lora_rank_pattern has a key 1 that is not a module pattern"),
    ("a.yaml", b"lora_rank_pattern: [1]\n", "no rank pattern"),
    ("a.yaml", b"", "no rank pattern"),
    ("a.yaml", b'lora_rank_pattern: {"^a": 1}\n' + _AXOLOTL_META.encode() + b"{oops\n",
     "line 2 (driftlens metadata) is not valid JSON"),
])
def test_unreadable_files_are_refused(tmp_path, name, data, needle):
    path = tmp_path / name
    path.write_bytes(data)
    _refused(path, needle)


def test_a_missing_file_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no rank schedule at"):
        RankSchedule.load(tmp_path / "nope.json")


@pytest.mark.parametrize("fmt", ["peft", "axolotl"])
def test_valid_files_still_load(tmp_path, fmt):
    sch = _schedule(rule="cumulative", share=0.5)
    back = RankSchedule.load(sch.save(tmp_path / "r.any", format=fmt))
    assert back.modules == sch.modules and back.ranks == sch.ranks and back.alphas == sch.alphas
    assert all(type(r) is int for r in back.ranks.values())


# ------------------------------------------------------------------------------------------------
# targets against the spec's block_modules (no model)
# ------------------------------------------------------------------------------------------------

def test_a_target_outside_block_modules_is_refused():
    rep = make_report(n_layers=3)
    with pytest.raises(ScheduleError) as err:
        allocate_ranks(rep, 24, modules=["self_attn.q_proj", "self_attn.kproj"], spec=SPEC)
    msg = str(err.value)
    assert "'self_attn.kproj' is not a module of a 'llava' decoder block" in msg
    assert str(SPEC.path) in msg
    assert re.search(r"nearest: \['self_attn\.k_proj'", msg), msg
    assert exit_code_of(err.value) == EXIT_USAGE
    # every block module is a valid target, MLP projections included
    sch = allocate_ranks(rep, 3 * 7, "mmd", "uniform", modules=list(SPEC.block_modules), spec=SPEC)
    assert {m.module for m in sch.modules} == set(SPEC.block_modules)
    # a spec that does not list its block modules leaves targets to the model check, as before
    bare = dataclasses.replace(SPEC, block_modules=())
    assert allocate_ranks(rep, 6, "mmd", "uniform", modules=["self_attn.kproj", "x.y"], spec=bare).budget == 6


def test_targets_must_be_distinct_strings():
    rep = make_report(n_layers=2)
    for bad in ([], ["self_attn.q_proj", "self_attn.q_proj"], [3], [""]):
        with pytest.raises(ScheduleError, match="non-empty list of distinct targets"):
            allocate_ranks(rep, 8, modules=bad, spec=SPEC)
    assert allocate_ranks(rep, 8, "mmd", "uniform", modules="self_attn.q_proj", spec=SPEC).meta["targets"] == [
        "self_attn.q_proj"]


def test_cli_refuses_an_unknown_module_before_writing(tmp_path):
    from driftlens.report import save_report

    rp = save_report(make_report(n_layers=3), tmp_path / "report.nc")
    parser = build_parser()
    out = tmp_path / "ranks.json"
    args = parser.parse_args(["ranks", str(rp), "--budget", "32", "--modules", "self_attn.kproj", "--out", str(out)])
    with pytest.raises(ScheduleError, match=r"'self_attn\.kproj'.*nearest: \['self_attn\.k_proj'"):
        args.func(args)
    assert not out.exists()
    args = parser.parse_args(["ranks", str(rp), "--budget", "30", "--modules", "mlp.up_proj", "mlp.down_proj",
                              "--out", str(out)])
    assert args.func(args) == 0 and RankSchedule.load(out).meta["targets"] == ["mlp.up_proj", "mlp.down_proj"]


@pytest.mark.parametrize("spec", list_specs(), ids=lambda s: s.family)
def test_shipped_block_modules_hold_the_targets_and_projections(spec):
    assert spec.block_modules, f"{spec.path} lists no block_modules"
    assert len(set(spec.block_modules)) == len(spec.block_modules)
    for rel in (*spec.lora_targets, spec.key_proj, spec.query_proj):
        assert rel in spec.block_modules, (spec.path, rel)


def test_block_modules_is_optional_and_checked(tmp_path):
    import tomllib

    data = tomllib.loads(SPEC.path.read_text())

    def write(name, **changes):
        d = {k: v for k, v in (data | changes).items() if v is not None}
        path = tmp_path / name
        path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + "\n")
        return path

    assert load_spec(path=write("none.toml", block_modules=None)).block_modules == ()
    assert load_spec(path=write("some.toml")).block_modules == SPEC.block_modules
    for name, value, needle in [
        ("str.toml", "mlp.up_proj", "'block_modules' must be a non-empty list of strings"),
        ("empty.toml", [], "'block_modules' must be a non-empty list of strings"),
        ("twice.toml", ["mlp.up_proj", "mlp.up_proj"], "block_modules lists ['mlp.up_proj'] more than once"),
        ("abs.toml", ["model.language_model.layers.0.mlp.up_proj"], "must be relative to one decoder block"),
    ]:
        path = write(name, block_modules=value)
        with pytest.raises(SpecError) as err:
            load_spec(path=path)
        assert needle in str(err.value) and str(path) in str(err.value)


# ------------------------------------------------------------------------------------------------
# non-finite signals
# ------------------------------------------------------------------------------------------------

def _with(report, checkpoint, layers, value, var="mmd"):
    rep = report.copy(deep=True)
    ci = [str(c) for c in rep["checkpoint"].values].index(checkpoint)
    for layer in layers:
        rep[var].values[ci, layer, 0, 0] = value       # site hidden, modality visual
    return rep


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_signal_at_the_chosen_checkpoint_is_refused(value):
    rep = _with(make_report(n_layers=5, seed=3), "step-200", [1, 3], value)
    with pytest.raises(ScheduleError) as err:
        allocate_ranks(rep, 40, "mmd", spec=SPEC)
    msg = str(err.value)
    assert "signal 'mmd@hidden' at checkpoint 'step-200' is not finite at 2 layer(s) [1, 3]" in msg
    assert f"layer 1: {value}" in msg
    # the same report at a checkpoint whose profile is finite is fine
    assert allocate_ranks(rep, 40, "mmd", checkpoint="step-100", spec=SPEC).budget == 40
    # a per-module signal: only the expression that reads the bad cells is named
    with pytest.raises(ScheduleError, match=r"signal 'mmd@hidden' at checkpoint 'step-200'"):
        allocate_ranks(rep, 40, {"self_attn.q_proj": "mmd@key", "*": "mmd"}, spec=SPEC)
    assert allocate_ranks(rep, 40, "mmd@key", spec=SPEC).budget == 40


def test_nan_at_the_reference_only_matters_when_it_is_chosen():
    rep = _with(make_report(n_layers=4, seed=4), "base", range(4), np.nan, var="mmd_p")
    assert allocate_ranks(rep, 32, "mmd_p", spec=SPEC).meta["checkpoint"] == "step-200"   # default: the last
    with pytest.raises(ScheduleError, match=r"at checkpoint 'base' is not finite at 4 layer\(s\) \[0, 1, 2, 3\].*"
                                            r"'base' is the report's reference checkpoint"):
        allocate_ranks(rep, 32, "mmd_p", checkpoint="base", spec=SPEC)


def test_negative_signals_still_count_as_zero():
    rep = make_report(n_layers=4, seed=5, loc=-10.0, scale=0.1)   # every effect negative: no evidence
    sch = allocate_ranks(rep, 32, "mmd", "proportional", spec=SPEC)
    assert all(m.signal == 0 for m in sch.modules) and sch.layer_ranks().tolist() == [8, 8, 8, 8]


def test_key_to_path_inverts_the_keys_load_reads():
    assert key_to_path(pattern_key(LAYER0_Q)) == LAYER0_Q
