"""Pretrain the embedded `mini` model (v2): a small AIDO.Cell on ~17,000 bundled cells (CPU, seeded, resumable).

    python -m sae_fast.models.pretrain_mini              # writes ./mini/ (resumes if stopped): the bundled model
    python -m sae_fast.models.pretrain_mini --out DIR --steps 20 --eval-cells 64     # a quick smoke run

What it is: a *demonstration* model with AIDO.Cell's architecture and code path (binned value embedding, two
depth tokens, pre-LayerNorm SwiGLU blocks, the masked-value head) at AIDO.Cell-3M's shape (6 blocks, H = 128,
4 heads, SwiGLU FFN 320) over a 2,048-gene vocabulary. It is NOT AIDO.Cell-100M and knows nothing beyond its
training cells; use it to try sae-fast end to end (extract, SAE, interpret, steer) on a laptop.

Recipe:
- cells: the union of the bundled PBMC3K (2,700), Kang 2018 (13,576), Wu 2020 T cells (200) and celltypist's
  sample (559) on their shared genes: 17,035 cells; 10% held out, stratified by (data set, cell type,
  condition) and seeded (`split_cells`);
- vocabulary (`choose_genes`): 2,048 genes of AIDO.Cell's 19,264 that every data set measures: the canonical
  immune markers of the bundled marker sets expressed in >= 1% of the cells, then the most variable genes
  (scanpy's `seurat` flavour on log1p-CP10k, per data set), in AIDO.Cell's order;
- objective (AIDO.Cell's masked-value task): replace 30% of the gene values by -1 (mask), predict the
  log1p-CP10k value at the masked positions, mean squared error; AdamW, warm-up then cosine decay over 3,000
  steps (`--restarts` adds warm-restart cycles: one of 1,600 steps at peak 2e-3 from step 3,000 was tried and
  stopped at step 3,900, its held-out gap at 37-38% against about 43% at step 3,000). Each step
  sees a uniform random subset of the genes (at their own positions, plus the depth tokens) of 256, 512 or
  1,024 genes in turn, 8,192 gene tokens a step: attention over a random subset averages like attention over
  all genes, at a fraction of the cost, and the varying size keeps the model from tuning itself to one
  context length; it is evaluated on the full context it runs on afterwards;
- resumable: every `checkpoint_every` steps model + optimizer + scheduler + RNG + data-order position are
  written atomically to OUT/checkpoint/state.pt (and the log to OUT/checkpoint/log.json); rerunning the same
  command continues from there and ends in the same weights as an uninterrupted run;
- evaluation (`masked_value_scores`): on held-out cells, masked-value MSE of the model, of the per-gene-mean
  baseline and of the per-cell-type-mean reference (both means over the training cells), and the fraction of
  the baseline -> reference distance the model closes; written to training_log.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sae_fast.models.aido_cell import MASK_VALUE, N_DEPTH_TOKENS, AIDOCellConfig, random_aido_cell, save_aido_cell
from sae_fast.models.base import CellBatch

DEFAULT_OUT = Path("mini")  # in the working directory: the bundled copy is sae_fast/models/mini/
N_GENES = 2048
MINI_CONFIG = AIDOCellConfig(hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                             intermediate_size=320, max_position_embeddings=N_GENES)
DATASETS = ("pbmc3k", "kang2018", "wu2020_tcells", "celltypist_sample")
UNLABELLED = "unlabelled"


@dataclasses.dataclass
class PretrainSettings:
    """Everything that fixes the training trajectory (a checkpoint refuses to resume under other settings)."""

    steps: int = 3000  # the first cycle: linear warm-up, then cosine decay to 0 at this step
    restarts: tuple[int, ...] = ()  # further cosine cycles (warm restarts), each this many steps long
    restart_lr: float = 2e-3  # the peak learning rate of every further cycle (after its own warm-up)
    tokens_per_step: int = 8192  # gene tokens per step: tokens_per_step // genes cells of `genes` genes each
    genes_per_step: tuple[int, ...] = (256, 512, 1024)  # the gene-subset sizes, taken in turn step by step
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    mask_fraction: float = 0.3
    holdout: float = 0.1
    seed: int = 0
    autocast_bf16: bool = False


# ------------------------------------------------------------------------------------------------ data
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


def pretraining_cells():
    """The union of the bundled PBMC3K, Kang 2018, Wu 2020 and celltypist cells on their shared genes (raw
    counts); obs = the harmonised columns plus `stratum` = data set | cell type | condition."""
    import anndata as ad

    from sae_fast import datasets

    parts = {name: datasets.LOADERS[name]() for name in DATASETS}
    adata = ad.concat(parts, join="inner", merge=None, index_unique=None)
    adata.obs = adata.obs[list(datasets.HARMONISED)].astype("category")
    obs = adata.obs
    adata.obs["stratum"] = (obs["dataset"].astype(str) + "|" + obs["cell_type_fine"].astype(str) + "|"
                            + obs["condition"].astype(str)).astype("category")
    return adata


def choose_genes(adata, n: int = N_GENES, min_fraction: float = 0.01) -> list[str]:
    """Expressed canonical markers, then the most variable genes (per data set); in AIDO.Cell's order."""
    import scanpy as sc

    from sae_fast.models.aido_cell import aido_cell_genes

    order = {g: i for i, g in enumerate(aido_cell_genes())}
    adata = adata[:, [g for g in adata.var_names if g in order]].copy()
    frac = np.asarray((adata.X > 0).mean(0)).ravel()
    expressed = frac >= min_fraction
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sub = adata[:, expressed]
    hvg = sc.pp.highly_variable_genes(sub, flavor="seurat", n_top_genes=n, batch_key="dataset", inplace=False)
    names = np.asarray(sub.var_names)
    # scanpy's own ranking with a batch key: in how many data sets a gene is variable, then dispersion
    rank = np.lexsort((-hvg["dispersions_norm"].fillna(-np.inf).to_numpy(),
                       -hvg["highly_variable_nbatches"].to_numpy()))
    markers = sorted(g for g in names if g in marker_genes())
    chosen = dict.fromkeys(markers[:n])
    for g in names[rank]:
        if len(chosen) == n:
            break
        chosen.setdefault(g, None)
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} genes are expressed in >= {min_fraction:.0%} of the cells; "
                         f"lower min_fraction or n ({n})")
    return sorted(chosen, key=order.__getitem__)


