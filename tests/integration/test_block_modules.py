"""Every shipped spec's ``block_modules`` exist in its family's decoder blocks (tiny random model).

``driftlens ranks`` checks ``--modules`` against ``block_modules`` without loading a model, so a
wrong entry there would let a schedule through that fails only at training time.
"""
from __future__ import annotations

import dataclasses
import os

import pytest

from driftlens.specs import SpecError, list_specs
from driftlens.testing import tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECS = {s.family: s for s in list_specs()}


def test_every_family_has_a_spec_and_a_tiny_model():
    assert set(SPECS) == set(tiny.FAMILIES)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_block_modules_exist_at_layer_0(family):
    from torch import nn

    spec = SPECS[family]
    model, _ = tiny.build(family, seed=0, n_layers=1)
    modules = dict(model.named_modules())
    missing = [m for m in spec.block_modules if spec.module_path(0, m) not in modules]
    assert spec.block_modules and not missing, (spec.path, missing)
    assert all(isinstance(modules[spec.module_path(0, m)], nn.Linear) for m in spec.block_modules)
    spec.validate(model)                     # validate checks block_modules too ...
    broken = dataclasses.replace(spec, block_modules=(*spec.block_modules, "mlp.gateproj"))
    with pytest.raises(SpecError, match=r"block_modules: module '.*\.0\.mlp\.gateproj' not found.*mlp\.gate_proj"):
        broken.validate(model)               # ... and names a wrong entry with its nearest module
