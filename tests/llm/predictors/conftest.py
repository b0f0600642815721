"""Predictor tests train many tiny networks: one thread avoids thread-pool overhead on tiny tensors."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