def split_cells(labels: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out cells: round(`frac` x n) of each label's n cells, at least one and at most
    n - 1 (a label's only cell trains); seeded."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    for lab in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        held[idx[: min(len(idx) - 1, max(1, round(frac * len(idx))))]] = True
    return held


def normalised_values(model, adata) -> torch.Tensor:
    """AIDO.Cell's input values [N, G + 2] (log1p-CP10k per vocabulary gene, then the 2 depth tokens)."""
    return torch.cat([b.inputs["values"] for b in model.prepare(adata, batch_size=1024)])


def mask_values(values: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """`values` [N, G + 2] with a seeded random `fraction` of the G gene values replaced by -1."""
    G = values.shape[1] - N_DEPTH_TOKENS
    hide = torch.rand(values.shape[0], G, generator=torch.Generator().manual_seed(seed)) < fraction
    return torch.cat([values[:, :G].masked_fill(hide, MASK_VALUE), values[:, G:]], 1)


# ------------------------------------------------------------------------------------------------ evaluation
class MaskedValueScores(NamedTuple):
    """Masked-value MSE on held-out cells (at the masked positions only)."""

    model_mse: float
    per_gene_mean_mse: float  # baseline: each value predicted by its gene's mean over the training cells
    per_cell_type_mean_mse: float  # reference: its gene's mean over the training cells of the cell's type
    gap_closed: float  # (per_gene_mean_mse - model_mse) / (per_gene_mean_mse - per_cell_type_mean_mse)
    n_cells: int
    n_masked_values: int


def masked_value_scores(pred: np.ndarray, truth: np.ndarray, masked: np.ndarray, train_truth: np.ndarray,
                        train_labels: np.ndarray, labels: np.ndarray) -> MaskedValueScores:
    """Score predictions `pred` [N, G] of the true values `truth` [N, G] where `masked` [N, G] is True, against
    the per-gene mean of `train_truth` [M, G] and the per-label mean of its rows (`train_labels` [M]) for each
    cell's label (`labels` [N]; a label without training cells takes the per-gene mean). float64 sums."""
    masked = np.asarray(masked, bool)
    truth = np.asarray(truth, np.float64)
    train_truth = np.asarray(train_truth, np.float64)
    gene_mean = train_truth.mean(0)
    by_label = {lab: train_truth[train_labels == lab].mean(0) for lab in np.unique(train_labels)}
    type_mean = np.stack([by_label.get(lab, gene_mean) for lab in labels]) if len(labels) else truth

    def mse(p):
        return float(((np.asarray(p, np.float64) - truth)[masked] ** 2).mean())

    model, base, ref = mse(pred), mse(np.broadcast_to(gene_mean, truth.shape)), mse(type_mean)
    return MaskedValueScores(model, base, ref, (base - model) / (base - ref), len(truth), int(masked.sum()))


def _batch(values: torch.Tensor, positions: torch.Tensor | None = None) -> CellBatch:
    B, T = values.shape
    inputs = {"values": values} if positions is None else {"values": values, "positions": positions}
    gene_ids = torch.cat([torch.arange(T - N_DEPTH_TOKENS), torch.full((N_DEPTH_TOKENS,), -1)]).expand(B, -1)
    return CellBatch(inputs, gene_ids, torch.arange(B), torch.ones(B, T, dtype=torch.bool), values)


@torch.no_grad()
def predict(model, values: torch.Tensor, batch_size: int = 8, autocast_bf16: bool = False) -> torch.Tensor:
    """The model's predicted gene values [N, G] for input values [N, G + 2] (full context)."""
    model.eval()
    out = []
    for lo in range(0, len(values), batch_size):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast_bf16):
            out.append(model(_batch(values[lo:lo + batch_size])).expression.float())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------ training
class _Data(NamedTuple):
    genes: list[str]
    train: torch.Tensor  # [M, G + 2] unmasked values of the training cells
    test: torch.Tensor  # [N, G + 2] unmasked values of the held-out cells
    train_labels: np.ndarray  # data set | cell type
    test_labels: np.ndarray
    train_strata: np.ndarray  # data set | cell type | condition
    test_strata: np.ndarray
    test_names: list[str]


def _prepare_data(adata, n_genes: int, settings: PretrainSettings, config: AIDOCellConfig) -> _Data:
    genes = choose_genes(adata, n_genes)
    held = split_cells(adata.obs["stratum"].astype(str).to_numpy(), settings.holdout, settings.seed)
    probe = random_aido_cell(config, genes, device="cpu", dtype=torch.float32)
    values = normalised_values(probe, adata)
    labels = (adata.obs["dataset"].astype(str) + "|" + adata.obs["cell_type_fine"].astype(str)).to_numpy()
    strata = adata.obs["stratum"].astype(str).to_numpy()
    return _Data(genes, values[~held], values[held], labels[~held], labels[held], strata[~held], strata[held],
                 list(map(str, adata.obs_names[held])))


def evaluate(model, data: _Data, settings: PretrainSettings, n_cells: int | None = None) -> dict:
    """Held-out scores on the labelled cells (`n_cells`: the first n held-out cells only) with the per-cell-type
    mean (cell type = the data set's own label) as reference, the same with the stricter per-(cell type,
    condition) mean, and the model / per-gene-mean MSE over all held-out cells (unlabelled included)."""
    test, labels, strata = data.test[:n_cells], data.test_labels[:n_cells], data.test_strata[:n_cells]
    masked_in = mask_values(test, settings.mask_fraction, settings.seed + 1)
    G = test.shape[1] - N_DEPTH_TOKENS
    pred = predict(model, masked_in, autocast_bf16=settings.autocast_bf16).numpy()
    truth, masked, train = test[:, :G].numpy(), (masked_in[:, :G] == MASK_VALUE).numpy(), data.train[:, :G].numpy()
    lab = np.array([not x.endswith("|" + UNLABELLED) for x in labels])
    tlab = np.array([not x.endswith("|" + UNLABELLED) for x in data.train_labels])
    args = pred[lab], truth[lab], masked[lab], train[tlab]
    scores = masked_value_scores(*args, data.train_labels[tlab], labels[lab])
    strict = masked_value_scores(*args, data.train_strata[tlab], strata[lab])
    everyone = masked_value_scores(pred, truth, masked, train, data.train_labels, labels)
    return {**{f"labelled_{k}": v for k, v in scores._asdict().items()},
            "labelled_per_cell_type_condition_mean_mse": strict.per_cell_type_mean_mse,
            "labelled_gap_closed_vs_cell_type_condition_mean": strict.gap_closed,
            "all_model_mse": everyone.model_mse, "all_per_gene_mean_mse": everyone.per_gene_mean_mse,
            "all_n_cells": everyone.n_cells}


def total_steps(settings: PretrainSettings) -> int:
    return settings.steps + sum(settings.restarts)


def _lr_lambda(settings: PretrainSettings):
    """Step -> learning-rate factor: warm-up + cosine over `steps`, then one such cycle per `restarts` entry,
    peaking at restart_lr (SGDR-style warm restarts)."""
    def f(s):
        length, peak = settings.steps, 1.0
        for cycle in settings.restarts:
            if s < length:
                break
            s, length, peak = s - length, cycle, settings.restart_lr / settings.lr
        return peak * min(1.0, (s + 1) / settings.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / length)))
    return f


