"""The regularizer experiment's arm tree: every arm differs from its parent in exactly its declared factor."""
from __future__ import annotations

import dataclasses

import pytest

from driftlens.errors import UsageError
from driftlens.organism import experiment as E


def test_every_arm_differs_from_its_parent_in_its_factor_only():
    E.check_tree()
    by = {a.name: a for a in E.TREE}
    compared = 0
    for a in E.TREE:
        if a.parent is None:
            assert a.role in ("root", "context") and a.factor is None
            continue
        assert E.config_diff(a.config, by[a.parent].config) == [a.factor], a.name
        compared += 1
    assert compared == len(E.TREE) - 2                       # lora_uniform is the root, full is context only
    assert set(E.PRIORITY) == set(E.ARMS)


def test_the_issue_s_arms_are_there():
    by = {a.name: a for a in E.TREE}
    assert by["lora_schedule"].parent == "lora_uniform" and by["lora_schedule"].config.ranks == "contrast"
    assert {n: by[n].config.anchor for n in ("anchor_fixed", "anchor_tracking", "anchor_key", "replay_anchor")} == {
        "anchor_fixed": "fixed@hidden", "anchor_tracking": "tracking@hidden", "anchor_key": "fixed@key",
        "replay_anchor": "fixed@hidden"}
    assert by["replay_anchor"].parent == "replay" and by["contrast"].parent == "lora_schedule"
    assert by["full"].role == "context" and not any(a.parent == "full" for a in E.TREE)


@pytest.mark.parametrize("broken, match", [
    # two factors at once: the anchor arm also changes the ranks (the first run's headline comparison)
    (E.Arm("anchor_fixed", "lora_uniform", "anchor", E.ArmConfig(ranks="contrast", anchor="fixed@hidden")),
     r"in \['ranks', 'anchor'\]"),
    (E.Arm("replay_anchor", "replay", "anchor", E.ArmConfig(replay=True)), r"in \[\]"),
    (E.Arm("x", "full", "replay", E.ArmConfig(tuning="full", ranks="none", replay=True)), "context only"),
    (E.Arm("x", "nope", "replay", E.ArmConfig()), "not an arm"),
    (E.Arm("x", "lora_uniform", "anchor", E.ArmConfig(anchor="fixed@query")), "not one of"),
])
def test_a_tree_that_breaks_the_rule_is_refused(broken, match):
    tree = [a for a in E.TREE if a.name != broken.name] + [broken]
    with pytest.raises(UsageError, match=match):
        E.check_tree(tree)


def test_parents_are_added_and_the_tree_is_plain_data():
    assert E._with_parents(["replay_anchor"]) == ["lora_uniform", "replay", "replay_anchor"]
    assert E._with_parents(["anchor_key", "viral"]) == ["lora_uniform", "lora_schedule", "anchor_key", "viral"]
    with pytest.raises(UsageError, match="unknown arm"):
        E._with_parents(["lora_schedule_anchor_fixed"])
    rows = E.tree_dict()
    assert [r["arm"] for r in rows] == list(E.ARMS)
    assert rows[2]["config"] == dataclasses.asdict(E.ArmConfig(ranks="contrast", anchor="fixed@hidden"))
