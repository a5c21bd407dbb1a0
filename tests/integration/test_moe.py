"""Mixture-of-experts decoders: the ``route`` site, the routing metrics and the per-expert cells.

On tiny random-weight models of every MoE family (Qwen3-VL-MoE, Llama 4, GLM-4.5V, Aria): the
captured routing distributions equal the router's own logits through the spec's score function at
the sparse blocks (NaN at dense ones); a checkpoint whose only change is one router moves the
routing metrics at that layer and nothing upstream of it -- the hidden states entering that layer
(and every earlier routing) are identical.
"""
from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import pytest
import torch

import driftlens as dl
from driftlens.capture import plan_tokens
from driftlens.errors import UsageError
from driftlens.specs import load_spec
from driftlens.testing import tiny
from tests.integration.test_capture import subset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METRICS = ("mmd", "paired_shift", "route_js", "route_load", "expert_mmd")
LAYER = 1            # every tiny MoE family has a sparse block 1 (with n_layers=2)


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    return subset("shapes-bilingual", 24, tmp_path_factory.mktemp("moe-probes"))


@pytest.mark.parametrize("family", tiny.MOE_FAMILIES)
def test_route_site_is_the_router_distribution(family, probes, tmp_path):
    model, processor = tiny.build(family, seed=0, n_layers=2)
    spec = load_spec(model)
    sparse = spec.router_layers(model)
    assert LAYER in sparse and spec.n_experts(model) == tiny.EXPERTS
    out = dl.capture(model, probes, out=tmp_path / "s.zarr", sites=("hidden", "route"), batch_size=8,
                     processor=processor, progress=False)
    ds = dl.open_store(out)
    assert ds.route.dims == ("checkpoint", "layer", "token", "expert") and ds.sizes["expert"] == tiny.EXPERTS
    assert ds.attrs["route_layers"] == sparse and ds.attrs["route_scores"] == spec.router_scores
    assert ds.attrs["route_top_k"] == (1 if family == "llama4" else tiny.TOP_K)
    for batch in plan_tokens(processor, spec, model.config, probes, batch_size=8).batches:
        logits = {}
        hooks = [model.get_submodule(spec.module_path(i, spec.router)).register_forward_hook(
            lambda m, a, o, i=i, got=logits: got.__setitem__(i, o[spec.router_logits])) for i in sparse]
        try:
            with torch.no_grad():
                model(**batch.inputs, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        seq = batch.inputs["input_ids"].shape[1]
        rows = slice(batch.start, batch.start + len(batch.rows_b))
        for i in range(2):
            got = ds.route.isel(checkpoint=0, layer=i, token=rows).values
            if i not in sparse:
                assert np.isnan(got).all()
                continue
            flat = logits[i].reshape(-1, logits[i].shape[-1])[batch.rows_b * seq + batch.rows_p].float()
            want = (torch.softmax(flat, -1) if spec.router_scores == "softmax" else
                    torch.sigmoid(flat) / torch.sigmoid(flat).sum(-1, keepdim=True)).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)


def test_route_needs_a_router_in_the_spec(probes, tmp_path):
    model, processor = tiny.build("llava", seed=0, n_layers=2)
    with pytest.raises(UsageError, match="site 'route' reads a mixture-of-experts router.*names none"):
        dl.capture(model, probes, out=tmp_path / "s.zarr", sites=("hidden", "route"), processor=processor,
                   progress=False)
    assert not (tmp_path / "s.zarr").exists()


def _router_only(model, spec, layer: int, scale: float = 2.0, seed: int = 7):
    """A copy of ``model`` whose only change is the router of ``layer`` (Gaussian noise on its weight)."""
    moved = copy.deepcopy(model)
    router = moved.get_submodule(spec.module_path(layer, spec.router))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.add_(scale * torch.randn(router.weight.shape, generator=g))
    return moved


