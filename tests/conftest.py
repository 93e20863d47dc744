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


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs for one test module (modules that define their own keep theirs)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
