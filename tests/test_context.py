"""[model] context: an AIDO.Cell model on a subset of its genes (`restrict`), chosen by `context_genes`."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

from sae_fast.errors import UserError
from sae_fast.models.aido_cell import N_DEPTH_TOKENS, AIDOCellConfig, random_aido_cell
from sae_fast.models.base import CellBatch
from sae_fast.models.genes import context_genes, parse_context

G = 40
GENES = [f"G{i:02d}" for i in range(G)]


@pytest.fixture(scope="module")
def model():
    cfg = AIDOCellConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                         max_position_embeddings=G)
    return random_aido_cell(cfg, GENES, seed=3).eval()


def counts(n_cells=60, seed=0):
    rng = np.random.default_rng(seed)
    lam = rng.gamma(0.5, 2.0, size=(1, G)) * rng.gamma(2.0, 1.0, size=(n_cells, 1))
    a = ad.AnnData(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    a.var_names = GENES
    a.obs_names = [f"c{i}" for i in range(n_cells)]
    return a


def test_restrict_equals_the_full_model_on_the_same_genes_at_their_positions(model):
    keep = [1, 2, 9, 17, 30, 39]
    small = model.restrict([GENES[i] for i in reversed(keep)])  # any order in, vocabulary order out
    assert small.genes == [GENES[i] for i in keep] and len(small.genes) == small.config.max_position_embeddings
    pos = torch.tensor(keep + [G, G + 1])
    values = torch.rand(3, G + N_DEPTH_TOKENS) * 3
    T = len(pos)
    gene_ids = torch.cat([torch.arange(len(keep)), torch.full((N_DEPTH_TOKENS,), -1)]).expand(3, -1)
    mask = torch.ones(3, T, dtype=torch.bool)
    full = CellBatch({"values": values[:, pos], "positions": pos.expand(3, -1)}, gene_ids, torch.arange(3), mask,
                     values[:, pos])
    sub = CellBatch({"values": values[:, pos]}, gene_ids, torch.arange(3), mask, values[:, pos])
    with torch.no_grad():
        a, b = model(full, layer=1), small(sub, layer=1)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.embedding, b.embedding)
    assert torch.equal(a.expression[:, :len(keep)], b.expression)
    # the restricted model prepares an AnnData on its own genes only
    batch = next(iter(small.prepare(counts(4), batch_size=4)))
    assert batch.inputs["values"].shape == (4, len(keep) + N_DEPTH_TOKENS)


def test_hvg_context_is_scanpys_seurat_ranking_over_the_measured_vocabulary_genes(model):
    a = counts()
    extra = ad.AnnData(sp.csr_matrix(np.ones((a.n_obs, 2), np.float32)))
    extra.var_names = ["NOT_IN_VOCAB1", "NOT_IN_VOCAB2"]
    extra.obs_names = a.obs_names
    data = ad.concat([a[:, ::-1], extra], axis=1)  # reversed order, plus genes the model does not know
    genes = context_genes(model, data, "hvg:12")
    ref = a.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=12)
    assert genes == [g for g in GENES if ref.var.loc[g, "highly_variable"]]
    assert len(genes) == 12


def test_context_from_a_file_and_bad_specs(model, tmp_path):
    f = tmp_path / "genes.txt"
    f.write_text("G05\nG03\n\n")
    assert context_genes(model, counts(5), str(f)) == ["G03", "G05"]
    assert context_genes(model, counts(5), "all") is None
    f.write_text("G05\nCD99\n")
    with pytest.raises(UserError, match="CD99"):
        context_genes(model, counts(5), str(f))
    for bad in ("hvg:", "hvg:0", "hvg:ten"):
        with pytest.raises(UserError, match="hvg:N"):
            parse_context(bad)
    with pytest.raises(UserError, match="at most hvg:40"):
        context_genes(model, counts(5), "hvg:41")
    with pytest.raises(UserError, match="not 'all'"):
        context_genes(model, counts(5), str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="not in"):
        model.restrict(["G01", "NOPE"])


def test_only_aido_cell_models_take_a_context():
    from sae_fast.models.scfoundation import ScFoundation, ScFoundationConfig

    cfg = ScFoundationConfig(seq_len=8, hidden_dim=16, depth=1, heads=2, bin_num=10, pad_token_id=3,
                             mask_token_id=2)
    with pytest.raises(UserError, match="only to AIDO.Cell"):
        ScFoundation(cfg, GENES[:6]).restrict(GENES[:3])


def test_run_config_checks_the_context_up_front(tmp_path):
    from sae_fast.run import load_config
    from sae_fast.run.runner import prepare

    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nname = "mini"\ncontext = "hvg:many"\n[data]\npath = "pbmc3k"\nmax_cells = 4\n')
    with pytest.raises(UserError, match=r"^model\.context = 'hvg:many'"):
        prepare(load_config(cfg, []), tmp_path / "out")
    assert not (tmp_path / "out").exists()
