import pytest

from tiny import tiny_model


@pytest.fixture
def llama():
    return tiny_model("llama")
