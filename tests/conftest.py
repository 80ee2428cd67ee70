import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# under pytest-xdist (``make test`` runs one worker per core) each worker computes on one thread
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


from standins.fixtures import fake_tensorrt, fake_torch_tensorrt  # noqa: E402, F401 - fixtures for the TensorRT tests
