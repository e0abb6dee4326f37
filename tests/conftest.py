import os

import pytest
import torch

os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")   # before any pyarrow import: lerobot._pyarrow


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: on a small (or busy) CPU one intra-op thread is many times faster than several,
    because their kernels are dominated by thread synchronisation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