@pytest.fixture(scope="module", params=tiny.MOE_FAMILIES)
def router_report(request, probes, tmp_path_factory):
    model, processor = tiny.build(request.param, seed=0, n_layers=2)
    spec = load_spec(model)
    moved = _router_only(model, spec, LAYER)
    changed = [n for n, p in moved.named_parameters() if not torch.equal(p, model.get_parameter(n))]
    assert changed == [f"{spec.module_path(LAYER, spec.router)}.weight"]
    out = dl.capture(model, probes, {"base": model, "router": moved}, out=tmp_path_factory.mktemp("s") / "s.zarr",
                     sites=("hidden", "key", "route"), batch_size=8, processor=processor, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # few clusters; expert cells with too few of them
        report = dl.drift(dl.open_store(out), reference="base", metrics=METRICS, n_permutations=200,
                          n_bootstrap=200, progress=False)
    return request.param, spec.router_layers(model), report


def test_a_router_change_moves_routing_and_not_the_layer_input(router_report):
    family, sparse, report = router_report
    at = dict(checkpoint="router")
    # routing at the perturbed layer moved, for visual and text tokens, with intervals above 0
    js = report.route_js.sel(**at, layer=LAYER)
    assert (report.route_js_lo.sel(**at, layer=LAYER) > 0).all() and (js > 0.01).all(), (family, js.values)
    assert (report.route_load.sel(**at, layer=LAYER) > 0).all()
    # the layer's input -- block LAYER - 1's output -- and everything upstream did not move at all
    for var in ("mmd", "paired_shift"):
        assert (report[var].sel(**at, layer=LAYER - 1) == 0).all(), (family, var)
    if LAYER - 1 in sparse:
        assert (report.route_js.sel(**at, layer=LAYER - 1) == 0).all()
        assert (report.route_load.sel(**at, layer=LAYER - 1) == 0).all()
        e0 = report.expert_mmd.sel(**at, layer=LAYER - 1).values
        assert np.nanmax(np.abs(e0)) == 0 and np.isfinite(e0).any()
    else:                                      # a dense block has no routing cell
        assert report.route_js.sel(**at, layer=LAYER - 1).isnull().all()
    # the block's own output moved (its tokens went to other experts)
    assert (report.paired_shift.sel(**at, layer=LAYER, site="hidden") > 0).all()


def test_routing_report_layout(router_report):
    family, sparse, report = router_report
    assert report.route_js.dims == ("checkpoint", "layer", "modality")
    assert report.expert_mmd.dims == ("checkpoint", "layer", "site", "modality", "expert")
    assert report.expert_mmd_boot.dims[-1] == "draw" and report.route_load_boot.dims[-1] == "draw"
    assert report.route_js.attrs["units"] == "bits" and "Jensen-Shannon" in report.route_js.attrs["long_name"]
    assert "route_js_p" not in report and "route_load_q" in report and "expert_mmd_q" in report
    assert report.attrs["route_layers"] == sparse and report.sizes["expert"] == tiny.EXPERTS
    assert (report.route_js.sel(checkpoint="base", layer=sparse) == 0).all()
    clusters = report.expert_clusters.sel(layer=LAYER)
    cells = report.expert_mmd.sel(checkpoint="router", layer=LAYER)
    # an expert cell is NaN exactly where too few clusters send it tokens, and the warnings say so
    few = clusters < report.attrs["expert_min_clusters"]
    np.testing.assert_array_equal(cells.isnull().all("site").transpose("modality", "expert").values,
                                  few.transpose("modality", "expert").values)
    assert not cells.isnull().any("site").values[~few.transpose("modality", "expert").values].any()
    if bool(few.any()):
        assert f"expert_mmd at layer {LAYER}" in report.attrs["warnings"]
    # contrasts between layers reuse the draws (the registry's new metrics get them for free)
    from driftlens.compare import contrasts

    layers = [v for v in report.layer.values if v in sparse]
    if len(layers) == 2:
        con = contrasts(report, [(layers[1], layers[0])], along="layer", metrics=["route_js", "route_load"])
        assert "route_js_layer_contrast_lo" in con and "route_load_layer_contrast_p" in con

