"""Rank allocation over plain arrays and synthetic drift reports (no model)."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driftlens.allocation import allocate, clean_signal
from driftlens.errors import ScheduleError
from driftlens.plot import rank_schedule
from driftlens.ranks import allocate_ranks, parse_signal, signal_profile
from driftlens.schedule import RankSchedule, key_to_path, pattern_key
from driftlens.specs import load_spec
from driftlens.testing import make_report

SPEC = load_spec("llava")  # read from hooks/llava.toml; no model is built in this file


# ------------------------------------------------------------------------------------------------
# allocate(): properties and independent references
# ------------------------------------------------------------------------------------------------

@st.composite
def problems(draw):
    n = draw(st.integers(1, 24))
    vals = st.one_of(st.just(0.0), st.floats(0, 1e6, allow_nan=False, allow_subnormal=False),
                     st.floats(-5, 0, allow_nan=False))
    s = np.array(draw(st.lists(vals, min_size=n, max_size=n)))
    lo = draw(st.integers(1, 8))
    hi = draw(st.integers(lo, 64))
    budget = draw(st.integers(n * lo, n * hi))
    return s, budget, lo, hi


@settings(max_examples=300, deadline=None)
@given(problems(), st.sampled_from(["proportional", "waterfill", "uniform"]))
def test_sum_floor_ceiling_and_monotone(problem, rule):
    s, budget, lo, hi = problem
    r = allocate(s, budget, rule, lo, hi)
    assert r.dtype == np.int64 and len(r) == len(s)
    assert int(r.sum()) == budget
    assert r.min() >= lo and r.max() <= hi
    if rule != "uniform":
        c = clean_signal(s)
        for i in range(len(s)):
            for j in range(len(s)):
                if c[i] > c[j]:
                    assert r[i] >= r[j], (i, j, c, r)


def _bisect_quota(s, budget, lo, hi):
    """Independent reference: continuous clipped quotas by float bisection (log scale)."""
    s = clean_signal(s)
    s = s / s.max()

    def f(lam):
        return np.clip(lam * s, lo, hi).sum()

    a, b = 1e-300, 1e300
    for _ in range(3000):
        m = math.exp(0.5 * (math.log(a) + math.log(b)))
        if f(m) < budget:
            a = m
        else:
            b = m
        if b / a < 1 + 1e-15:
            break
    return np.clip(b * s, lo, hi)


@settings(max_examples=200, deadline=None)
@given(problems())
def test_proportional_within_one_of_the_clipped_quota(problem):
    s, budget, lo, hi = problem
    c = clean_signal(s)
    pos = c > 0
    if not pos.any() or budget >= hi * pos.sum() + lo * (~pos).sum():
        return  # uniform fallback / saturation, tested separately
    if c[pos].min() < 1e-250 * c.max():
        return  # beyond the reference's float range (allocate itself is checked there above)
    q = _bisect_quota(s, budget, lo, hi)
    r = allocate(s, budget, "proportional", lo, hi)
    assert np.all(np.abs(r - q) < 1 + 1e-6), (q, r)  # largest remainder satisfies quota


@settings(max_examples=200, deadline=None)
@given(problems())
def test_waterfill_is_max_min_fair(problem):
    """D'Hondt characterisation: moving one rank from i to j never raises the min of s/r."""
    s, budget, lo, hi = problem
    c = clean_signal(s)
    if c.sum() == 0:
        return
    r = allocate(s, budget, "waterfill", lo, hi)
    for i in range(len(s)):
        for j in range(len(s)):
            if i != j and r[i] > lo and r[j] < hi:
                assert c[i] / r[i] >= c[j] / (r[j] + 1) - 1e-12 * max(c[i], c[j], 1)


