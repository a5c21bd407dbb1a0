"""Rank schedules applied with PEFT to tiny random models of every spec'd family."""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key

from driftlens.cli import build_parser
from driftlens.errors import ScheduleError
from driftlens.ranks import allocate_ranks
from driftlens.schedule import RankSchedule, pattern_key
from driftlens.specs import load_spec
from driftlens.testing import make_report
from driftlens.testing.tiny import FAMILIES, build

EFFECTS = {"checkpoints": ("base", "ko-600"), "loc": 2.0, "scale": 4.0}   # mostly positive signals


def lora_layers(peft_model) -> dict[str, LoraLayer]:
    base = peft_model.get_base_model()
    return {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}


def assert_applied_exactly(peft_model, sched, spec, adapter="default"):
    layers = lora_layers(peft_model)
    assert set(layers) == set(sched.ranks), (sorted(set(layers) ^ set(sched.ranks)))[:4]
    for name, mod in layers.items():
        r = sched.ranks[name]
        assert mod.r[adapter] == r, name
        assert mod.lora_A[adapter].weight.shape[0] == r and mod.lora_B[adapter].weight.shape[1] == r, name
        assert mod.lora_alpha[adapter] == sched.alphas[name], name
        assert mod.scaling[adapter] == pytest.approx(sched.alphas[name] / r), name
        for outside in (spec.vision_tower, spec.projector):
            assert not (name == outside or name.startswith(outside + ".")), name
    assert sum(layers[n].r[adapter] for n in layers) == sched.budget


def _no_unmatched_pattern_warning(record):
    bad = [str(w.message) for w in record if "did not match any targeted module" in str(w.message)
           or "no module was matched" in str(w.message)]
    assert not bad, bad


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_config_gives_every_module_its_rank(family, tmp_path):
    model, _ = build(family, seed=0, n_layers=3)
    spec = load_spec(model)
    n = spec.num_layers(model)
    report = make_report(n, model_type=model.config.model_type, family=spec.family, seed=FAMILIES.index(family), **EFFECTS)
    n_units = n * len(spec.lora_targets)
    budget = 3 * n_units + 5
    sched = allocate_ranks(report, budget, "mmd", "proportional", 1, 8, model=model)
    assert sched.budget == budget and len(set(sched.ranks.values())) > 1  # a real, non-uniform schedule

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pm = get_peft_model(model, sched.to_lora_config(model))
    _no_unmatched_pattern_warning(record)
    assert_applied_exactly(pm, sched, spec)

    # save_pretrained / from_pretrained keeps every rank (and the weights)
    pm.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: v for k, v in saved["rank_pattern"].items()} == sched.rank_pattern
    fresh, _ = build(family, seed=0, n_layers=3)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert_applied_exactly(loaded, sched, spec)
    a, b = lora_layers(pm), lora_layers(loaded)
    for name in a:
        torch.testing.assert_close(a[name].lora_A["default"].weight, b[name].lora_A["default"].weight)


@pytest.mark.parametrize("rule", ["cumulative", "waterfill"])
def test_many_targets_dropped_layers_and_file_round_trip(rule, tmp_path):
    """>= 20 targets (PEFT compresses the list) and layers dropped by cumulative stay unadapted."""
    family = FAMILIES[0]
    model, _ = build(family, seed=1, n_layers=6)
    spec = load_spec(model)
    report = make_report(6, model_type=model.config.model_type, family=spec.family, seed=11, **EFFECTS)
    sig = {spec.lora_targets[0]: "mmd@key", "*": "mmd@hidden"}
    sched = allocate_ranks(report, 6 * len(spec.lora_targets) * 2, sig, rule, 1, 6, model=model, share=0.6)
    if rule == "cumulative":
        assert 0 < len(sched.ranks) < len(sched.modules)
    for fmt, name in (("peft", "ranks.json"), ("axolotl", "ranks.yaml")):
        back = RankSchedule.load(sched.save(tmp_path / name, format=fmt))
        assert back.ranks == sched.ranks and back.alphas == sched.alphas
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            pm = back.get_peft_model(build(family, seed=1, n_layers=6)[0])
        _no_unmatched_pattern_warning(record)
        assert_applied_exactly(pm, back, spec)
    pm.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(build(family, seed=1, n_layers=6)[0], tmp_path / "adapter")
    assert_applied_exactly(loaded, sched, spec)


def test_naive_suffix_key_would_hit_the_vision_tower():
    """Why the keys are anchored: a suffix key matches the same-numbered block of the vision tower."""
    model, _ = build("llava", seed=0, n_layers=2)
    names = [n for n, _ in model.named_modules()]
    naive = "layers.1.self_attn.k_proj"
    hits = [n for n in names if get_pattern_key([naive], n) == naive]
    assert "model.language_model.layers.1.self_attn.k_proj" in hits
    assert any(n.startswith("model.vision_tower.") for n in hits), hits
    # and PEFT really gives the vision tower that rank
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"], rank_pattern={naive: 5})
    pm = get_peft_model(build("llava", seed=0, n_layers=2)[0], cfg)
    got = {n: m.r["default"] for n, m in lora_layers(pm).items() if m.r["default"] == 5}
    assert any(n.startswith("model.vision_tower.") for n in got), got
    # the anchored key names one module only
    key = pattern_key("model.language_model.layers.1.self_attn.k_proj")
    assert [n for n in names if get_pattern_key([key], n) == key] == ["model.language_model.layers.1.self_attn.k_proj"]


