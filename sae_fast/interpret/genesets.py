"""Gene-set libraries: GMT files (plain or gzipped), gseapy-style dicts, the bundled GO 2022 and marker sets.

    sets = load_gene_sets("go_bp")             # bundled GO BP (also go_cc, go_mf, immune_markers)
    sets = load_gene_sets("my_sets.gmt.gz")    # any GMT file: term<TAB>description<TAB>gene<TAB>gene...
    sets = load_gene_sets({"A": ["CD3E"]})     # gseapy's dict format passes through
    sets = load_gene_sets("enrichr:KEGG_2021_Human")   # an Enrichr library via gseapy (needs a network)

The result is a `GeneSets`: a plain `dict[term, list[gene]]` (so gseapy accepts it as is) that also carries
each term's human-readable name (`.names`) and, for the bundled GO sets, its information content (`.ic`): IC =
-ln(n_term / n_root) from annotations propagated up the ontology (SPEC §2), read from the bundled term tables.
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources
from pathlib import Path

import pandas as pd

from sae_fast.errors import UserError

BUNDLED = {"go_bp": "go_bp_symbols.gmt.gz", "go_cc": "go_cc_symbols.gmt.gz", "go_mf": "go_mf_symbols.gmt.gz",
           "immune_markers": "human_immune_cell_markers.json"}


class GeneSets(dict):
    """dict term -> genes, plus `names` (term -> description) and `ic` (term -> IC; empty if unknown)."""

    def __init__(self, sets: dict, names: dict | None = None, ic: dict | None = None, source: str = ""):
        super().__init__(sets)
        self.names = {t: (names or {}).get(t, t) for t in sets}
        self.ic = dict(ic or {})
        self.source = source


def _data_path(name: str) -> Path:
    return Path(str(resources.files("sae_fast.data").joinpath(name)))


def read_gmt(path: str | Path) -> GeneSets:
    """Read a GMT file (gzipped if it ends in .gz): one set a line, `term<TAB>description<TAB>genes...`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: gene-set file not found; give a GMT file or one of {', '.join(BUNDLED)}")
    opener = gzip.open if path.suffix == ".gz" else open
    sets, names = {}, {}
    with opener(path, "rt") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = [p.strip() for p in line.rstrip("\n").split("\t")]
            if not parts or not parts[0]:
                continue
            if len(parts) < 3:
                raise UserError(f"{path}:{lineno}: a GMT line needs term<TAB>description<TAB>genes..., "
                                f"got {len(parts)} field(s)")
            genes = list(dict.fromkeys(g for g in parts[2:] if g))
            sets[parts[0]] = genes
            names[parts[0]] = parts[1] or parts[0]
    if not sets:
        raise UserError(f"{path}: no gene sets found (is it a GMT file?)")
    return GeneSets(sets, names, source=str(path))


def _read_marker_json(path: Path) -> GeneSets:
    """pegasus-style marker hierarchy: each cell type (or subtype) becomes one set of its positive markers."""
    sets = {}

    def walk(node):
        for ct in node.get("cell_types", []):
            genes = [g[:-1] for m in ct.get("markers", []) for g in m.get("genes", []) if g.endswith("+")]
            if genes:
                sets[ct["name"]] = list(dict.fromkeys(genes))
            if "subtypes" in ct:
                walk(ct["subtypes"])

    walk(json.loads(path.read_text()))
    tcell = read_gmt(_data_path("human_t_cell_markers.gmt"))
    for term, genes in tcell.items():
        sets.setdefault(tcell.names[term], genes)
    return GeneSets(sets, source="immune_markers (pegasuspy)")


@functools.lru_cache(maxsize=8)
def _bundled(name: str) -> GeneSets:
    path = _data_path(BUNDLED[name])
    if name == "immune_markers":
        return _read_marker_json(path)
    sets = read_gmt(path)
    terms = go_terms(name)
    return GeneSets(sets, sets.names, terms["ic"].to_dict(), source=f"{name} (GO 2022, bundled)")


def go_terms(name: str = "go_bp") -> pd.DataFrame:
    """The bundled GO term table (term_id; name, ontology, n_genes, n_direct_genes, ic, depth, in_gmt)."""
    if name not in ("go_bp", "go_cc", "go_mf"):
        raise UserError(f"no term table for {name!r}; choose go_bp, go_cc or go_mf")
    return pd.read_csv(_data_path(f"{name}_terms.tsv.gz"), sep="\t", index_col="term_id")


def load_gene_sets(name_or_path) -> GeneSets:
    """A gene-set library by bundled name (go_bp, go_cc, go_mf, immune_markers), GMT path, dict, or
    "enrichr:LIBRARY" (downloaded through gseapy.get_library; needs a network)."""
    if isinstance(name_or_path, GeneSets):
        return name_or_path
    if isinstance(name_or_path, dict):
        bad = [t for t, g in name_or_path.items() if isinstance(g, str)]
        if bad:
            raise UserError(f"gene set {bad[0]!r} is a string; give each set as a list of gene symbols")
        return GeneSets({str(t): list(dict.fromkeys(map(str, g))) for t, g in name_or_path.items()})
    key = str(name_or_path)
    if key in BUNDLED:
        s = _bundled(key)
        return GeneSets(s, s.names, s.ic, s.source)  # a copy: callers may edit theirs
    if key.startswith("enrichr:"):
        import gseapy

        try:
            return GeneSets(gseapy.get_library(key.split(":", 1)[1], organism="Human"), source=key)
        except Exception as e:  # noqa: BLE001 - no network or an unknown library: say which
            raise UserError(f"could not fetch Enrichr library {key!r} through gseapy ({type(e).__name__}); "
                            "it needs a network: use a bundled name or a GMT file instead") from None
    if Path(key).suffix in (".gmt", ".gz", ".txt") or Path(key).exists():
        return read_gmt(key)
    raise UserError(f"unknown gene sets {key!r}; choose one of {', '.join(BUNDLED)}, a GMT file path, "
                    "a dict term -> genes, or enrichr:LIBRARY")
