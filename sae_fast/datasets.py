"""Small real single-cell data sets bundled with sae-fast, for the demo, the tests and the benchmarks.

    import sae_fast
    adata = sae_fast.datasets.pbmc_demo()        # 360 cells: PBMC3K subset + Wu 2020 T cells, shared genes
    adata = sae_fast.datasets.read("pbmc3k")     # a bundled name, or a path to an .h5ad file

Every loader returns raw integer counts in `X` (float32 CSR) and harmonised labels in `obs`:
`cell_type` (coarse, the same names across sources: CD4 T, CD8 T, B, NK, CD14 Mono, FCGR3A Mono, DC, ...),
`cell_type_fine` (the source's own label), `batch` (the 10x chemistry: a real technical contrast), `dataset`.
`uns["provenance"]` says where the cells come from and under which license. Nothing is downloaded: the files
ship inside the package (sae_fast/data, see PROVENANCE_datasets.md there).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sae_fast.errors import UserError

CHEMISTRY_3P_V1 = "10x 3' v1"
CHEMISTRY_5P = "10x 5'"

_PBMC3K_TYPES = {"Naive CD4 T": "CD4 T", "Memory CD4 T": "CD4 T", "CD8 T": "CD8 T", "B": "B", "NK": "NK",
                 "CD14+ Mono": "CD14 Mono", "FCGR3A+ Mono": "FCGR3A Mono", "DC": "DC"}
_PBMC68K_TYPES = {"CD4+/CD25 T Reg": "CD4 T", "CD4+/CD45RO+ Memory": "CD4 T",
                  "CD4+/CD45RA+/CD25- Naive T": "CD4 T", "CD8+ Cytotoxic T": "CD8 T",
                  "CD8+/CD45RA+ Naive Cytotoxic": "CD8 T", "CD19+ B": "B", "CD56+ NK": "NK",
                  "CD14+ Monocyte": "CD14 Mono", "Dendritic": "DC", "CD34+": "CD34+ progenitor"}
_WU2020_TYPES = {"CD4 T": "CD4 T", "CD8 T": "CD8 T", "other": "other T"}

PROVENANCE = {
    "pbmc3k": "10x Genomics PBMC3K (CC BY 4.0); the 160-cell labelled subset shipped by Bioconductor "
              "decoupleR (extdata/sc_data.rds); counts = round(expm1(logdata) * nCount_RNA / 1e4), "
              "exact integers",
    "pbmc68k_reduced": "scanpy's bundled 10x_pbmc68k_reduced.h5ad (BSD-3; 10x Genomics Fresh 68k PBMCs, "
                       "Zheng et al. 2017); 765 highly variable genes only; counts recovered from raw "
                       "log1p(CP10k) x n_counts",
    "wu2020_tcells": "Wu et al. 2020 (Nature 579:274) tumour-infiltrating T cells, 10x 5' chemistry, raw "
                     "counts; 200 cells from the scirpy test data (BSD-3)",
}
_FILES = {"pbmc3k": "pbmc3k_decoupler160_counts.h5ad", "pbmc68k_reduced": "pbmc68k_reduced_counts.h5ad",
          "wu2020_tcells": "wu2020_tcells200_counts.h5ad"}


def data_path(filename: str) -> Path:
    """The path of a file bundled in sae_fast/data."""
    return Path(str(resources.files("sae_fast.data").joinpath(filename)))


def _read_bundled(name: str):
    import anndata as ad

    adata = ad.read_h5ad(data_path(_FILES[name]))
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.uns.pop("note", None)
    adata.uns["provenance"] = {name: PROVENANCE[name]}
    return adata


def _label(adata, fine: str, mapping: dict, batch: str, dataset: str, coarse: str | None = None):
    """Add the harmonised obs columns: cell_type (coarse, `mapping` of obs[coarse or fine]), cell_type_fine,
    batch (chemistry) and dataset."""
    import pandas as pd

    adata.obs["cell_type_fine"] = pd.Categorical(adata.obs[fine].astype(str))
    source = adata.obs[coarse or fine].astype(str)
    adata.obs["cell_type"] = pd.Categorical(source.map(mapping).fillna("other"))
    adata.obs["batch"] = pd.Categorical([batch] * adata.n_obs)
    adata.obs["dataset"] = pd.Categorical([dataset] * adata.n_obs)
    return adata


def pbmc3k():
    """160 PBMC3K cells, 20 of each of 8 labelled types, 8,674 genes; 10x 3' v1 chemistry.

    Source: 10x Genomics PBMC3K (CC BY 4.0), the labelled subset shipped by Bioconductor decoupleR; counts
    recovered exactly from its log-normalised matrix. `cell_type_fine` keeps Naive / Memory CD4 T apart."""
    return _label(_read_bundled("pbmc3k"), "cell_type", _PBMC3K_TYPES, CHEMISTRY_3P_V1, "pbmc3k")


def pbmc68k_reduced():
    """700 cells of 10x's 68k PBMCs on 765 highly variable genes only (10x 3' v1), with `bulk_labels`.

    Source: scanpy's bundled 10x_pbmc68k_reduced.h5ad (BSD-3); counts recovered from its log1p(CP10k) raw
    matrix. Only 765 genes: a model that expects a whole transcriptome sees the rest as zeros."""
    return _label(_read_bundled("pbmc68k_reduced"), "bulk_labels", _PBMC68K_TYPES, CHEMISTRY_3P_V1,
                  "pbmc68k_reduced")


def wu2020_tcells():
    """200 tumour-infiltrating / blood T cells of Wu et al. 2020 (10x 5'), 30,727 genes, raw counts.

    Source: scirpy's test data (BSD-3). `cell_type_fine` = the paper's clusters (4.x CD4, 8.x CD8, 3.1-MT);
    obs also holds `patient` (12 patients), `sample` and `source` (Tumor / NAT / Blood)."""
    return _label(_read_bundled("wu2020_tcells"), "cluster_orig", _WU2020_TYPES, CHEMISTRY_5P,
                  "wu2020_tcells", coarse="lineage")


def pbmc_demo():
    """The demo AnnData: the 160 PBMC3K cells (10x 3' v1) plus the 200 Wu 2020 T cells (10x 5') on the
    8,361 genes they share. X = raw counts (float32 CSR); obs: cell_type, cell_type_fine, batch (chemistry:
    a real technical contrast), dataset. The embedded `mini` model was pretrained on these cells."""
    import anndata as ad

    parts = {"pbmc3k": pbmc3k(), "wu2020_tcells": wu2020_tcells()}
    adata = ad.concat(parts, join="inner", merge=None, index_unique=None)
    adata.obs = adata.obs[["cell_type", "cell_type_fine", "batch", "dataset"]].astype("category")
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.uns["provenance"] = {k: PROVENANCE[k] for k in parts}
    return adata


LOADERS = {"pbmc_demo": pbmc_demo, "pbmc3k": pbmc3k, "pbmc68k_reduced": pbmc68k_reduced,
           "wu2020_tcells": wu2020_tcells}


def read(path_or_name: str | Path):
    """A bundled data set by name (pbmc_demo, pbmc3k, pbmc68k_reduced, wu2020_tcells) or an .h5ad file."""
    import anndata as ad

    if str(path_or_name) in LOADERS:
        return LOADERS[str(path_or_name)]()
    path = Path(path_or_name)
    if not path.exists():
        raise UserError(f"{path}: no such file, and not a bundled data set ({', '.join(LOADERS)})")
    if path.is_dir() or path.suffix != ".h5ad":
        raise UserError(f"{path}: expected an AnnData .h5ad file (convert with anndata / scanpy first)")
    try:
        return ad.read_h5ad(path)
    except Exception as e:  # h5py / anndata raise many types for a corrupt file
        raise UserError(f"{path}: could not be read as .h5ad ({type(e).__name__}: {e})") from None
