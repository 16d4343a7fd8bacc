"""ORA speed: sae-fast's numba `ora` against `gseapy.enrich` called once per query (its only local mode).

Workload (the acceptance case): 5,120 query lists of 10-100 genes drawn from the GO universe, each tested
against every bundled GO BP set (9,035) with the GO universe as background; every (query, term) with overlap
>= 1 comes back with p, BH q and the overlapping genes, as gseapy returns them. gseapy is timed on a sample of
queries and extrapolated per query (it would take hours on all 5,120); its p and adjusted p are checked
against ours on that sample. numba's one-off compile (or cache load) is reported separately as `compile_s`.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from sae_fast.benchmarks.common import device_name, record, time_fn


def run(quick: bool = False) -> list[dict]:
    import gseapy

    from sae_fast.interpret import load_gene_sets, ora

    logging.getLogger("gseapy").setLevel(logging.WARNING)
    n_queries, n_ref = (64, 2) if quick else (5120, 20)
    go = load_gene_sets("go_bp")
    background = sorted({g for genes in go.values() for g in genes})
    rng = np.random.default_rng(0)
    queries = {f"q{i}": list(rng.choice(background, int(rng.integers(10, 101)), replace=False))
               for i in range(n_queries)}

    t0 = time.perf_counter()
    ora({"warm": queries["q0"]}, go, background)  # numba compile or cache load
    compile_s = time.perf_counter() - t0
    result = {}

    def ours():
        result["df"] = ora(queries, go, background)

    ours_s = time_fn(ours, repeat=1 if not quick else 3, warmup=0)
    df = result["df"]

    ref_names = list(queries)[:n_ref]
    gs = dict(go)
    t0 = time.perf_counter()
    refs = [gseapy.enrich(gene_list=queries[q], gene_sets=gs, background=background, outdir=None,
                          no_plot=True, cutoff=1.0).results for q in ref_names]
    ref_per_query = (time.perf_counter() - t0) / n_ref
    err = 0.0
    for q, ref in zip(ref_names, refs):
        mine = df[df["query"] == q].set_index("term").loc[ref["Term"]]
        err = max(err, float(np.max(np.abs(mine.p_value.to_numpy() / ref["P-value"].to_numpy() - 1))),
                  float(np.max(np.abs(mine.q_value.to_numpy() / ref["Adjusted P-value"].to_numpy() - 1))))
    config = {"queries": n_queries, "genes_per_query": "10-100", "gene_sets": "go_bp", "terms": len(go),
              "background": len(background)}
    return [record("enrich", config, device_name("cpu"), ours_s, ref_per_query * n_queries,
                   ours_per_query_s=ours_s / n_queries, reference_per_query_s=ref_per_query,
                   reference_queries_timed=n_ref, compile_s=compile_s, rows=len(df),
                   max_rel_err_vs_gseapy=err)]
