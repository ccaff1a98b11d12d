import pytest
import torch

from tiny import tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: a second thread only adds OpenMP contention, badly so on a busy 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def llama():
    return tiny_model("llama")
