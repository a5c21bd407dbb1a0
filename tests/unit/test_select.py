"""driftlens.select: one default rule per choice (reference, checkpoint, checkpoints, cluster unit), one
error class naming the value and what exists, and the readers that follow the rule where each once had
its own (the engine took the first checkpoint whatever the data recorded, ranks and the HTML page left
an unrecorded reference out, outcomes knew only ``cluster`` / ``group``, the token map silently swapped
a recorded reference it could not map for another checkpoint)."""
from __future__ import annotations

import numpy as np
import pytest

import driftlens as dl
from driftlens import select
from driftlens.errors import DriftError, UsageError
from driftlens.testing.synthetic import make_report, make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("sel") / "s.zarr", n_clusters=6, renders=2, n_visual=3, n_text=2,
                      dim=4, n_layers=2, final=False)


def _report(reference="base"):
    rep = make_report(n_layers=4, checkpoints=("base", "step-100", "step-200"))
    if reference is None:
        del rep.attrs["reference"]
    else:
        rep.attrs["reference"] = reference
    return rep


# ----------------------------------------------------------------------------- the rules


def test_the_error_is_a_usage_error_exported_by_driftlens():
    assert issubclass(dl.SelectionError, UsageError) and dl.SelectionError is select.SelectionError
    assert "SelectionError" in dl.__all__


def test_reference_given_then_recorded_then_first():
    rep = _report("step-100")
    assert select.reference_of(rep, "step-200") == "step-200"        # given
    assert select.reference_of(rep) == "step-100"                    # recorded
    assert select.reference_of(_report(None)) == "base"              # neither: the first checkpoint
    assert select.reference_of(_report(None), among=["step-200", "base"]) == "step-200"   # the first read


def test_a_recorded_reference_names_what_the_report_was_measured_against_after_a_selection():
    part = _report("base").sel(checkpoint=["step-100", "step-200"])
    assert select.reference_of(part) == "base"


def test_a_reference_outside_the_checkpoints_read_is_refused_naming_it_and_them():
    with pytest.raises(select.SelectionError, match=r"reference 'nope' is not a checkpoint of the store; it has "
                                                    r"\['base', 'step-100', 'step-200'\]"):
        select.reference_of(_report(), "nope", where="the store")
    with pytest.raises(select.SelectionError, match=r"recorded reference 'base'.*\['step-100'\]"):
        select.reference_of(_report("base"), among=["step-100"], where="the map")
    with pytest.raises(select.SelectionError, match="no checkpoint"):
        select.reference_of(_report(None).isel(checkpoint=[]))


def test_checkpoint_rule_and_its_errors():
    labels = ["base", "ko-1", "ko-2", "en-1", "en-2"]
    assert select.pick_checkpoint(labels[:3], reference="base") == "ko-2"      # one trajectory: its last
    assert select.pick_checkpoint(labels, "en-1", reference="base") == "en-1"
    assert select.pick_checkpoint(labels, -1, reference="base") == "en-2"
    with pytest.raises(select.SelectionError, match=r"2 trajectories ko: \['ko-1', 'ko-2'\], en"):
        select.pick_checkpoint(labels, reference="base")
    with pytest.raises(select.SelectionError, match=r"checkpoint 'ko-9' is not in the report; it has \['base'"):
        select.pick_checkpoint(labels, "ko-9", reference="base")
    assert select.pick_checkpoints(labels, None, "the store") == labels
    with pytest.raises(select.SelectionError, match=r"checkpoint\(s\) \['x'\] not in the store; it has"):
        select.pick_checkpoints(labels, ["ko-1", "x"], "the store")


def test_layers_given_in_their_order_each_once_else_every_layer():
    rep = _report()
    assert select.pick_layers(rep) == [0, 1, 2, 3]
    assert select.pick_layers(rep, [3, 1]) == [3, 1] and select.pick_layers(rep, np.int64(2)) == [2]
    with pytest.raises(select.SelectionError, match=r"layer\(s\) \[7\] not in the report; it has layers \[0, 1, 2, 3\]"):
        select.pick_layers(rep, [1, 7], where="the report")
    with pytest.raises(select.SelectionError, match=r"repeat \[1\]"):
        select.pick_layers(rep, [1, 1])
    with pytest.raises(select.SelectionError, match="empty"):
        select.pick_layers(rep, [])


