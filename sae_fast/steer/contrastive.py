"""Contrastive steering (SPEC §3, [Y]'s scripts/steering/optimize_steering_vector.py): learn one alpha per
annotated feature that moves source cells (e.g. CD4 T) toward the target cells' mean embedding (CD8 T).

    out = contrast(sae, model, adata, source="CD4 T", target="CD8 T", label="cell_type", layer=12)
    out.closer_fraction, out.closer_fraction_heldout    # share of source cells whose embedding moved closer
    out.alphas                                          # learned alpha per feature (+ its top GO terms by IC)
    out.gap, out.gap_summary                            # per-gene gap table; shares correct up / down, binomial
    out.control                                         # the same with as many randomly chosen features

The recipe ([Y]'s code; the paper differs where noted, both are options):
- alpha is learnable (initialised to 1) only for the annotated features, those with >= 1 significant GO term
  (from an interpretation: an `InterpretResult`, its enrichment / features table, or computed here);
- steered block-L output x' = x + W_dec^T ((alpha - 1) * z) at every token (Scale's delta form);
- loss = mean over a batch of 4 cells of ||e(alpha) - mu_tgt||_2 (`distance="unsquared"`, the code; the paper
  squares it: `"squared"`) + lambda * sum |alpha - 1|; Adam lr 0.01, lambda 1e-3, 100 epochs; after each
  epoch alphas within 1e-4 of 1 are snapped to 1. e = the model's cell embedding, mu_tgt = the mean unsteered
  embedding of the target cells. `objective="expression"`: sum_g |ybar_tgt - ybar_src|_g (yhat_g -
  ybar_tgt,g)^2 on predicted expression instead.

How it is fast: blocks 0..L of the source cells run once; their outputs (and SAE codes) are cached, in memory or
in a folder (`cache=DIR`, memory-mapped), and every optimisation step runs only blocks L+1.. forward and
backward. `checkpointing=True` recomputes each suffix block in the backward pass (torch.utils.checkpoint)
instead of storing its activations, so long contexts (AIDO.Cell's 19,266 tokens) fit.

Evaluation: a share `heldout` of the source cells (default 20%) never enters the optimisation; the closer
fraction is reported for all source cells and for those alone. Gap fraction ([Y]'s analyze_steering_direction):
genes = expressed ∩ cell-type DEGs (Student's t-test, unsteered target vs source predictions, Bonferroni over
the expressed genes) ∩ steering DEGs (paired t-test, steered vs unsteered source, as `deg`); gap_g = (s_g -
src_g) / (tgt_g - src_g) (denominator clamped to 1e-6 in magnitude); correct where sign(s_g - src_g) =
sign(tgt_g - src_g); the share correct among genes up in the target and among genes down, each with a
one-sided binomial test against 0.5; the median gap; the share correct cumulated by effect size |tgt_g -
src_g|. The control learns alphas over as many randomly chosen features with the same recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from sae_fast.config import option
from sae_fast.errors import UserError
from sae_fast.models.base import CellBatch
from sae_fast.ops import SparseCode
from sae_fast.steer.de import deg_table
from sae_fast.steer.interventions import Scale, check_features, encode, scale_delta
from sae_fast.steer.runner import (
    SteerPass,
    data_genes,
    expressed_genes,
    prefixes,
    prepare_sae,
    run_pass,
    validate,
)
from sae_fast.utils import progress


@dataclasses.dataclass
class ContrastConfig:
    """Contrastive steering ([Y]): alpha over the annotated features, learned on cached layer-L activations."""

    objective: str = option("embedding", "embedding ([Y]: distance to the target cells' mean embedding) or "
                            "expression (weighted squared error to the target's mean predicted expression)",
                            choices=("embedding", "expression"))
    distance: str = option("unsquared", "unsquared ([Y]'s code: ||e - mu||) or squared ([Y]'s paper)",
                           choices=("unsquared", "squared"))
    lr: float = option(0.01, "Adam learning rate ([Y]: 0.01)")
    lam: float = option(1e-3, "weight lambda of the L1 penalty sum |alpha - 1| ([Y]: 1e-3)")
    epochs: int = option(100, "optimisation epochs over the training source cells ([Y]: 100)")
    batch_size: int = option(4, "source cells per optimisation step ([Y]: 4)")
    source_cells: int | None = option(None, "use only N of the source cells, drawn at random (seeded); default: "
                                      "all", bounds="[2, inf)")
    heldout: float = option(0.2, "share of source cells never seen by the optimisation (their closer "
                            "fraction is reported apart)")
    snap: float = option(1e-4, "after each epoch, alphas within this distance of 1 are set to 1 ([Y]: 1e-4)")
    threshold: float = option(0.3, "report the features with |alpha - 1| above this ([Y]: 0.3)")
    deg_alpha: float = option(0.05, "family-wise level of the cell-type and steering DEG tests of the gap "
                              "fraction (Bonferroni over the expressed genes, as [Y]'s DEG rule)")
    control: bool = option(True, "also learn alphas over as many randomly chosen features (the control)")
    checkpointing: bool = option(False, "recompute each suffix block in the backward pass "
                                 "(torch.utils.checkpoint): less memory for long contexts")
    cache: str = option("memory", "where the source cells' layer-L outputs are kept: memory, or a folder "
                        "(memory-mapped file)")
    forward_batch: int = option(8, "cells per forward pass when caching and evaluating")
    seed: int = option(0, "seed of the held-out split, the cell order and the control's features")


class ContrastResult(NamedTuple):
    closer_fraction: float  # share of all source cells whose steered embedding is closer to mu_tgt
    closer_fraction_heldout: float  # the same over the held-out source cells only (NaN if none)
    alphas: pd.DataFrame  # feature, alpha, changed (|alpha - 1| > threshold), top_terms (by IC)
    gap: pd.DataFrame  # gene, src, tgt, steered, gap, correct, direction, effect_size, cum_share_correct
    gap_summary: dict  # n / share correct / binomial p up and down, median gap, n_genes
    cells: pd.DataFrame  # cell, dist_pre, dist_post, closer, heldout
    features: pd.DataFrame  # the features with |alpha - 1| > threshold and their top terms by IC
    control: dict  # closer fractions (all, held-out) of the random-feature control, its features
    history: pd.DataFrame  # epoch, loss (main run; control_loss when the control ran)
    summary: dict  # headline numbers and the recipe


# ---------------------------------------------------------------------------------------------- annotation
def annotated_features(annotation) -> tuple[list[int], pd.DataFrame]:
    """(features with >= 1 significant term, their enrichment rows) from an InterpretResult, its enrichment
    table (feature, term, name, q_value, ic) or its features table (feature, n_sig)."""
    enr = pd.DataFrame()
    if hasattr(annotation, "enrichment") and hasattr(annotation, "features"):
        enr = annotation.enrichment
        if "basis" in enr:
            enr = enr[enr["basis"] == "sae"]
        feats = annotation.features
        return sorted(int(f) for f in feats.loc[feats["n_sig"] > 0, "feature"]), enr
    if isinstance(annotation, pd.DataFrame):
        if "term" in annotation and "feature" in annotation:
            enr = annotation[annotation["basis"] == "sae"] if "basis" in annotation else annotation
            return sorted({int(f) for f in enr["feature"]}), enr
        if "n_sig" in annotation and "feature" in annotation:
            return sorted(int(f) for f in annotation.loc[annotation["n_sig"] > 0, "feature"]), enr
    raise UserError("annotation: give an InterpretResult, its enrichment table (feature, term, name, q_value, "
                    "ic) or its features table (feature, n_sig)")


def top_terms_by_ic(enr: pd.DataFrame, feature: int, n: int = 3) -> str:
    if enr is None or enr.empty:
        return ""
    rows = enr[enr["feature"] == feature]
    if "ic" in rows:
        rows = rows.sort_values("ic", ascending=False, kind="stable")
    return "; ".join(f"{r.name} ({r.term})" for r in rows.head(n).itertuples())


# --------------------------------------------------------------------------------------------------- cache
class _Cell(NamedTuple):
    batch: CellBatch  # one cell, trimmed to its real tokens
    start: int  # first token row of this cell in the prefix store
    length: int
    code_idx: torch.Tensor  # [t, k] SAE code of the cached prefix (computed once)
    code_val: torch.Tensor


def _length(one: CellBatch) -> int:
    """Tokens up to the last real one of a one-cell batch (padding comes last)."""
    real = one.mask[0].nonzero()
    return int(real.max()) + 1 if real.numel() else 0


class PrefixCache:
    """Block-L outputs and SAE codes of the source cells, computed once: in memory or memory-mapped."""

    def __init__(self, d: int, where: str = "memory"):
        self.d, self.where, self.cells = d, where, []
        self.rows: list[torch.Tensor] = []
        self.n_rows, self.file, self.mm = 0, None, None
        if where != "memory":
            Path(where).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(where) / "prefix.f32", "wb")  # noqa: SIM115 - closed in finish()

    def add(self, batch: CellBatch, hidden: torch.Tensor, code, cell: int) -> None:
        """One cell: its batch [1, T], block-L output [1, T, d] and SAE code (indices, values), each [t, k]."""
        t = _length(batch)
        one = CellBatch({k: v[:, :t].cpu() for k, v in batch.inputs.items()}, batch.gene_ids[:, :t].cpu(),
                        torch.tensor([cell]), batch.mask[:, :t].cpu(), batch.expression[:, :t].cpu())
        h = hidden[0, :t].float().cpu().clone()  # its own memory: not a view keeping the whole batch alive
        if self.file is not None:
            self.file.write(h.numpy().tobytes())
        else:
            self.rows.append(h)
        self.cells.append(_Cell(one, self.n_rows, t, code[0][:t].cpu().clone(), code[1][:t].cpu().clone()))
        self.n_rows += t

    def finish(self) -> None:
        if self.file is not None:
            self.file.close()
            self.mm = np.memmap(self.file.name, np.float32, "r", shape=(self.n_rows, self.d))

    def collate(self, ids, device) -> tuple[CellBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A padded batch of cached cells: (CellBatch, prefix [B, T, d], code indices, code values)."""
        cells = [self.cells[i] for i in ids]
        T = max(c.length for c in cells)

        def pad(x, value):
            return torch.cat([x, x.new_full((1, T - x.shape[1], *x.shape[2:]), value)], 1) \
                if x.shape[1] < T else x

        b = [c.batch for c in cells]
        batch = CellBatch({k: torch.cat([pad(x.inputs[k], 0) for x in b]) for k in b[0].inputs},
                          torch.cat([pad(x.gene_ids, -1) for x in b]), torch.cat([x.cell_ids for x in b]),
                          torch.cat([pad(x.mask, False) for x in b]), torch.cat([pad(x.expression, 0) for x in b]))
        h = torch.stack([pad(self.hidden_of(i)[None], 0)[0] for i in ids])
        idx = torch.stack([pad(c.code_idx[None], 0)[0] for c in cells])
        val = torch.stack([pad(c.code_val[None], 0)[0] for c in cells])
        return batch.to(device), h.to(device), idx.to(device), val.to(device)

    def hidden_of(self, i: int) -> torch.Tensor:
        c = self.cells[i]
        if self.mm is not None:
            return torch.from_numpy(np.array(self.mm[c.start:c.start + c.length]))
        return self.rows[i]


