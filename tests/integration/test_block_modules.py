"""Every shipped spec's ``block_modules`` exist in its family's decoder blocks (tiny random model).

``driftlens ranks`` checks ``--modules`` against ``block_modules`` without loading a model, so a
wrong entry there would let a schedule through that fails only at training time.
"""
from __future__ import annotations

import dataclasses
import os
import re

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
    last = spec.block_modules[-1]                    # a near miss of a real entry, e.g. mlp.down_proj -> mlp.downproj
    typo = last.replace("_proj", "proj") if "_proj" in last else last + "x"
    broken = dataclasses.replace(spec, block_modules=(*spec.block_modules, typo))
    with pytest.raises(SpecError, match=rf"block_modules: module '.*\.0\.{re.escape(typo)}' not found; nearest "
                                         rf"existing: .*\.0\.{re.escape(last)}"):
        broken.validate(model)               # ... and names a wrong entry with its nearest module
