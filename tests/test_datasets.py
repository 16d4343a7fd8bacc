"""The bundled demo data: real counts, harmonised labels, provenance, and `read`'s errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sae_fast import datasets
from sae_fast.errors import UserError


def _check_counts(adata):
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    data = adata.X.data
    assert (data > 0).all() and np.array_equal(data, np.round(data))


def test_pbmc_demo():
    adata = datasets.pbmc_demo()
    assert adata.shape == (360, 8361)
    _check_counts(adata)
    assert dict(adata.obs["batch"].value_counts()) == {"10x 5'": 200, "10x 3' v1": 160}
    counts = adata.obs["cell_type"].value_counts()
    assert set(counts.index) == {"CD4 T", "CD8 T", "B", "NK", "CD14 Mono", "FCGR3A Mono", "DC", "other T"}
    assert counts["B"] == 20 and counts["CD4 T"] == 40 + 100
    fine = adata.obs.loc[adata.obs["dataset"] == "pbmc3k", "cell_type_fine"]
    assert {"Naive CD4 T", "Memory CD4 T"} <= set(fine)
    assert set(adata.uns["provenance"]) == {"pbmc3k", "wu2020_tcells"}
    assert adata.obs_names.is_unique


@pytest.mark.parametrize("loader,shape,batch", [(datasets.pbmc3k, (160, 8674), "10x 3' v1"),
                                                (datasets.pbmc68k_reduced, (700, 765), "10x 3' v1"),
                                                (datasets.wu2020_tcells, (200, 30727), "10x 5'")])
def test_loaders(loader, shape, batch):
    adata = loader()
    assert adata.shape == shape
    _check_counts(adata)
    assert set(adata.obs["batch"]) == {batch}
    assert {"cell_type", "cell_type_fine", "dataset"} <= set(adata.obs)
    assert any(w in next(iter(adata.uns["provenance"].values())) for w in ("BSD-3", "CC BY"))


def test_read(tmp_path):
    assert datasets.read("pbmc3k").shape == (160, 8674)
    small = datasets.pbmc3k()[:5].copy()
    small.write_h5ad(tmp_path / "s.h5ad")
    assert datasets.read(tmp_path / "s.h5ad").shape == (5, 8674)
    with pytest.raises(UserError, match="no such file"):
        datasets.read(tmp_path / "nope.h5ad")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="h5ad"):
        datasets.read(tmp_path / "x.csv")
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(UserError, match="could not be read"):
        datasets.read(tmp_path / "bad.h5ad")
