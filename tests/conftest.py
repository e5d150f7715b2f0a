import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def single_process():
    """A one-process megatron-core world (HashStore, no ports) with the CPU runtime active."""
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_single_process

    init_single_process(ParallelLayout())
    yield
