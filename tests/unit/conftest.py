"""The unit tier loads no model: building any transformers model here fails, naming the tier to move to."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _no_model_in_unit_tests():
    from transformers import PreTrainedModel

    original = PreTrainedModel.__init__

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a unit test built a model ({type(self).__name__}); unit tests load no model: "
                             f"move the test to tests/integration")

    PreTrainedModel.__init__ = refuse
    yield
    PreTrainedModel.__init__ = original
