"""Extraction on a tiny random AIDO.Cell: values equal the forward pass, token selection rules, the forward
stops at the layer, clear errors, and a SIGKILLed `sae-fast extract` resumed with --resume is
byte-identical."""

import json
import os
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sae_fast import extract, open_shards
from sae_fast.activations.extract import select_tokens
from sae_fast.errors import UserError
from sae_fast.models.aido_cell import AIDOCellConfig, random_aido_cell, save_aido_cell

G = 48


def tiny_model(seed=0):
    cfg = AIDOCellConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24,
                         max_position_embeddings=G)
    return random_aido_cell(cfg, seed=seed)


def tiny_cells(n=21, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.8, (n, G + 5)).astype(np.float32)  # 5 genes outside the vocabulary
    counts[3] = 0  # a cell with no counts at all
    counts[3, 7] = 2
    return _adata(counts, [f"GENE{i}" for i in range(G)] + [f"OTHER{i}" for i in range(5)])


def _adata(counts, names):
    a = ad.AnnData(sp.csr_matrix(counts))
    a.var_names = names
    a.obs_names = [f"c{i}" for i in range(len(counts))]
    return a


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def adata():
    return tiny_cells()


def reference(model, adata, layer):
    """hidden [n_cells, T, d] at `layer`, the CellBatch fields, from one plain forward per cell batch."""
    hs, gene_ids, expr = [], [], []
    with torch.no_grad():
        for batch in model.prepare(adata, batch_size=adata.n_obs):
            hs.append(model.forward(batch, layer=layer).hidden)
            gene_ids.append(batch.gene_ids)
            expr.append(batch.expression)
    return torch.cat(hs), torch.cat(gene_ids), torch.cat(expr)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_all_tokens_equal_the_forward_pass(tmp_path, model, adata, dtype):
    s = extract(model, adata, 1, tmp_path / "a", tokens="all", dtype=dtype, batch_size=4, shard_tokens=100)
    h, gene_ids, _ = reference(model, adata, 1)
    assert s.n_tokens == adata.n_obs * G and len(s.shard_names) > 1  # depth tokens left out by default
    cells, genes = s.cell_ids(), s.gene_ids()
    assert np.array_equal(cells, np.repeat(np.arange(adata.n_obs), G))
    assert np.array_equal(genes, np.tile(np.arange(G), adata.n_obs))
    want = h[torch.from_numpy(cells), torch.from_numpy(genes).long()]  # position p = gene p in AIDO.Cell
    tol = dict(rtol=0, atol=0) if dtype == "float32" else dict(rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(s.read(0, s.n_tokens).float(), want.to(getattr(torch, dtype)).float(), **tol)
    m = s.manifest
    assert (m["model"], m["layer"], m["d"], m["dtype"]) == ("aido_cell", 1, 16, dtype)
    assert m["tokens"]["rule"] == "all" and m["gene_filter"] is None and m["genes"] == model.genes


def test_special_tokens_expressed_and_gene_filter(tmp_path, model, adata):
    h, gene_ids, expr = reference(model, adata, 2)
    s = extract(model, adata, 2, tmp_path / "sp", special_tokens=True, dtype="float32")
    assert s.n_tokens == adata.n_obs * (G + 2) and (s.gene_ids() == -1).sum() == 2 * adata.n_obs
    torch.testing.assert_close(s.read(0, s.n_tokens), h.reshape(-1, 16), rtol=0, atol=0)

    s = extract(model, adata, 2, tmp_path / "ex", tokens="expressed", dtype="float32")
    X = adata.X.toarray()[:, :G]
    assert s.n_tokens == int((X > 0).sum())
    assert np.all(X[s.cell_ids(), s.gene_ids()] > 0)

    keep = ["GENE3", "GENE40", "GENE7"]
    s = extract(model, adata, 2, tmp_path / "gf", gene_filter=keep, dtype="float32")
    assert set(s.gene_ids().tolist()) == {3, 7, 40} and s.n_tokens == 3 * adata.n_obs
    assert s.manifest["gene_filter"] == sorted(keep)
    with pytest.raises(UserError, match="not in aido_cell's vocabulary, e.g. NOPE"):
        extract(model, adata, 2, tmp_path / "bad", gene_filter=["GENE1", "NOPE"])


def test_sampled_tokens_are_per_cell_and_independent_of_batching(tmp_path, model, adata):
    a = extract(model, adata, 0, tmp_path / "a", tokens="sample:10", batch_size=2, seed=4)
    b = extract(model, adata, 0, tmp_path / "b", tokens="sample:10", batch_size=7, seed=4)
    c = extract(model, adata, 0, tmp_path / "c", tokens="sample:10", batch_size=7, seed=5)
    assert a.n_tokens == 10 * adata.n_obs
    assert np.array_equal(np.bincount(a.cell_ids()), np.full(adata.n_obs, 10))
    assert np.array_equal(a.gene_ids(), b.gene_ids()) and torch.equal(a.read(0, 210), b.read(0, 210))
    assert not np.array_equal(a.gene_ids(), c.gene_ids())
    per_cell = a.gene_ids().reshape(adata.n_obs, 10)
    assert all(len(set(row)) == 10 for row in per_cell.tolist())  # without replacement
    d = extract(model, adata, 0, tmp_path / "d", tokens=f"sample:{G + 10}")  # more than a cell has: all
    assert d.n_tokens == G * adata.n_obs


def test_select_tokens_sample_draws_uniformly(model, adata):
    """Over many seeds every gene token is drawn with probability N / G (chi-square-free check: +-5 sigma)."""
    batch = next(iter(model.prepare(adata[:1], batch_size=1)))
    hits = sum(select_tokens(batch, "sample", 12, seed=s)[0, :G].double() for s in range(800))
    p = 12 / G
    sigma = (800 * p * (1 - p)) ** 0.5
    assert torch.all((hits - 800 * p).abs() < 5 * sigma) and hits.sum() == 800 * 12


def test_forward_stops_at_the_layer(tmp_path, model, adata):
    calls = []
    handles = [blk.register_forward_hook(lambda *a, i=i: calls.append(i))
               for i, blk in enumerate(model.bert.encoder.layer)]
    head = model.cls.predictions.register_forward_hook(lambda *a: calls.append("head"))
    try:
        extract(model, adata[:4], 0, tmp_path / "stop", batch_size=4)
    finally:
        for h in [*handles, head]:
            h.remove()
    assert calls == [0]


def test_errors(tmp_path, model, adata):
    with pytest.raises(UserError, match="layer 3 is out of range"):
        extract(model, adata, 3, tmp_path / "x")
    with pytest.raises(UserError, match="sample:N"):
        extract(model, adata, 0, tmp_path / "x", tokens="sample:0")
    extract(model, adata[:4], 0, tmp_path / "y", tokens="all")
    with pytest.raises(UserError, match="already holds activation shards"):
        extract(model, adata[:4], 0, tmp_path / "y", tokens="all")
    with pytest.raises(UserError, match="cannot resume.*tokens"):
        extract(model, adata[:4], 0, tmp_path / "y", tokens="expressed", resume=True)
    assert extract(model, adata[:4], 0, tmp_path / "y", tokens="all", resume=True).n_tokens == 4 * G


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    cfg = AIDOCellConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                         max_position_embeddings=256)
    save_aido_cell(random_aido_cell(cfg, seed=1), d / "model")
    rng = np.random.default_rng(0)
    cells = _adata(rng.poisson(0.5, (300, 256)).astype(np.float32), [f"GENE{i}" for i in range(256)])
    cells.write_h5ad(d / "cells.h5ad")
    return d


def cli(checkpoint, out, *extra):
    return [sys.executable, "-m", "sae_fast", "extract", "--model", f"aido_cell:{checkpoint / 'model'}",
            "--data", str(checkpoint / "cells.h5ad"), "--layer", "1", "--out", str(out),
            "--tokens", "sample:64", "--batch-size", "4", "--shard-tokens", "256", "-q", *extra]


def test_killed_extraction_resumes_byte_identical(tmp_path, checkpoint):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.Popen(cli(checkpoint, tmp_path / "whole"), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # the uninterrupted run, alongside
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(checkpoint, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    manifest = killed / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = json.loads(manifest.read_text())
    assert not m["complete"] and 0 < len(m["shards"]) < 75, "the run was not interrupted mid-way"
    with pytest.raises(UserError, match="incomplete"):
        open_shards(killed)
    out = subprocess.run(cli(checkpoint, killed, "--resume"), env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert whole.wait() == 0
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert whole == sorted(p.name for p in killed.iterdir())
    for name in whole:
        assert (tmp_path / "whole" / name).read_bytes() == (killed / name).read_bytes(), name
    open_shards(killed, verify=True)
