"""Fused source: the forward pass's activations without disk, in [Y]'s whole-cell and [P]'s sampled
batches."""

import numpy as np
import pytest
import torch
from test_extract import G, tiny_cells, tiny_model

from sae_fast import extract
from sae_fast.activations.fused import fused_source


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2)


@pytest.fixture(scope="module")
def adata():
    return tiny_cells(n=19, seed=1)


def row_set(x: torch.Tensor) -> set:
    return {tuple(r) for r in x.numpy().round(5).tolist()}


def test_whole_cell_batches_cover_every_token_once(tmp_path, model, adata):
    src = fused_source(model, adata, 1, tokens="all", cells_per_batch=4, seed=0)
    items = list(src)
    assert [len(x) for x in items] == [4 * G] * 4 + [3 * G]  # one item = all tokens of one forward batch
    got = torch.cat(items)
    ref = extract(model, adata, 1, tmp_path / "a", dtype="float32").read(0, adata.n_obs * G)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert row_set(got) == row_set(ref)
    assert src.n_tokens == len(got)
    again = torch.cat(list(fused_source(model, adata, 1, tokens="all", cells_per_batch=4, seed=0)))
    assert torch.equal(got, again)  # deterministic for (seed, epoch)
    assert not torch.equal(got, torch.cat(list(src)))  # the next epoch visits the cells in another order


def test_sampled_tokens_through_the_mixing_buffer(tmp_path, model, adata):
    src = fused_source(model, adata, 2, tokens="sample:10", batch_size=32, buffer_tokens=70, seed=1)
    e0 = list(src)
    assert all(len(x) == 32 for x in e0[:-1]) and sum(len(x) for x in e0) == 10 * adata.n_obs == src.n_tokens
    ref = row_set(extract(model, adata, 2, tmp_path / "a", dtype="float32").read(0, adata.n_obs * G))
    assert row_set(torch.cat(e0)) <= ref  # every row is a real token activation of layer 2
    e1 = torch.cat(list(src))
    assert not torch.equal(torch.cat(e0), e1)  # a new draw and a new mix each epoch
    src.set_epoch(1)
    assert torch.equal(torch.cat(list(src)), e1)  # set_epoch replays an epoch exactly (resume)


def test_a_config_object_supplies_the_options(model, adata):
    class Cfg:
        batch_size, seed, tokens = 16, 3, "sample:5"

    src = fused_source(model, adata, 0, Cfg())
    assert (src.batch_size, src.seed, src.rule, src.n_sample) == (16, 3, "sample", 5)
    assert fused_source(model, adata, 0, Cfg(), tokens="all").rule == "all"  # keywords win


def test_train_sae_fused_keeps_autograd_on_and_writes_nothing(tmp_path, model, adata, monkeypatch):
    from sae_fast import train_sae

    monkeypatch.chdir(tmp_path)
    seen = []
    real = fused_source

    class Spy:
        """Records the grad mode while the source is suspended between items, i.e. while the trainer works."""

        def __init__(self, src):
            self.src, self.n_tokens = src, src.n_tokens

        def set_epoch(self, epoch):
            self.src.set_epoch(epoch)

        def __iter__(self):
            for x in self.src:
                yield x
                seen.append(torch.is_grad_enabled())

    def spy(*a, **k):
        return Spy(real(*a, **k))

    monkeypatch.setattr("sae_fast.activations.fused.fused_source", spy)
    sae = train_sae(model=model, adata=adata, layer=1, k=4, expansion=2, epochs=2, batch_size=64, seed=0)
    assert sae.W_dec.shape == (32, 16) and torch.isfinite(sae.W_dec).all()
    assert seen and all(seen)
    assert not list(tmp_path.iterdir())


def test_layer_out_of_range(model, adata):
    from sae_fast.errors import UserError

    with pytest.raises(UserError, match="out of range"):
        fused_source(model, adata, 7)
    with pytest.raises(UserError, match="sample:N"):
        fused_source(model, adata, 0, tokens="some")
    np.testing.assert_equal(fused_source(model, adata, 0)._cells(0).size, adata.n_obs)


def test_train_cli_fused(tmp_path, model, adata):
    from sae_fast.cli import main
    from sae_fast.models.aido_cell import save_aido_cell
    from sae_fast.sae.checkpoint import load_sae

    save_aido_cell(model, tmp_path / "model")
    adata.write_h5ad(tmp_path / "cells.h5ad")
    argv = ["train", "-q", "--model", f"aido_cell:{tmp_path / 'model'}", "--data",
            str(tmp_path / "cells.h5ad"), "--layer", "1", "--tokens", "sample:8",
            "--out", str(tmp_path / "sae"), "--k", "4",
            "--expansion", "2", "--epochs", "1", "--batch-size", "32"]
    assert main(argv) == 0
    sae = load_sae(tmp_path / "sae")
    assert sae.W_dec.shape == (32, 16)
    assert main(argv[:4] + ["--out", str(tmp_path / "x")]) == 2  # --model without --data / --layer