def test_proportional_hand_examples():
    assert allocate([1, 2, 3, 4], 20, "proportional", 1, 64).tolist() == [2, 4, 6, 8]
    # clipping iterates: the big one is capped at 8, the others share the remaining 12
    assert allocate([1, 1, 1, 100], 20, "proportional", 2, 8).tolist() == [4, 4, 4, 8]
    # floor: tiny signals sit at min_rank, the rest is proportional
    assert allocate([1e-9, 1, 3], 10, "proportional", 2, 64).tolist() == [2, 2, 6]
    # largest remainder: quotas 10/3 each -> one extra rank, to the lower index on a tie
    assert allocate([1, 1, 1], 10, "proportional", 1, 64).tolist() == [4, 3, 3]
    # quotas [2.5, 2.5, 5] with equal fractions: the larger signal wins the tie, never the reverse
    r = allocate([1, 1.0000001, 2], 10, "proportional", 1, 64)
    assert r.sum() == 10 and r[1] >= r[0]


def test_nan_negative_and_inf_signals():
    assert clean_signal([np.nan, -3, 2, np.inf, -np.inf]).tolist() == [0, 0, 2, 2, 0]
    r = allocate([np.nan, -3.0, 2.0, 2.0], 12, "proportional", 1, 64)
    assert r.tolist() == [1, 1, 5, 5]
    # all zero: every rule falls back to uniform (lower index first)
    for rule in ("proportional", "waterfill", "uniform", "cumulative"):
        assert allocate([0, -1, np.nan], 7, rule, 1, 8).tolist() == [3, 2, 2]


def test_saturated_positive_units_hand_the_rest_to_zero_units():
    r = allocate([5, 0, 0, 1], 13, "proportional", 1, 4)
    assert r.tolist() == [4, 3, 2, 4]


def test_waterfill_hand_example():
    # D'Hondt with 10 seats for 6:3:1 (min 1) -> divisors: the classic table gives 6,3,1
    assert allocate([6, 3, 1], 10, "waterfill", 1, 64).tolist() == [6, 3, 1]
    # scarce ranks go to the strongest signal: proportional rounds the middle one up, waterfill does not
    assert allocate([5, 3, 2], 4, "waterfill", 1, 64).tolist() == [2, 1, 1]


def test_uniform_and_ties():
    assert allocate([9, 1, 5], 8, "uniform", 1, 64).tolist() == [3, 3, 2]
    assert allocate([1, 1, 1, 1], 6, "proportional", 1, 64).tolist() == [2, 2, 1, 1]
    assert allocate([1, 1, 1, 1], 6, "waterfill", 1, 64).tolist() == [2, 2, 1, 1]


def test_cumulative_keeps_the_layers_holding_the_share():
    # per-layer signal 0, 10, 1, 9: 10 + 9 = 95% >= 90% -> keep layers 1 and 3 (LoRA-drop)
    s = [0, 10, 1, 9]
    r = allocate(s, 16, "cumulative", 1, 64, share=0.9)
    assert r.tolist() == [0, 8, 0, 8]
    # share 1.0 keeps every layer with signal... and layer 0 too, as the share counts the total
    assert (allocate(s, 16, "cumulative", 1, 64, share=1.0) > 0).sum() == 3
    # the kept layers cannot hold 16 under max_rank 4: more layers are kept, by signal
    assert allocate(s, 16, "cumulative", 1, 4, share=0.9).tolist() == [4, 4, 4, 4]
    assert allocate(s, 12, "cumulative", 1, 4, share=0.9).tolist() == [0, 4, 4, 4]
    # groups: two modules per layer; whole layers are kept or dropped
    g = np.repeat(np.arange(4), 2)
    r = allocate(np.repeat(s, 2), 17, "cumulative", 1, 64, groups=g, share=0.9)
    assert r.tolist() == [0, 0, 5, 4, 0, 0, 4, 4]
    with pytest.raises(ScheduleError, match=r"budget 3 is below min_rank 2 x 4 = 8"):
        allocate(np.repeat(s, 2), 3, "cumulative", 2, 64, groups=g, share=0.9)