# ------------------------------------------------------------------------------------- checkpointed suffix
class _Checkpointed(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kw):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, *args, use_reentrant=False, **kw)


def _block_list(model) -> nn.ModuleList:
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == model.n_layers:
            return m
    raise UserError(f"{model.name}: cannot find its list of {model.n_layers} blocks for checkpointing")


@contextlib.contextmanager
def checkpointed_suffix(model, layer: int, enabled: bool = True):
    """Wrap blocks layer+1.. in torch.utils.checkpoint for the duration (restored afterwards)."""
    if not enabled:
        yield
        return
    blocks = _block_list(model)
    saved = list(blocks)
    try:
        for i in range(layer + 1, len(blocks)):
            blocks[i] = _Checkpointed(saved[i])
        yield
    finally:
        for i, b in enumerate(saved):
            blocks[i] = b


@contextlib.contextmanager
def frozen(model):
    """Model parameters without gradient for the duration (their flags restored afterwards)."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


# ------------------------------------------------------------------------------------------------ the job
def _cells_of(adata, label: str, value: str) -> np.ndarray:
    if label not in adata.obs:
        raise UserError(f"label {label!r} is not a column of obs; columns: {', '.join(map(str, adata.obs.columns))}")
    col = adata.obs[label].astype(str).to_numpy()
    idx = np.flatnonzero(col == str(value))
    if idx.size < 2:
        values = ", ".join(pd.unique(col)[:12])
        raise UserError(f"{label} = {value!r} has {idx.size} cell(s); contrastive steering needs at least 2 "
                        f"source and 2 target cells (values: {values})")
    return idx


def _gene_cols(batch: CellBatch, E: int, lut: torch.Tensor):
    gid = batch.gene_ids[:, :E]
    valid = (gid >= 0) & batch.mask[:, :E]
    cols = torch.where(valid, lut[gid.clamp_min(0)], -1)
    return cols


def student_t(n1, m1, m2_1, n2, m2a, m2_2):
    """scipy.stats.ttest_ind (equal variances) from counts, means and m2 of two groups; NaN -> t 0, p 1."""
    from scipy import stats

    n1, n2 = np.asarray(n1, float), np.asarray(n2, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = n1 + n2 - 2
        sp2 = (m2_1 + m2_2) / df
        t = (m1 - m2a) / np.sqrt(sp2 * (1 / n1 + 1 / n2))
        p = 2 * stats.t.sf(np.abs(t), df)
    bad = np.isnan(t) | np.isnan(p)
    return np.where(bad, 0.0, t), np.where(bad, 1.0, p)


def gap_analysis(genes, src, tgt, steered, keep) -> tuple[pd.DataFrame, dict]:
    """The gap table and its summary over the genes `keep` (see the module docstring)."""
    from scipy import stats

    genes = np.asarray(genes, dtype=object)[keep]
    src, tgt, s = (np.asarray(a, float)[keep] for a in (src, tgt, steered))
    denom = tgt - src
    denom = np.where(np.abs(denom) < 1e-6, np.where(denom < 0, -1e-6, 1e-6), denom)
    gap = (s - src) / denom
    correct = np.sign(s - src) == np.sign(tgt - src)
    direction = np.where(tgt > src, "up", "down")
    effect = np.abs(tgt - src)
    df = pd.DataFrame({"gene": genes, "src": src, "tgt": tgt, "steered": s, "gap": gap, "correct": correct,
                       "direction": direction, "effect_size": effect})
    df = df.sort_values("effect_size", ascending=False, kind="stable").reset_index(drop=True)
    df["cum_share_correct"] = np.cumsum(df["correct"]) / np.arange(1, len(df) + 1) if len(df) else []
    summary = {"n_genes": int(len(df)), "median_gap": float(np.median(gap)) if len(df) else math.nan}
    for side in ("up", "down"):
        c = df.loc[df.direction == side, "correct"].to_numpy()
        k, n = int(c.sum()), int(c.size)
        summary[f"n_{side}"] = n
        summary[f"share_correct_{side}"] = k / n if n else math.nan
        summary[f"binom_p_{side}"] = float(stats.binomtest(k, n, 0.5, alternative="greater").pvalue) if n \
            else math.nan
    return df, summary


def closer(pre: np.ndarray, post: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(||pre - c||, ||post - c||, post closer than pre) per cell, in float64."""
    d_pre = np.linalg.norm(pre.astype(np.float64) - centre, axis=1)
    d_post = np.linalg.norm(post.astype(np.float64) - centre, axis=1)
    return d_pre, d_post, d_post < d_pre


