"""The snn tests run tiny tensors: one intra-op thread avoids OpenMP oversubscription on small, shared machines."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
