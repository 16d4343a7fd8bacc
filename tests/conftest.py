"""Test set-up: without a GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 must be set
before triton is imported anywhere)."""

import os

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
