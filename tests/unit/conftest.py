"""The unit tier loads no model: building any transformers model in a unit test fails, naming the
tier to move it to. (Per test, not per session: the integration tests that run after the unit
tier in the same session build models.)"""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_model_in_unit_tests(monkeypatch):
    from transformers import PreTrainedModel

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a unit test built a model ({type(self).__name__}); unit tests load no model: "
                             f"move the test to tests/integration")

    monkeypatch.setattr(PreTrainedModel, "__init__", refuse)