def test_site_must_be_a_per_token_site_of_the_kind_asked(store):
    ds = dl.open_store(store, verify="none")
    assert set(select.sites_of(ds)) == {"hidden", "key"} and select.sites_of(ds, layered=False) == []
    assert select.pick_site(ds, "key", layered=True) == "key"
    with pytest.raises(select.SelectionError, match=r"site 'query' is not a site of the store; it has \['"):
        select.pick_site(ds, "query")
    with pytest.raises(select.SelectionError, match=r"site 'hidden' is not a per-checkpoint \(unlayered\) site"):
        select.pick_site(ds, "hidden", layered=False)


def test_cluster_unit_cluster_then_group_then_sample(store):
    ds = dl.open_store(store, verify="none")
    assert select.cluster_unit(ds) == "cluster"
    assert select.cluster_unit(ds.drop_vars("cluster")) == "group"
    assert select.cluster_unit(ds.drop_vars(["cluster", "group"])) == "sample"
    labels, name = select.cluster_labels(ds)
    assert name == "cluster" and labels.dtype.kind == "U" and len(labels) == ds.sizes["token"]
    with pytest.raises(select.SelectionError, match=r"`cluster`, `group`, `sample`.*has coordinates \["):
        select.cluster_unit(ds.drop_vars(["cluster", "group", "sample"]))


# ----------------------------------------------------------------------------- the readers follow the rule
# (each of these failed before the readers called driftlens.select)


def test_the_engine_takes_the_recorded_reference(store):
    from driftlens.engine import make_plan

    ds = dl.open_store(store, verify="none")
    ds.attrs["reference"] = "same"
    assert make_plan(ds, metrics=("mmd",)).reference == "same"          # was "base": the first, attrs ignored
    with pytest.raises(DriftError, match=r"reference 'nope' is not a checkpoint of the store; it has \['base'"):
        make_plan(ds, reference="nope", metrics=("mmd",))


@pytest.mark.filterwarnings("ignore:signal")
def test_ranks_reads_an_unrecorded_reference_as_the_first_checkpoint():
    from driftlens.specs import load_spec

    sch = dl.allocate_ranks(_report(None), 48, "mmd", spec=load_spec("llava"))   # was refused: "2 trajectories"
    assert sch.meta["checkpoint"] == "step-200"


def test_the_html_page_names_the_reference_by_the_same_rule():
    from driftlens.htmlreport import page_data

    assert page_data(_report(None))["reference"] == "base"         # was None
    assert page_data(_report("step-100"))["reference"] == "step-100"


def test_outcomes_fall_back_to_the_same_cluster_unit(store):
    from driftlens.outcomes import cluster_displacement

    ds = dl.open_store(store, verify="none").drop_vars(["cluster", "group"])
    got = cluster_displacement(ds, "base", "shifted")                  # was KeyError: 'group'
    assert got.attrs["cluster_coordinate"] == "sample" and got.sizes["cluster"] == 12
    assert np.isfinite(got.values).all()


def test_the_anchor_weights_refuse_a_layer_given_twice():
    from driftlens.train.anchor import report_weights

    with pytest.raises(UsageError, match=r"repeat \[1\]"):
        report_weights(_report(), [1, 1], checkpoint="step-200")        # was {1: 1.0}: one layer, weight 1


def test_the_token_map_refuses_a_recorded_reference_it_does_not_map(store):
    from driftlens.tokenmap import token_map_data

    ds = dl.open_store(store, verify="none")
    ds.attrs["reference"] = "base"
    with pytest.raises(UsageError, match=r"recorded reference 'base'.*\['same', 'shifted'\]"):
        token_map_data(ds, 0, checkpoints=["same", "shifted"])       # was: mapped on 'same', silently