def test_budget_errors_name_the_numbers():
    with pytest.raises(ScheduleError, match=r"budget 5 is below min_rank 2 x 4 adapted modules = 8"):
        allocate([1, 2, 3, 4], 5, "proportional", 2, 8)
    with pytest.raises(ScheduleError, match=r"budget 40 is above max_rank 8 x 4 adapted modules = 32"):
        allocate([1, 2, 3, 4], 40, "waterfill", 2, 8)
    with pytest.raises(ScheduleError, match="unknown rule 'adalora'"):
        allocate([1, 2], 4, "adalora", 1, 8)
    with pytest.raises(ScheduleError, match="min_rank must be >= 1"):
        allocate([1, 2], 4, "uniform", 0, 8)
    with pytest.raises(ScheduleError, match="max_rank 1 is below min_rank 2"):
        allocate([1, 2], 4, "uniform", 2, 1)
    with pytest.raises(ScheduleError, match="budget must be an integer"):
        allocate([1, 2], 4.5, "uniform", 1, 8)


# ------------------------------------------------------------------------------------------------
# signals from a report
# ------------------------------------------------------------------------------------------------

def test_parse_signal():
    assert parse_signal("mmd") == ("mmd", None, None)
    assert parse_signal("mmd@key") == ("mmd", "key", None)
    assert parse_signal("sinkhorn@hidden:text") == ("sinkhorn", "hidden", "text")
    with pytest.raises(ScheduleError, match="NAME\\[@SITE\\]"):
        parse_signal("mmd z")


def test_signal_profile_selects_like_xarray():
    rep = make_report(seed=3)
    np.testing.assert_array_equal(signal_profile(rep, "mmd"),
                                  rep["mmd"].values[-1, :, 0, 0])
    np.testing.assert_array_equal(signal_profile(rep, "mmd@key:text", checkpoint="step-100"),
                                  rep["mmd"].values[1, :, 1, 1])
    np.testing.assert_array_equal(signal_profile(rep, "gap@key", checkpoint=0), rep["gap"].values[0, :, 1])
    np.testing.assert_array_equal(signal_profile(rep, "mir", checkpoint=0), rep["mir"].values[0, :])
    np.testing.assert_array_equal(signal_profile(rep, "gap", site="key"), rep["gap"].values[-1, :, 1])
    with pytest.raises(ScheduleError, match=r"unknown signal 'mmd_xx'.*'mir', 'mir_hi', 'mir_lo', 'mmd', 'mmd_hi', 'mmd_lo', 'mmd_p', 'mmd_q'"):
        signal_profile(rep, "mmd_xx")
    with pytest.raises(ScheduleError, match="unknown signal 'mir_total'"):
        signal_profile(rep, "mir_total")
    with pytest.raises(ScheduleError, match=r"site 'query' is not in the report; it has \['hidden', 'key'\]"):
        signal_profile(rep, "mmd@query")
    with pytest.raises(ScheduleError, match="has no 'modality' dim"):
        signal_profile(rep, "mir:visual")
    with pytest.raises(ScheduleError, match="has no 'site' dim"):
        signal_profile(rep, "mir@key")
    with pytest.raises(ScheduleError, match="checkpoint 'step-9' is not in the report"):
        signal_profile(rep, "mmd", checkpoint="step-9")


def test_allocate_ranks_from_a_report():
    rep = make_report(n_layers=5, seed=1)
    spec = SPEC
    sch = allocate_ranks(rep, 80, "mmd", "proportional", 2, 8, spec=spec)
    assert sch.budget == 80 and len(sch.modules) == 20
    expected_signal = clean_signal(rep["mmd"].values[-1, :, 0, 0])
    for m in sch.modules:
        assert m.path == f"model.language_model.layers.{m.layer}.{m.module}"
        assert m.signal == expected_signal[m.layer]
        assert m.alpha == 2 * m.rank
    ref = allocate(np.repeat(expected_signal, 4), 80, "proportional", 2, 8)
    assert [m.rank for m in sch.modules] == ref.tolist()
    assert sch.meta["checkpoint"] == "step-200" and sch.meta["rule"] == "proportional"
    assert sch.meta["family"] == "llava" and sch.meta["model_type"] == "llava"
    assert sch.meta["peft_version"] and sch.meta["transformers_version"]
    assert sch.meta["signals"]["self_attn.q_proj"] == "mmd@hidden"
    # without spec=: the spec comes from the report's model_type
    assert allocate_ranks(rep, 80, "mmd", "proportional", 2, 8).modules == sch.modules
    bare = rep.copy()
    bare.attrs = {}
    with pytest.raises(ScheduleError, match="no 'model_type' attribute; pass spec= or model="):
        allocate_ranks(bare, 80)