class _Problem:
    """The cached source cells, the target statistics and the optimisation, shared by the main run and the
    control."""

    def __init__(self, sae, model, adata, layer, src, tgt, cfg: ContrastConfig):
        self.sae, self.model, self.layer, self.cfg = sae, model, layer, cfg
        self.device = next(model.parameters()).device
        self.genes = data_genes(model, adata)
        index = {g: i for i, g in enumerate(map(str, model.genes))}
        lut = torch.full((len(model.genes),), -1, dtype=torch.long)
        lut[[index[g] for g in self.genes]] = torch.arange(len(self.genes))
        self.lut = lut.to(self.device)
        # target: unsteered embeddings and per-gene predictions (one pass, no edit)
        tp = run_pass(sae, model, adata[tgt], {}, layer, batch_size=cfg.forward_batch, desc="target cells")
        self.target = tp
        self.mu = tp.emb["base"].astype(np.float64).mean(0)
        # source: cache block-L outputs and SAE codes once; the unsteered suffix gives the "pre" numbers
        self.cache = PrefixCache(model.d_model, cfg.cache if cfg.cache == "memory" else
                                 str(Path(cfg.cache)))
        self.source = SteerPass(sae, model, {}, layer, self.genes, 0, len(src))
        bar = progress(total=len(src), desc="cache source cells", unit="cell")
        with torch.inference_mode():
            prepared = model.prepare(adata[src], batch_size=cfg.forward_batch)
            for batch, hidden in prefixes(model, prepared, layer):
                self.source.step(batch, hidden)
                for b in range(hidden.shape[0]):
                    one = CellBatch({k: v[b:b + 1] for k, v in batch.inputs.items()}, batch.gene_ids[b:b + 1],
                                    batch.cell_ids[b:b + 1], batch.mask[b:b + 1], batch.expression[b:b + 1])
                    code = encode(sae, hidden[b, :_length(one)])
                    self.cache.add(one, hidden[b:b + 1], (code.indices, code.values),
                                   int(batch.cell_ids[b]))
                bar.update(hidden.shape[0])
        bar.close()
        self.cache.finish()
        self.ybar_src = torch.as_tensor(self.source.stats["base"].mean, dtype=torch.float32, device=self.device)
        self.ybar_tgt = torch.as_tensor(tp.stats["base"].mean, dtype=torch.float32, device=self.device)
        self.weight = (self.ybar_tgt - self.ybar_src).abs()

    def loss(self, out, batch) -> torch.Tensor:
        cfg = self.cfg
        if cfg.objective == "embedding":
            mu = torch.as_tensor(self.mu, dtype=out.embedding.dtype, device=out.embedding.device)
            dist = (out.embedding - mu).norm(dim=1)
            return (dist ** 2 if cfg.distance == "squared" else dist).mean()
        expression = self.model.require_expression(out, hint="use objective='embedding'")
        cols = _gene_cols(batch, expression.shape[1], self.lut)
        ok = cols >= 0
        c = cols.clamp_min(0)
        err = (expression - self.ybar_tgt[c]) ** 2 * self.weight[c]
        return (err * ok).sum(1).mean()

    def optimise(self, features: list[int], train: np.ndarray, desc: str) -> tuple[np.ndarray, list[float]]:
        cfg, sae = self.cfg, self.sae
        F = int(sae.W_dec.shape[0])
        feats = torch.tensor(features, dtype=torch.long, device=self.device)
        alpha = nn.Parameter(torch.ones(len(features), dtype=sae.W_dec.dtype, device=self.device))
        opt = torch.optim.Adam([alpha], lr=cfg.lr)
        W = sae.W_dec.detach()
        rng = np.random.default_rng(cfg.seed)
        history = []
        bar = progress(total=cfg.epochs * len(train), desc=desc, unit="cell")
        t0 = time.perf_counter()
        with frozen(self.model), frozen(sae), checkpointed_suffix(self.model, self.layer, cfg.checkpointing):
            for _ in range(cfg.epochs):
                order = rng.permutation(train)
                total = 0.0
                for s in range(0, len(order), cfg.batch_size):
                    ids = order[s:s + cfg.batch_size]
                    batch, h, idx, val = self.cache.collate(ids, self.device)
                    full = torch.ones(F, dtype=alpha.dtype, device=self.device).index_put((feats,), alpha)
                    B, T, d = h.shape
                    delta = scale_delta(SparseCode(idx.reshape(B * T, -1), val.reshape(B * T, -1)), full, W,
                                        sae.cfg.backend)
                    out = self.model.forward(batch, layer=self.layer, start=h + delta.view(B, T, d).to(h.dtype))
                    loss = self.loss(out, batch) + cfg.lam * (alpha - 1).abs().sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(ids)
                    bar.update(len(ids))
                    bar.set_postfix_str(f"{bar.n / max(time.perf_counter() - t0, 1e-9):.1f} cells/s")
                with torch.no_grad():
                    alpha[(alpha - 1).abs() < cfg.snap] = 1.0
                history.append(total / max(len(train), 1))
        bar.close()
        return alpha.detach().cpu().numpy().astype(np.float64), history

    def evaluate(self, features: list[int], alphas: np.ndarray) -> SteerPass:
        """Steered and unsteered outputs of every source cell from the cache (no gradient)."""
        iv = Scale(dict(zip(map(int, features), map(float, alphas))))
        p = SteerPass(self.sae, self.model, {"steered": iv}, self.layer, self.genes, 0, len(self.cache.cells),
                      compare=[("steered", "base")])
        n = len(self.cache.cells)
        with torch.inference_mode():
            for s in range(0, n, self.cfg.forward_batch):
                ids = list(range(s, min(n, s + self.cfg.forward_batch)))
                batch, h, _, _ = self.cache.collate(ids, self.device)
                p.step(batch._replace(cell_ids=torch.tensor(ids, device=self.device)), h)
        return p


