"""A merge sweep as a trajectory, on a tiny random LLaVA: its ends are the base and the adapted model, its
identities differ by recipe, and it runs from Python and from the command line under the sources' safety rules."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

import driftlens as dl
from driftlens import merges
from driftlens.cli import main
from driftlens.errors import CheckpointIdentityError
from driftlens.sources import SourceError
from driftlens.store import read_record
from driftlens.testing import tiny
from tests.integration.test_capture import _adapter, _perturbed, subset

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = tiny.save("llava", root / "base", seed=0, n_layers=2)
    model, _ = tiny.build("llava", seed=0, n_layers=2)
    _perturbed(model, scale=0.01).save_pretrained(root / "ko")           # a fully fine-tuned model folder
    _adapter(model, root / "adapter", dl.load_spec(model))               # a LoRA adapter on the base
    probes = subset("shapes-bilingual", 8, root / "probes")
    return {"root": root, "base": base, "ko": root / "ko", "adapter": root / "adapter", "probes": probes}


def _capture(parts, ckpts, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dl.open_store(dl.capture(parts["base"], parts["probes"], ckpts, out=out, sites=("hidden", "key"),
                                        batch_size=4, progress=False, **kw))


@pytest.mark.parametrize("adapted", ["ko", "adapter"])
def test_sweep_ends_are_the_base_and_the_adapted_model(parts, adapted, tmp_path):
    ckpts = {"base": parts["base"], **merges.sweep(parts[adapted], (0, 0.5, 1)), adapted: parts[adapted]}
    ds = _capture(parts, ckpts, tmp_path / "s.zarr")
    for site in ("hidden", "key"):
        arr = ds[site]
        assert np.array_equal(arr.sel(checkpoint="merge-0").values, arr.sel(checkpoint="base").values)
        np.testing.assert_allclose(arr.sel(checkpoint="merge-1").values, arr.sel(checkpoint=adapted).values,
                                   rtol=0, atol=1e-6)
        mid = arr.sel(checkpoint="merge-0.5").values
        assert not np.allclose(mid, arr.sel(checkpoint="base").values, atol=1e-4)
        assert not np.allclose(mid, arr.sel(checkpoint=adapted).values, atol=1e-4)
    assert merges.merge_alphas(ds) == {"merge-0": 0.0, "merge-0.5": 0.5, "merge-1": 1.0}


def test_identities_record_the_recipe(parts, tmp_path):
    ko = parts["ko"]
    ckpts = {"lin": merges.Merge(ko, 0.5), "lin-again": merges.Merge(ko, 0.5), "lin-0.6": merges.Merge(ko, 0.6),
             "ties": merges.Merge(ko, 0.5, "ties", density=0.5),
             "dare": merges.Merge(ko, 0.5, "dare", density=0.5, seed=1),
             "dare-2": merges.Merge(ko, 0.5, "dare", density=0.5, seed=2)}
    out = tmp_path / "s.zarr"
    ds = _capture(parts, ckpts, out)
    ids = {lab: read_record(out, i)["identity"] for i, lab in enumerate(ds.checkpoint.values.astype(str))}
    prints = {lab: ident["fingerprint"] for lab, ident in ids.items()}
    assert prints["lin"] == prints["lin-again"]
    assert len(set(prints.values())) == len(prints) - 1                     # every other recipe differs
    assert ids["dare"]["recipe"] == {"method": "dare", "alpha": 0.5, "density": 0.5, "seed": 1}
    assert ids["ties"]["kind"] == "merge" and ids["ties"]["source"].startswith("merge:ties:0.5,density=0.5:")
    assert ids["lin"]["base"] == str(parts["base"].resolve()) and ids["lin"]["adapted"] == str(ko.resolve())
    assert not np.array_equal(ds.hidden.sel(checkpoint="dare").values, ds.hidden.sel(checkpoint="dare-2").values)
    # a label bound to one recipe is refused for another
    with pytest.raises(CheckpointIdentityError, match="checkpoint 'lin' was captured from merge:linear:0.5"):
        _capture(parts, {"lin": merges.Merge(ko, 0.7)}, out)


def test_merges_load_safetensors_only_and_no_remote_code(parts, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((parts["ko"] / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(SourceError, match="holds only pickle weights"):
        _capture(parts, {"m": merges.Merge(pickled, 0.5)}, tmp_path / "a.zarr")
    remote = tmp_path / "remote"
    remote.mkdir()
    cfg = json.loads((parts["ko"] / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "mine.Model"}}))
    with pytest.raises(SourceError, match="ships its own Python code"):
        _capture(parts, {"m": f"merge:linear:0.5:{parts['base']}:{remote}"}, tmp_path / "b.zarr")
    with pytest.raises(SourceError, match="BASE .* is a PEFT adapter"):
        _capture(parts, {"m": merges.Merge(parts["ko"], 0.5, base=parts["adapter"])}, tmp_path / "c.zarr")
    with pytest.raises(SourceError, match="does not exist"):
        _capture(parts, {"m": f"merge:linear:0.5:{tmp_path / 'nope'}"}, tmp_path / "d.zarr")


def test_merge_sweep_from_the_cli_and_drift_against_alpha(parts, tmp_path):
    out, rep = tmp_path / "s.zarr", tmp_path / "r.nc"
    base, ko = parts["base"], parts["ko"]
    args = ["capture", str(base), "--probes", str(parts["probes"].manifest), "--out", str(out), "--sites", "hidden",
            "--batch-size", "4", "--no-progress", "-c", f"base={base}"]
    for a in (0, 0.5, 1):
        args += ["-c", f"merge-{a}=merge:linear:{a}:{base}:{ko}"]
    args += ["-c", f"ties-1=merge:ties:1,density=0.3:{ko}"]                  # BASE left out: MODEL
    assert main(args) == 0
    ds = dl.open_store(out)
    assert list(ds.checkpoint.values.astype(str)) == ["base", "merge-0", "merge-0.5", "merge-1", "ties-1"]
    assert main(["drift", str(out), "--reference", "base", "--metrics", "mmd", "--permutations", "20",
                 "--bootstrap", "20", "--out", str(rep), "--no-progress"]) == 0
    report = dl.load_report(rep)
    np.testing.assert_array_equal(report.merge_alpha.values, [np.nan, 0.0, 0.5, 1.0, 1.0])
    assert float(report.mmd.sel(checkpoint="merge-0").max()) == 0.0
    ax = dl.plot.drift_vs_alpha(report, "mmd", site="hidden", modality="visual")
    lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert set(lines) == {"merge, layer 0", "merge, layer 1", "ties, layer 0", "ties, layer 1"}
    assert list(lines["merge, layer 1"].get_xdata()) == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(lines["merge, layer 1"].get_ydata(),
                               report.mmd.sel(site="hidden", modality="visual", layer=1,
                                              checkpoint=["merge-0", "merge-0.5", "merge-1"]).values)
    assert "alpha" in ax.get_xlabel()
    with pytest.raises(dl.errors.UsageError, match="no merge_alpha coordinate"):
        dl.plot.drift_vs_alpha(report.drop_vars("merge_alpha"))
