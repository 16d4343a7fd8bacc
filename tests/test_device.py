"""Device and dtype follow the user's request: --device cpu on a machine with a GPU gives a float32 model on the
CPU (not bfloat16 moved there), and interpret uses the GPU when there is one unless told otherwise. The GPU is
simulated (torch.cuda.is_available -> True): nothing may touch CUDA unless asked to."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

import sae_fast
from sae_fast.cli import main
from sae_fast.commands import extract as extract_cmd
from sae_fast.commands import interpret as interpret_cmd


@pytest.fixture
def gpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_policy_in_one_place(gpu_machine):
    from sae_fast.models.aido_cell import default_device_dtype

    assert default_device_dtype() == (torch.device("cuda"), torch.bfloat16)
    assert default_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    p = next(extract_cmd.parse_model("mini", "cpu").parameters())
    assert (p.device.type, p.dtype) == ("cpu", torch.float32)
    p = next(extract_cmd.parse_model("mini", "cpu", "bfloat16").parameters())
    assert (p.device.type, p.dtype) == ("cpu", torch.bfloat16)


def test_extract_device_cpu_on_a_gpu_machine_is_float32(gpu_machine, tmp_path, capsys):
    """`sae-fast extract --device cpu` writes the same activations as a float32 model on the CPU."""
    out = tmp_path / "acts"
    adata = sae_fast.datasets.pbmc3k()[:6].copy()
    adata.write_h5ad(tmp_path / "cells.h5ad")
    assert main(["extract", "--model", "mini", "--data", str(tmp_path / "cells.h5ad"), "--layer", "1", "--out",
                 str(out), "--device", "cpu", "--dtype", "float32", "-q"]) == 0
    model = sae_fast.load_model("mini", device="cpu", dtype=torch.float32)
    ref = sae_fast.extract(model, adata, 1, tmp_path / "ref", dtype="float32")
    got = sae_fast.open_shards(out)
    assert len(got) == len(ref) and np.array_equal(got.read(0, len(ref)).numpy(), ref.read(0, len(ref)).numpy())


def test_run_config_model_device(gpu_machine):
    from sae_fast.run import load_config
    from sae_fast.run.config import load_model_on

    cfg = load_config(None, ["model.name=mini", "model.device=cpu"])
    p = next(load_model_on(cfg.model.name, cfg.model.path, cfg.model.device, cfg.model.dtype).parameters())
    assert (p.device.type, p.dtype) == ("cpu", torch.float32)


def test_interpret_defaults_to_the_policy_not_the_cpu(gpu_machine, monkeypatch, tmp_path):
    """No --device: interpret asks the policy (cuda when available), as extract and train do."""
    parser = argparse.ArgumentParser()
    interpret_cmd.add_arguments(parser)
    assert parser.parse_args(["--sae", "s", "--out", "o"]).device == "auto"
    seen = {}

    class Stop(Exception):
        pass

    def fake_load_model(name, path=None, *, device=None, dtype=None, **kw):
        seen.update(device=device, dtype=dtype)
        raise Stop

    monkeypatch.setattr(sae_fast.models.registry, "load_model", fake_load_model)
    sae_fast.TopKSAE(128, 256, 8).save(tmp_path / "sae")
    with pytest.raises(Stop):
        main(["interpret", "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "o"), "--layer", "1"])
    assert seen == {"device": None, "dtype": None}  # None = default_device_dtype: cuda + bfloat16 here
