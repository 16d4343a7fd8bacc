"""Interpretation of SAE features (SPEC §2): feature x gene matrix, participation ratio, GO enrichment (numba
ORA), information content, raw-neuron and ICA baselines, the feature overlap graph, cell-level AMI/F1 and
gene-level properties. The main entry point is `interpret_sae(sae, model, adata, layer)`; the pieces are
usable alone:

    ora(queries, gene_sets, background)      hypergeometric ORA + BH per query, = gseapy.enrich, much faster
    participation_ratio(F)                   effective number of genes per feature
    load_gene_sets(name_or_path)             bundled GO BP/CC/MF 2022, immune markers, GMT files, dicts
"""

from sae_fast.interpret.cells import association_scores, best_features, normalise_by_max
from sae_fast.interpret.enrich import benjamini_hochberg, compile_library, ora
from sae_fast.interpret.features import (
    FeatureGeneAccumulator,
    gene_filter,
    n_top_genes,
    participation_ratio,
    top_genes,
)
from sae_fast.interpret.genes import GENE_FAMILIES, expression_spearman, family_shares, gene_family
from sae_fast.interpret.genesets import GeneSets, go_terms, load_gene_sets, read_gmt
from sae_fast.interpret.overlap import overlap_coefficients, overlap_graph
from sae_fast.interpret.pipeline import (
    InterpretConfig,
    InterpretResult,
    format_summary,
    interpret_sae,
    model_tokens,
    write_results,
)
from sae_fast.interpret.summary import annotate_matrix, compare_bases, ica_matrix, share_enriched

__all__ = [
    "FeatureGeneAccumulator", "GENE_FAMILIES", "GeneSets", "InterpretConfig", "InterpretResult",
    "annotate_matrix", "association_scores", "benjamini_hochberg", "best_features", "compare_bases",
    "compile_library", "expression_spearman", "family_shares", "format_summary", "gene_family", "gene_filter",
    "go_terms", "ica_matrix", "interpret_sae", "load_gene_sets", "model_tokens", "n_top_genes",
    "normalise_by_max", "ora", "overlap_coefficients", "overlap_graph", "participation_ratio", "read_gmt",
    "share_enriched", "top_genes", "write_results",
]
