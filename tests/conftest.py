import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny convs/matmuls run fastest on one thread; on a shared CPU, OpenMP thread contention costs up to 40x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
