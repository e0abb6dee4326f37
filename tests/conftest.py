import os
import signal

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


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A test that runs train.main in-process and fails midway leaves its SIGTERM handler installed; forked pool
    workers of later tests would inherit it and swallow the pool's SIGTERM at exit (a hang seen in CI)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
