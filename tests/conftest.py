"""Shared test fixtures."""

import pytest
import torch

from training.prebuild import use_venv_ninja

use_venv_ninja()  # in-process DeepSpeed builds its ops with the ninja the workers use


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded, and the CI machine's 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