def test_per_module_signals_and_site_for_module_agree():
    rep = make_report(n_layers=4, seed=2)
    spec = SPEC
    a = allocate_ranks(rep, 48, {"self_attn.q_proj": "mmd@key", "self_attn.k_proj": "mmd@key",
                                 "*": "mmd"}, "proportional", 1, 16, spec=spec)
    b = allocate_ranks(rep, 48, "mmd", "proportional", 1, 16, spec=spec,
                       site_for_module={"self_attn.q_proj": "key", "self_attn.k_proj": "key"})
    assert [m.rank for m in a.modules] == [m.rank for m in b.modules]
    key = clean_signal(rep["mmd"].values[-1, :, 1, 0])
    hid = clean_signal(rep["mmd"].values[-1, :, 0, 0])
    for m in a.modules:
        want = key if m.module in ("self_attn.q_proj", "self_attn.k_proj") else hid
        assert m.signal == want[m.layer]
    with pytest.raises(ScheduleError, match=r"no entry for modules \['self_attn.v_proj', 'self_attn.o_proj'\]"):
        allocate_ranks(rep, 48, {"self_attn.q_proj": "mmd@key", "self_attn.k_proj": "mmd"}, spec=spec)
    with pytest.raises(ScheduleError, match=r"not adapted modules"):
        allocate_ranks(rep, 48, {"mlp.up_proj": "mmd", "*": "mmd"}, spec=spec)


def test_report_errors():
    spec = SPEC
    rep = make_report(n_layers=4)
    with pytest.raises(ScheduleError, match=r"unknown signal 'mdd'.*available per-layer signals"):
        allocate_ranks(rep, 32, "mdd", spec=spec)
    partial = rep.isel(layer=[0, 1, 3])
    with pytest.raises(ScheduleError, match=r"layers \[0, 1, 3\] are not 0..3"):
        allocate_ranks(partial, 24, spec=spec)
    with pytest.raises(ScheduleError, match=r"below min_rank 4 x 16 adapted modules = 64"):
        allocate_ranks(rep, 63, min_rank=4, spec=spec)
    with pytest.raises(ScheduleError, match=r"above max_rank 2 x 8 adapted modules = 16"):
        allocate_ranks(rep, 17, max_rank=2, modules=["self_attn.q_proj", "self_attn.v_proj"], spec=spec)
    with pytest.raises(ScheduleError, match="relative to one decoder block"):
        allocate_ranks(rep, 32, modules=["model.language_model.layers.0.self_attn.q_proj"], spec=spec)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------

def _peft_match(keys, name):
    """peft.utils.other.get_pattern_key, restated: first key with re.match((.*\\.)?(key)$)."""
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


def test_pattern_keys_are_anchored_and_invertible():
    from peft.utils.other import get_pattern_key

    rep = make_report(n_layers=12, seed=4)
    sch = allocate_ranks(rep, 200, "mmd", "waterfill", 1, 16, spec=SPEC)
    keys = list(sch.rank_pattern)
    names = list(sch.ranks) + [p.replace("model.language_model.layers", "model.vision_tower.encoder.layers")
                               for p in sch.ranks] + ["x." + p for p in sch.ranks]
    for name in names:
        k = _peft_match(keys, name)
        assert get_pattern_key(keys, name) == (k if k is not None else name)  # our restatement is peft's
        if name in sch.ranks:
            assert key_to_path(k) == name  # exactly its own key (layer 1 never takes layer 10/11's key)
        else:
            assert k is None
    assert all(key_to_path(pattern_key(p)) == p for p in sch.ranks)