def test_clear_errors_for_mismatched_models():
    model, _ = build("llava", seed=0, n_layers=2)
    spec = load_spec(model)
    report = make_report(2, model_type="llava", family=spec.family, seed=0, **EFFECTS)
    sched = allocate_ranks(report, 16, "mmd", "proportional", 1, 8, model=model)

    # a report whose layers do not match the model
    with pytest.raises(ScheduleError, match=r"report's layers \[0, 1, 2\] do not match the model's 2 decoder layers"):
        allocate_ranks(make_report(3, model_type="llava", family=spec.family, seed=0, **EFFECTS), 24, model=model)
    # the same architecture with another depth
    deeper, _ = build("llava", seed=0, n_layers=3)
    with pytest.raises(ScheduleError, match="covers 2 decoder layers but the model has 3"):
        sched.to_lora_config(deeper)
    # another architecture altogether
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    with pytest.raises(ScheduleError, match=r"made for family 'llava' \(model_type 'llava'\).*model_type 'llama'"):
        sched.get_peft_model(llama)
    others = [f for f in FAMILIES if f != "llava"]
    if others:
        other, _ = build(others[0], seed=0, n_layers=2)
        with pytest.raises(ScheduleError, match="made for family 'llava'"):
            sched.check(other)
    # a module path that does not exist
    with pytest.raises(ScheduleError, match=r"do not exist.*'model.language_model.layers.0.self_attn.kq_proj'"):
        allocate_ranks(report, 8, modules=["self_attn.kq_proj", "self_attn.v_proj"], model=model)


def test_cli_writes_peft_and_axolotl_files_and_a_plot(tmp_path, capsys):

    import yaml

    from driftlens.report import save_report

    model, _ = build("llava", seed=0, n_layers=4)
    spec = load_spec(model)
    rp = save_report(make_report(4, model_type="llava", family=spec.family, seed=5, **EFFECTS), tmp_path / "report.nc")
    parser = build_parser()

    args = parser.parse_args(["ranks", str(rp), "--budget", "40", "--signal", "self_attn.q_proj=mmd@key",
                              "--signal", "*=mmd", "--rule", "waterfill", "--max-rank", "8",
                              "--out", str(tmp_path / "ranks.json"), "--plot", str(tmp_path / "ranks.png")])
    assert args.func(args) == 0
    body = json.loads((tmp_path / "ranks.json").read_text())
    assert sum(body["rank_pattern"].values()) == 40 and body["driftlens"]["rule"] == "waterfill"
    assert body["driftlens"]["signals"]["self_attn.q_proj"] == "mmd@key"
    assert (tmp_path / "ranks.png").stat().st_size > 1000

    args = parser.parse_args(["ranks", str(rp), "--budget", "40", "--format", "axolotl",
                              "--out", str(tmp_path / "ranks.yml")])
    assert args.func(args) == 0
    body = yaml.safe_load((tmp_path / "ranks.yml").read_text())
    assert sum(body["lora_rank_pattern"].values()) == 40
    assert all(re.fullmatch(r"\^model\\\.language_model\\\.layers\\\.\d\\\..+", k) for k in body["lora_rank_pattern"])
    sched = RankSchedule.load(tmp_path / "ranks.yml")
    pm = sched.get_peft_model(model)
    assert_applied_exactly(pm, sched, spec)

    args = parser.parse_args(["ranks", str(rp), "--budget", "40", "--signal", "mmd_xx"])
    with pytest.raises(ScheduleError, match="available per-layer signals"):
        args.func(args)


def test_a_schedule_from_a_contrast_over_runs_round_trips_through_peft(tmp_path):
    """Excess drift over a control, averaged over runs, exported and applied like any schedule."""
    import numpy as np
    import xarray as xr

    from driftlens import compare as C

    model, _ = build("llava", seed=0, n_layers=3)
    spec = load_spec(model)
    labels = ("base", "ko-1", "ko-2", "en-1", "en-2")
    reps = {}
    for s in range(3):
        rep = make_report(3, checkpoints=labels, model_type=model.config.model_type, family=spec.family, seed=s,
                          loc=2.0, scale=1.0)
        rep["mmd"].loc[{"checkpoint": ["ko-1", "ko-2"]}] += np.array([1.0, 3.0, 0.5])[:, None, None]  # [layer]
        rep["mmd_boot"] = rep["mmd"].expand_dims(draw=8).transpose(..., "draw") + xr.DataArray(
            np.random.default_rng(s).normal(0, 0.01, 8), dims="draw")
        reps[f"seed-{s}"] = rep
    runs = C.combine_runs(reps)
    runs = runs.merge(C.contrasts(runs, C.trajectory_pairs(labels, "ko-", "en-"), metrics=["mmd"]))
    with pytest.raises(ScheduleError, match="2 trajectories"):
        allocate_ranks(runs, 30, "mmd", model=model)
    sched = allocate_ranks(runs, 30, "mmd", "proportional", 1, 8, contrast="ko-2:en-2", model=model)
    path = sched.save(tmp_path / "ranks.json")
    back = RankSchedule.load(path)
    assert back.ranks == sched.ranks and back.meta["contrast"] == "ko-2 - en-2"
    peft_model = get_peft_model(model, back.to_lora_config())
    assert_applied_exactly(peft_model, back, spec)