def contrast(sae, model, adata, source: str, target: str, label: str, layer: int, *, annotation=None,
             features: list[int] | None = None, config: ContrastConfig | None = None, **overrides) -> ContrastResult:
    """Learn alphas that steer `source` cells toward `target` cells (obs[label]); see the module docstring.

    annotation: an InterpretResult (or its enrichment / features table) saying which features have a
    significant GO term; None computes it (interpret_sae on `adata`). features: the learnable features
    directly (overrides annotation). Keyword overrides set ContrastConfig fields (epochs=..., ...)."""
    cfg = dataclasses.replace(config or ContrastConfig(), **overrides)
    if cfg.objective not in ("embedding", "expression") or cfg.distance not in ("unsquared", "squared"):
        raise UserError(f"objective={cfg.objective!r} / distance={cfg.distance!r}: choose embedding or "
                        "expression / unsquared or squared")
    if not 0 <= cfg.heldout < 1:
        raise UserError(f"heldout={cfg.heldout}: give a share in [0, 1)")
    if cfg.source_cells is not None and cfg.source_cells < 2:
        raise UserError(f"source_cells={cfg.source_cells}: give at least 2 (or None for all source cells)")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserError(f"epochs={cfg.epochs}, batch_size={cfg.batch_size}: both must be >= 1")
    src = _cells_of(adata, label, source)
    tgt = _cells_of(adata, label, target)
    if cfg.source_cells is not None and cfg.source_cells < src.size:
        src = np.sort(np.random.default_rng([cfg.seed, 1]).choice(src, cfg.source_cells, replace=False))
    validate(sae, model, layer, [])
    enr = pd.DataFrame()
    if features is None:
        if annotation is None:
            from sae_fast.interpret import interpret_sae

            annotation = interpret_sae(sae, model, adata.copy(), layer, baselines=[], markers="",
                                       gene_filter="code")
        features, enr = annotated_features(annotation)
    else:
        features = sorted({int(f) for f in features})
        if annotation is not None:
            enr = annotated_features(annotation)[1]
    check_features(features, sae, "contrast features")
    if not features:
        raise UserError("contrast: no annotated feature (none has a significant GO term); pass features=...")
    sae = prepare_sae(sae, model)

    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(src.size)
    n_held = min(int(round(cfg.heldout * src.size)), src.size - 1)
    heldout = np.zeros(src.size, bool)
    heldout[perm[:n_held]] = True
    train = np.flatnonzero(~heldout)

    prob = _Problem(sae, model, adata, layer, src, tgt, cfg)
    alphas, history = prob.optimise(features, train, f"contrast {source} -> {target}")
    p = prob.evaluate(features, alphas)
    pre, post = p.emb["base"], p.emb["steered"]
    d_pre, d_post, is_closer = closer(pre, post, prob.mu)
    cells = pd.DataFrame({"cell": adata.obs_names[src].astype(str), "dist_pre": d_pre, "dist_post": d_post,
                          "closer": is_closer, "heldout": heldout})
    frac = float(is_closer.mean())
    frac_held = float(is_closer[heldout].mean()) if heldout.any() else math.nan

    # gap fraction: expressed ∩ cell-type DEGs ∩ steering DEGs
    expressed = expressed_genes(adata, prob.genes)
    sb, tb = p.stats["base"], prob.target.stats["base"]
    _, p_ct = student_t(tb.n, tb.mean, tb.m2, sb.n, sb.mean, sb.m2)
    n_tests = max(int(expressed.sum()), 1)
    celltype_deg = expressed & (p_ct < cfg.deg_alpha / n_tests)
    d = p.diffs[("steered", "base")]
    steer_deg = deg_table(prob.genes, d.n, d.mean, d.m2, expressed, alpha=cfg.deg_alpha,
                          expressed_only=False)["significant"].to_numpy()
    keep = expressed & celltype_deg & steer_deg
    gap, gap_summary = gap_analysis(prob.genes, sb.mean, tb.mean, p.stats["steered"].mean, keep)
    gap_summary.update(n_celltype_degs=int(celltype_deg.sum()), n_steering_degs=int(steer_deg.sum()),
                       n_expressed=int(expressed.sum()))

    table = pd.DataFrame({"feature": features, "alpha": alphas})
    table["changed"] = (table["alpha"] - 1).abs() > cfg.threshold
    table["top_terms"] = [top_terms_by_ic(enr, f) for f in features]
    changed = table[table["changed"]].assign(dev=lambda t: (t.alpha - 1).abs())
    changed = changed.sort_values("dev", ascending=False, kind="stable").drop(columns="dev").reset_index(drop=True)

    control, hist = {}, pd.DataFrame({"epoch": np.arange(1, len(history) + 1), "loss": history})
    if cfg.control:
        F = int(sae.W_dec.shape[0])
        rand = sorted(np.random.default_rng(cfg.seed + 1).choice(F, len(features), replace=False).tolist())
        c_alphas, c_hist = prob.optimise(rand, train, "control (random features)")
        cp = prob.evaluate(rand, c_alphas)
        _, _, c_closer = closer(cp.emb["base"], cp.emb["steered"], prob.mu)
        control = {"closer_fraction": float(c_closer.mean()),
                   "closer_fraction_heldout": float(c_closer[heldout].mean()) if heldout.any() else math.nan,
                   "features": rand, "n_changed": int((np.abs(c_alphas - 1) > cfg.threshold).sum())}
        hist["control_loss"] = c_hist
    summary = {"source": str(source), "target": str(target), "label": label, "layer": int(layer),
               "n_source": int(src.size), "n_target": int(tgt.size), "n_heldout": int(heldout.sum()),
               "n_features": len(features), "n_changed": int(table["changed"].sum()),
               "closer_fraction": frac, "closer_fraction_heldout": frac_held,
               **{f"control_{k}": v for k, v in control.items() if k != "features"},
               **{f"gap_{k}": v for k, v in gap_summary.items()}, **dataclasses.asdict(cfg)}
    return ContrastResult(frac, frac_held, table, gap, gap_summary, cells, changed, control, hist, summary)


__all__ = ["ContrastConfig", "ContrastResult", "annotated_features", "closer", "contrast", "gap_analysis",
           "student_t"]
