"""Test set-up: Triton through its CPU interpreter where no GPU exists.

TRITON_INTERPRET must be set before triton is first imported, so this runs
before any test module imports fastddpm's Triton kernels.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastddpm.ops import _dispatch  # noqa: E402

TRITON_OK = _dispatch.triton_status()[0] and (HAS_CUDA or _dispatch.triton_interpreting())


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
