"""Pretrain the embedded `mini` model: a small AIDO.Cell on the bundled demo cells (CPU, seeded).

    python -m sae_fast.models.pretrain_mini            # writes sae_fast/models/mini/ (~8 min, 1 CPU thread)
    python -m sae_fast.models.pretrain_mini --out DIR --steps 20     # a quick smoke run elsewhere

What it is: a *demonstration* model with AIDO.Cell's architecture and code path (4 blocks, H = 128, 4 heads,
SwiGLU FFN 320, LayerNorm, 1,026 tokens) trained on only ~320 cells. It is NOT AIDO.Cell-100M and knows
nothing beyond these cells; use it to try sae-fast end to end (extract, SAE, interpret, steer) on a laptop.

Recipe:
- vocabulary: 1,024 genes of `sae_fast.datasets.pbmc_demo()` that are also in AIDO.Cell's 19,264-gene list
  (kept in that list's order): the immune marker genes of the bundled marker sets that >= 2% of the cells
  express, the 512 most expressed genes, then the most variable genes (scanpy's `seurat` flavour on
  log1p-CP10k) among genes expressed in >= 5% of the cells;
- cells: pbmc_demo (160 PBMC3K cells + 200 Wu 2020 T cells); 10% held out, stratified by cell type;
- objective (AIDO.Cell's masked-value task): replace 30% of the gene values by -1 (mask), predict the
  log1p-CP10k value at the masked positions, mean squared error; AdamW (lr 2e-3), warm-up then cosine
  decay, 1,000 steps of 8 cells; each step sees a uniform random subset of 384 of the genes (at their own
  positions, plus the depth tokens), 4x cheaper than the full context the model runs on afterwards;
- evaluation: held-out masked-value MSE (fixed mask seed) against the per-gene-mean baseline (each masked
  value predicted by its gene's mean over the training cells); both numbers go into training_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from sae_fast.models.aido_cell import MASK_VALUE, AIDOCellConfig, random_aido_cell, save_aido_cell
from sae_fast.models.base import CellBatch

MINI_DIR = Path(__file__).parent / "mini"
N_GENES = 1024
MINI_CONFIG = AIDOCellConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=320, max_position_embeddings=N_GENES)


def marker_genes() -> set[str]:
    """Positive markers of the bundled immune cell-type marker sets (pegasuspy's, BSD-3)."""
    from sae_fast.datasets import data_path

    genes: set[str] = set()

    def walk(node):
        for ct in node.get("cell_types", []):
            for m in ct.get("markers", []):
                genes.update(g[:-1] for g in m["genes"] if g.endswith("+"))
            walk(ct.get("subtypes", {}))

    walk(json.loads(data_path("human_immune_cell_markers.json").read_text()))
    for line in data_path("human_t_cell_markers.gmt").read_text().splitlines():
        genes.update(line.split("\t")[2:])
    return genes


def choose_genes(adata, n: int = N_GENES) -> list[str]:
    """Expressed markers, then the most expressed, then the most variable genes; in AIDO.Cell's order."""
    import scanpy as sc

    from sae_fast.models.aido_cell import aido_cell_genes

    order = {g: i for i, g in enumerate(aido_cell_genes())}
    adata = adata[:, [g for g in adata.var_names if g in order]].copy()
    frac = np.asarray((adata.X > 0).mean(0)).ravel()
    expressed = frac >= 0.05
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    hvg = sc.pp.highly_variable_genes(adata[:, expressed], flavor="seurat", n_top_genes=n, inplace=False)
    names = np.asarray(adata.var_names)
    mean = np.asarray(adata.X.mean(0)).ravel()
    markers = [g for g in names[frac >= 0.02] if g in marker_genes()]
    by_dispersion = list(names[expressed][np.argsort(-hvg["dispersions_norm"].fillna(-np.inf).to_numpy(),
                                                     kind="stable")])
    by_mean = list(names[np.argsort(-mean, kind="stable")])
    chosen: dict[str, None] = {}
    for g in markers + by_mean[: n // 2] + by_dispersion + by_mean:
        if len(chosen) == n:
            break
        chosen.setdefault(g, None)
    return sorted(chosen, key=order.__getitem__)


def split_cells(labels: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out cells: `frac` of each label (at least one), seeded."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    for lab in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        held[idx[: max(1, round(frac * len(idx)))]] = True
    return held


def masked_values(model, adata, mask_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All cells' (masked input values [N, G+2], true values [N, G])."""
    batches = list(model.prepare(adata, batch_size=64, mask_fraction=mask_fraction, seed=seed))
    values = torch.cat([b.inputs["values"] for b in batches])
    truth = torch.cat([b.expression for b in batches])[:, : len(model.genes)]
    return values, truth


def _batch(values: torch.Tensor, cell_ids: torch.Tensor) -> CellBatch:
    B, T = values.shape
    gene_ids = torch.cat([torch.arange(T - 2), torch.full((2,), -1)]).expand(B, -1)
    return CellBatch({"values": values}, gene_ids, cell_ids, torch.ones(B, T, dtype=torch.bool), values)


@torch.no_grad()
def evaluate(model, values: torch.Tensor, truth: torch.Tensor, gene_mean: torch.Tensor) -> dict:
    """Masked-value MSE of the model and of the per-gene-mean baseline, at the masked positions only."""
    model.eval()
    preds = []
    for lo in range(0, len(values), 16):
        v = values[lo:lo + 16]
        preds.append(model(_batch(v, torch.arange(len(v)))).expression)
    pred = torch.cat(preds)
    masked = values[:, : truth.shape[1]] == MASK_VALUE
    model_mse = float(((pred - truth)[masked] ** 2).mean())
    base_mse = float(((gene_mean.expand_as(truth) - truth)[masked] ** 2).mean())
    return {"model_mse": model_mse, "baseline_mse": base_mse, "n_masked_values": int(masked.sum())}


def pretrain(out: Path = MINI_DIR, *, steps: int = 1000, batch_size: int = 8, lr: float = 2e-3,
             warmup: int = 50, mask_fraction: float = 0.3, genes_per_step: int = 384, holdout: float = 0.1,
             seed: int = 0, threads: int = 1) -> dict:
    """Train the mini model; write config.json, model.safetensors, genes.tsv, training_log.json to `out`."""
    from sae_fast.datasets import pbmc_demo
    from sae_fast.utils import progress

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    adata = pbmc_demo()
    genes = choose_genes(adata)
    held = split_cells(adata.obs["cell_type_fine"].astype(str).to_numpy(), holdout, seed)
    model = random_aido_cell(MINI_CONFIG, genes, seed=seed, device="cpu", dtype=torch.float32)
    train_ad, test_ad = adata[~held], adata[held]
    train_values, full = masked_values(model, train_ad, 0.0, seed)  # re-masked at every step below
    depth, gene_mean = train_values[:, -2:], full.mean(0, keepdim=True)
    test_values, test_truth = masked_values(model, test_ad, mask_fraction, seed + 1)
    with torch.no_grad():
        model.cls.predictions.bias.fill_(float(full.mean()))  # start the head at the mean training value

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    history, t0, order, pos = [], time.perf_counter(), torch.randperm(len(full), generator=gen), 0
    G, n_tok = len(genes), genes_per_step + 2
    bar = progress(total=steps * batch_size * n_tok, desc="pretrain mini", unit="tok", unit_scale=True)
    for step in range(steps):
        model.train()
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(full), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        # A uniform random subset of the genes (plus the depth tokens) at their own positions: attention
        # over a random subset averages like attention over all genes, at a fraction of the cost.
        subset = torch.randperm(G, generator=gen)[:genes_per_step].sort().values
        truth = full[idx][:, subset]
        hide = torch.rand(truth.shape, generator=gen) < mask_fraction
        values = torch.cat([truth.masked_fill(hide, MASK_VALUE), depth[idx]], 1)
        positions = torch.cat([subset, torch.arange(G, G + 2)]).expand(len(idx), -1)
        batch = _batch(values, idx)
        pred = model(batch._replace(inputs={"values": values, "positions": positions})).expression
        loss = ((pred[:, :genes_per_step] - truth)[hide] ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(batch_size * n_tok)
        if step % 50 == 0 or step == steps - 1:
            row = {"step": step, "train_loss": loss.item(), "lr": sched.get_last_lr()[0],
                   "elapsed_s": round(time.perf_counter() - t0, 1)}
            if step % 200 == 0 or step == steps - 1:
                heldout = evaluate(model, test_values, test_truth, gene_mean)
                row.update({f"heldout_{k}": v for k, v in heldout.items()})
            history.append(row)
            bar.write(json.dumps(row))
    bar.close()
    final = evaluate(model, test_values, test_truth, gene_mean)
    log = {
        "what": "sae-fast's embedded demo model: AIDO.Cell architecture at toy size, NOT AIDO.Cell-100M",
        "data": "sae_fast.datasets.pbmc_demo(): 160 PBMC3K cells (10x 3' v1) + 200 Wu 2020 T cells (10x 5')",
        "n_train_cells": int((~held).sum()), "n_heldout_cells": int(held.sum()),
        "heldout_cells": list(map(str, adata.obs_names[held])),
        "objective": f"masked-value MSE on log1p(CP10k), {mask_fraction:.0%} of gene values masked with -1",
        "settings": {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "seed": seed,
                     "mask_fraction": mask_fraction, "genes_per_step": genes_per_step,
                     "optimizer": "AdamW(wd=0.01), cosine decay",
                     "threads": threads},
        "heldout_masked_mse": final["model_mse"], "heldout_baseline_per_gene_mean_mse": final["baseline_mse"],
        "heldout_n_masked_values": final["n_masked_values"], "eval_mask_seed": seed + 1,
        "train_seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__, "history": history,
    }
    save_aido_cell(model, out, extra_files={"training_log.json": json.dumps(log, indent=2) + "\n"})
    return log


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=MINI_DIR, help="output folder (default: the package's mini/)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps of 8 cells (default: 1000)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    log = pretrain(a.out, steps=a.steps, seed=a.seed)
    print(f"held-out masked-value MSE {log['heldout_masked_mse']:.4f} vs per-gene-mean baseline "
          f"{log['heldout_baseline_per_gene_mean_mse']:.4f}; wrote {a.out}")


if __name__ == "__main__":
    main()
