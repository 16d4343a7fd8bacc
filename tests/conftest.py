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


DEMO_SHRINK = ["--set", "data.max_cells=48", "--set", "sae.epochs=1", "--set", "interpret.baselines=['raw']",
               "--set", "steer.epochs=3"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`sae-fast demo` shrunk for CI (48 cells, one epoch, raw-neuron baseline), run once per session and shared:
    (the run folder, what it printed)."""
    import contextlib
    import io

    from sae_fast.cli import main

    out = tmp_path_factory.mktemp("demo_run") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(out), "-q", *DEMO_SHRINK]) == 0
    return out, printed.getvalue()