def test_to_lora_config_fields_and_overrides():
    rep = make_report(n_layers=3, seed=5)
    sch = allocate_ranks(rep, 30, "mmd", "proportional", 1, 8, spec=SPEC)
    cfg = sch.to_lora_config(lora_dropout=0.1)
    assert set(cfg.target_modules) == set(sch.ranks)
    assert cfg.rank_pattern == sch.rank_pattern and cfg.alpha_pattern == sch.alpha_pattern
    assert cfg.lora_dropout == 0.1 and cfg.r == sch.base_rank
    with pytest.raises(ScheduleError, match=r"\['r', 'target_modules'\] are set by the schedule"):
        sch.to_lora_config(r=8, target_modules=["q_proj"])


def test_rslora_uses_one_alpha():
    rep = make_report(n_layers=3, seed=5)
    sch = allocate_ranks(rep, 30, "mmd", "proportional", 1, 8, spec=SPEC, use_rslora=True,
                         alpha_ratio=2.0)
    assert sch.alpha_pattern == {}
    assert sch.base_alpha == pytest.approx(2.0 * math.sqrt(30 / 12), abs=1e-4)
    cfg = sch.to_lora_config()
    assert cfg.use_rslora and cfg.lora_alpha == sch.base_alpha


@pytest.mark.parametrize("fmt,suffix", [("peft", ".json"), ("axolotl", ".yaml")])
@pytest.mark.parametrize("rule", ["proportional", "cumulative"])
def test_save_load_round_trip(tmp_path, fmt, suffix, rule):
    import yaml

    rep = make_report(n_layers=5, seed=6)
    sch = allocate_ranks(rep, 40, "mmd@key", rule, 1, 8, spec=SPEC, share=0.6)
    out = sch.save(tmp_path / f"ranks{suffix}")  # format from the suffix
    text = out.read_text()
    if fmt == "peft":
        body = json.loads(text)
        assert body["rank_pattern"] == sch.rank_pattern and body["target_modules"] == list(sch.ranks)
        assert body["driftlens"]["rule"] == rule and body["driftlens"]["budget"] == 40
    else:
        body = yaml.safe_load(text)
        assert body["lora_rank_pattern"] == sch.rank_pattern
        assert body["lora_alpha_pattern"] == sch.alpha_pattern
        assert body["lora_target_modules"] == list(sch.ranks)
        assert body["lora_r"] == sch.base_rank and body["adapter"] == "lora"
    back = RankSchedule.load(out)
    assert back.modules == sch.modules
    assert back.ranks == sch.ranks and back.alpha_pattern == sch.alpha_pattern
    assert back.meta["signal"] == "mmd@key" and back.meta["rule"] == rule
    if rule == "cumulative":
        assert any(m.rank == 0 for m in sch.modules)  # dropped layers are in the metadata, not the pattern
        assert len(back.rank_pattern) < len(back.modules)
    # explicit format beats the suffix
    other = "axolotl" if fmt == "peft" else "peft"
    back2 = RankSchedule.load(sch.save(tmp_path / f"x{suffix}", format=other))
    assert back2.ranks == sch.ranks


def test_load_honours_a_hand_edited_rank(tmp_path):
    rep = make_report(n_layers=2, seed=7)
    sch = allocate_ranks(rep, 16, "mmd", "uniform", 1, 8, spec=SPEC)
    p = sch.save(tmp_path / "r.json")
    body = json.loads(p.read_text())
    k = next(iter(body["rank_pattern"]))
    body["rank_pattern"][k] = 7
    p.write_text(json.dumps(body))
    assert RankSchedule.load(p).ranks[key_to_path(k)] == 7
    body.pop("driftlens")
    p.write_text(json.dumps(body))
    with pytest.raises(ScheduleError, match="not a driftlens rank schedule"):
        RankSchedule.load(p)
    with pytest.raises(FileNotFoundError, match="no rank schedule at"):
        RankSchedule.load(tmp_path / "missing.json")


