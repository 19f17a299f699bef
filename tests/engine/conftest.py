from __future__ import annotations

import pytest

from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="session")
def relu_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("relu") / "model", "relu", num_layers=2)