def pretrain(out: Path = DEFAULT_OUT, settings: PretrainSettings | None = None, *, adata=None,
             n_genes: int = N_GENES, config: AIDOCellConfig = MINI_CONFIG, checkpoint_every: int = 250,
             eval_every: int = 1000, eval_cells: int = 256, stop_after: int | None = None,
             threads: int = 1) -> dict | None:
    """Train (or resume) the mini model; write config.json, model.safetensors, genes.tsv, training_log.json
    to `out` at the end. `adata` defaults to `pretraining_cells()` (it needs obs `stratum`, `dataset`,
    `cell_type_fine`). `stop_after` = stop (after a checkpoint) once this many steps are done: a simulated
    interruption. Returns the log, or None when stopped early."""
    from sae_fast.utils import atomic_path, progress, write_json

    s = settings or PretrainSettings()
    torch.set_num_threads(threads)
    config = dataclasses.replace(config, max_position_embeddings=n_genes)
    data = _prepare_data(pretraining_cells() if adata is None else adata, n_genes, s, config)
    model = random_aido_cell(config, data.genes, seed=s.seed, device="cpu", dtype=torch.float32)
    G = n_genes
    with torch.no_grad():
        model.cls.predictions.bias.fill_(float(data.train[:, :G].mean()))  # start the head at the mean value
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s))
    gen = torch.Generator().manual_seed(s.seed)
    state = {"step": 0, "order": torch.randperm(len(data.train), generator=gen), "pos": 0, "history": [],
             "train_seconds": 0.0}
    ckpt_dir = Path(out) / "checkpoint"
    ckpt = ckpt_dir / "state.pt"
    meta = {"settings": dataclasses.asdict(s), "config": config.to_dict(), "genes": data.genes}
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        if saved["meta"] != meta:
            raise ValueError(f"{ckpt}: a checkpoint of other settings/genes; delete {ckpt_dir} to start afresh")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        gen.set_state(saved["gen"])
        state = saved["state"]

    def checkpoint():
        with atomic_path(ckpt) as tmp:
            torch.save({"meta": meta, "model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "gen": gen.get_state(), "state": state}, tmp)
        write_json(ckpt_dir / "log.json", {"steps_done": state["step"], "train_seconds": state["train_seconds"],
                                            "settings": meta["settings"], "history": state["history"]})

    steps = total_steps(s)
    bar = progress(total=steps * s.tokens_per_step, desc="pretrain mini", unit="tok", unit_scale=True,
                   initial=state["step"] * s.tokens_per_step)
    t0 = time.perf_counter() - state["train_seconds"]
    while state["step"] < steps:
        step = state["step"]
        model.train()
        n_sub = min(G, s.genes_per_step[step % len(s.genes_per_step)])
        n_cells = max(1, s.tokens_per_step // n_sub)
        if state["pos"] + n_cells > len(state["order"]):
            state["order"], state["pos"] = torch.randperm(len(data.train), generator=gen), 0
        idx = state["order"][state["pos"]:state["pos"] + n_cells]
        state["pos"] += n_cells
        subset = torch.randperm(G, generator=gen)[:n_sub].sort().values
        rows = data.train[idx]
        truth = rows[:, subset]
        hide = torch.rand(truth.shape, generator=gen) < s.mask_fraction
        values = torch.cat([truth.masked_fill(hide, MASK_VALUE), rows[:, G:]], 1)
        positions = torch.cat([subset, torch.arange(G, G + N_DEPTH_TOKENS)]).expand(len(idx), -1)
        with torch.autocast("cpu", torch.bfloat16, enabled=s.autocast_bf16):
            pred = model(_batch(values, positions)).expression.float()
        loss = ((pred[:, :n_sub] - truth)[hide] ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(n_cells * n_sub)
        state["step"] = step + 1
        state["train_seconds"] = time.perf_counter() - t0
        if step % 50 == 0 or step == steps - 1:
            row = {"step": step, "train_loss": loss.item(), "lr": sched.get_last_lr()[0],
                   "elapsed_s": round(state["train_seconds"], 1)}
            if eval_every and (step % eval_every == 0 and step > 0):
                row.update({f"heldout{eval_cells}_{k}": v for k, v in evaluate(model, data, s, eval_cells).items()})
                t0 = time.perf_counter() - state["train_seconds"]  # evaluation time is not training time
            state["history"].append(row)
            bar.write(json.dumps(row))
        if state["step"] % checkpoint_every == 0 or state["step"] == steps:
            checkpoint()
            if stop_after is not None and state["step"] >= stop_after and state["step"] < steps:
                bar.close()
                return None
    bar.close()
    final = evaluate(model, data, s)
    log = {
        "what": "sae-fast's embedded demo model: AIDO.Cell architecture at toy size, NOT AIDO.Cell-100M",
        "data": "the bundled PBMC3K (2,700), Kang 2018 (13,576), Wu 2020 T cells (200), celltypist sample (559)"
        if adata is None else f"{adata.n_obs} cells given to pretrain()",
        "n_train_cells": len(data.train), "n_heldout_cells": len(data.test), "heldout_cells": data.test_names,
        "objective": f"masked-value MSE on log1p(CP10k), {s.mask_fraction:.0%} of gene values masked with -1",
        "settings": meta["settings"],
        "optimizer": "AdamW, linear warm-up then cosine decay (then warm restarts, if any), grad-norm clip 1",
        "threads": threads, "eval_mask_seed": s.seed + 1,
        "heldout": final, "train_seconds": round(state["train_seconds"], 1), "torch": torch.__version__,
        "history": state["history"],
    }
    save_aido_cell(model, out, extra_files={"training_log.json": json.dumps(log, indent=2) + "\n"})
    return log


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output folder (default: ./mini; the bundled model is sae_fast/models/mini/)")
    for f in dataclasses.fields(PretrainSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=f.default)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, type=lambda v: tuple(int(x) for x in v.split(",")), default=f.default,
                           help=f"comma-separated (default: {','.join(map(str, f.default))})")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f"(default: {f.default})")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default: 250)")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between held-out evaluations")
    p.add_argument("--eval-cells", type=int, default=256, help="held-out cells in the periodic evaluations")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resume later)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    settings = PretrainSettings(**{f.name: getattr(a, f.name) for f in dataclasses.fields(PretrainSettings)})
    log = pretrain(a.out, settings, checkpoint_every=a.checkpoint_every, eval_every=a.eval_every,
                   eval_cells=a.eval_cells, stop_after=a.stop_after, threads=a.threads)
    if log is None:
        print(f"stopped after {a.stop_after} steps; rerun the same command to resume")
        return
    h = log["heldout"]
    print(f"held-out masked-value MSE {h['labelled_model_mse']:.4f}; per-gene mean "
          f"{h['labelled_per_gene_mean_mse']:.4f}; per-cell-type mean {h['labelled_per_cell_type_mean_mse']:.4f}; "
          f"gap closed {h['labelled_gap_closed']:.1%}; wrote {a.out}")


if __name__ == "__main__":
    main()
