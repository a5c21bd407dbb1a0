"""A merge sweep on the model organism, from the command line: base -> ko-5 at alpha 0, 0.5, 1.

Its ends are the organism's own base and ko-5 (activations equal), its points' identities differ by
recipe, and the report carries their alphas. Notebook 08_merging runs the full sweeps across seeds.
"""
from __future__ import annotations

import numpy as np
import pytest

import driftlens as dl
from driftlens.cli import main
from driftlens.organism.probe_sets import make_shapes_probes
from driftlens.store import read_record

pytestmark = pytest.mark.slow


def test_organism_merge_sweep_from_the_cli(organisms, tmp_path):
    ck = organisms[0].all_checkpoints
    base, ko5 = ck["base"], ck["ko-5"]
    manifest = make_shapes_probes(tmp_path / "probes", seed=0, n_scenes=12, size=organisms[0].recipe.image_size,
                                  kinds=("caption",))
    store, report = tmp_path / "sweep.zarr", tmp_path / "sweep.nc"
    args = ["capture", str(base), "--probes", str(manifest), "--out", str(store), "--sites", "hidden",
            "--batch-size", "16", "--no-progress", "-c", f"base={base}"]
    args += [a for alpha in (0, 0.5, 1) for a in ("-c", f"ko-{alpha}=merge:linear:{alpha}:{base}:{ko5}")]
    args += ["-c", f"ko-5={ko5}"]
    assert main(args) == 0
    ds = dl.open_store(store)
    h = ds.hidden
    assert np.array_equal(h.sel(checkpoint="ko-0").values, h.sel(checkpoint="base").values)
    np.testing.assert_allclose(h.sel(checkpoint="ko-1").values, h.sel(checkpoint="ko-5").values, rtol=0, atol=1e-5)
    assert not np.allclose(h.sel(checkpoint="ko-0.5").values, h.sel(checkpoint="ko-5").values, atol=1e-3)
    labels = list(ds.checkpoint.values.astype(str))
    idents = [read_record(store, i)["identity"] for i in range(len(labels))]
    merged = [i for i in idents if i["kind"] == "merge"]
    assert [i["recipe"]["alpha"] for i in merged] == [0.0, 0.5, 1.0]
    assert len({i["fingerprint"] for i in idents}) == len(idents)
    assert main(["drift", str(store), "--reference", "base", "--metrics", "mmd", "--permutations", "50",
                 "--bootstrap", "50", "--out", str(report), "--no-progress"]) == 0
    rep = dl.load_report(report)
    np.testing.assert_array_equal(rep.merge_alpha.values, [np.nan, 0.0, 0.5, 1.0, np.nan])
    mmd = rep.mmd.sel(site="hidden", modality="visual")
    assert float(abs(mmd.sel(checkpoint="ko-0")).max()) == 0.0
    np.testing.assert_allclose(mmd.sel(checkpoint="ko-1").values, mmd.sel(checkpoint="ko-5").values, rtol=1e-4,
                               atol=1e-7)