def test_rank_schedule_plot_bars_are_the_layer_ranks(tmp_path):
    rep = make_report(n_layers=6, seed=8)
    sch = allocate_ranks(rep, 64, "mmd", "proportional", 1, 8, spec=SPEC)
    ax = rank_schedule(sch, rep)
    heights = np.zeros(6)
    for patch in ax.patches:
        heights[int(round(patch.get_x() + patch.get_width() / 2))] += patch.get_height()
    np.testing.assert_array_equal(heights, sch.layer_ranks())
    line = ax.figure.axes[1].lines[0]
    np.testing.assert_allclose(line.get_ydata(), rep["mmd"].values[-1, :, 0, 0])  # raw profile, unclipped
    ax.figure.savefig(tmp_path / "ranks.png")
    assert (tmp_path / "ranks.png").stat().st_size > 1000


def _with_contrast(report, a="ko-2", b="en-2"):
    from driftlens import compare as C

    rep = report.copy()
    for m in ("mmd",):
        rep[f"{m}_boot"] = rep[m].expand_dims(draw=4).transpose(..., "draw").copy()
    return rep.merge(C.contrasts(rep, [(a, b)], metrics=["mmd"]))


def test_a_report_with_two_trajectories_needs_a_checkpoint_or_a_contrast():
    report = make_report(n_layers=4, checkpoints=("base", "ko-1", "ko-2", "en-1", "en-2"), loc=1.0, scale=0.3)
    with pytest.raises(ScheduleError, match=r"2 trajectories ko: \['ko-1', 'ko-2'\], en: \['en-1', 'en-2'\]"):
        allocate_ranks(report, budget=64)
    one = report.sel(checkpoint=["base", "ko-1", "ko-2"])
    assert allocate_ranks(one, budget=64).meta["checkpoint"] == "ko-2"          # one trajectory: its end
    rep = _with_contrast(report)
    sched = allocate_ranks(rep, budget=64, contrast="ko-2:en-2")
    want = np.clip(rep["mmd"].sel(checkpoint="ko-2", site="hidden", modality="visual").values
                   - rep["mmd"].sel(checkpoint="en-2", site="hidden", modality="visual").values, 0, None)
    np.testing.assert_allclose(signal_profile(rep, "mmd", contrast="ko-2 - en-2"),
                               rep["mmd"].sel(checkpoint="ko-2", site="hidden", modality="visual").values
                               - rep["mmd"].sel(checkpoint="en-2", site="hidden", modality="visual").values)
    assert sched.meta["contrast"] == "ko-2 - en-2" and sched.meta["checkpoint"] is None
    assert np.argmax(sched.layer_ranks()) == np.argmax(want)
    with pytest.raises(ScheduleError, match="not in the report"):
        allocate_ranks(rep, budget=64, contrast="ko-1:en-1")
    with pytest.raises(ScheduleError, match="not both"):
        allocate_ranks(rep, budget=64, contrast="ko-2:en-2", checkpoint="ko-2")


def test_a_signal_over_runs_is_their_mean():
    import xarray as xr

    reps = [make_report(n_layers=3, seed=s, loc=1.0, scale=0.3) for s in range(3)]
    runs = xr.concat(reps, dim=xr.Variable("run", ["a", "b", "c"])).assign_coords(run=["a", "b", "c"])
    runs.attrs = dict(reps[0].attrs)
    mean = np.mean([signal_profile(r, "mmd", checkpoint="step-200") for r in reps], axis=0)
    np.testing.assert_allclose(signal_profile(runs, "mmd", checkpoint="step-200"), mean)
    assert allocate_ranks(runs, budget=48, checkpoint="step-200").meta["runs"] == ["a", "b", "c"]
