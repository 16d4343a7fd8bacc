"""A run's config: one dataclass per TOML section, read from TOML plus `--set` overrides, checked up front.

The core sections are below ([sae] is the trainer's TrainConfig, [interpret] the InterpretConfig of
sae_fast.interpret plus the summary's example features); every stage that brings its own section (see
sae_fast.run.stages.STAGES) adds it, and such a section is optional: absent from the TOML, it is None in the
RunConfig and its stage is skipped.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from sae_fast.config import build, load_toml, option, to_dict
from sae_fast.errors import UserError

CORE = ("model", "data", "extract", "sae", "interpret", "run")
CONTEXT_HELP = ("the gene context of an AIDO.Cell model: all (every vocabulary gene, as AIDO.Cell and [Y]), "
                "hvg:N (the N most variable of the vocabulary genes that the data measures: scanpy's seurat "
                "flavour on log1p-CP10k; attention then costs (N / G)^2 of the full context's) or a text file of "
                "gene names, one per line")


@dataclass
class ModelSection:
    """[model]: the single-cell foundation model whose residual stream the SAE reads."""

    name: str = option("aido_cell_100m", "model name for sae_fast.load_model: mini (embedded demo model), "
                       "aido_cell_3m/10m/100m/650m, aido_cell (sizes from the checkpoint's config.json), "
                       "scgpt, geneformer")
    path: str | None = option(None, "checkpoint directory (HF folder for AIDO.Cell / Geneformer; "
                              "best_model.pt + args.json + vocab.json for scGPT); None: mini is embedded, "
                              "AIDO.Cell and Geneformer come from the Hugging Face Hub, scGPT needs one")
    batch_size: int = option(8, "cells per forward pass ([Y]: 8)", bounds="[1, inf)")
    device: str = option("auto", "torch device for the model: auto (cuda if available, else cpu), cpu, cuda, "
                         "cuda:1; the SAE trains on sae.device")
    dtype: str = option("auto", "the model's dtype: auto = bfloat16 on CUDA, float32 on the CPU",
                        choices=["auto", "float32", "bfloat16", "float16"])
    context: str = option("all", CONTEXT_HELP)


@dataclass
class DataSection:
    """[data]: the cells, as raw counts."""

    path: str = option("pbmc3k", "an .h5ad file, or a bundled data set name (pbmc3k: the full PBMC3K, [Y]'s "
                       "data; kang2018, pbmc68k_reduced, wu2020_tcells, "
                       "celltypist_sample)")
    counts: str = option("X", "where the raw integer counts are: X, raw (adata.raw.X) or a key of "
                         "adata.layers")
    max_cells: int | None = option(None, "use only the first N cells (for quick trials)", bounds="[1, inf)")
    gene_key: str | None = option(None, "the adata.var column that names the genes (symbols or Ensembl ids); "
                                  "None: var_names, then the usual columns (gene_symbols, feature_name, "
                                  "gene_name, gene_ids, ensembl_id, ...); var_names: var_names alone")
    empty: str = option("error", "cells with no counts over the model's genes (its context's, if restricted), "
                        "which the reference models turn into NaN: error (stop, naming the first) or drop (leave "
                        "them out of every stage, with a warning that counts them)", choices=["error", "drop"])
    holdout: float = option(0.1, "share of the cells held out of SAE training; the summary's FVU, L0 and dead "
                            "% are measured on them (0: on the training cells)", bounds="[0, 1)")
    holdout_seed: int = option(0, "seed of the random choice of held-out cells")


@dataclass
class ExtractSection:
    """[extract]: where the residual stream is read and how the SAE is fed."""

    layer: int = option(12, "output of block L counted from 0, before the final norm ([Y]: 12 of "
                        "AIDO.Cell-100M)", bounds="[0, inf)")
    tokens: str = option("all", "token selection: all, expressed (input value > 0) or sample:N (N tokens per "
                         "cell, as [P] with N=250)")
    mode: str = option("fused", "shards: write memory-mapped activation shards, then train on them "
                       "(re-usable; disk = tokens x d x dtype); fused: train inside the forward pass, no "
                       "disk ([Y]'s batches of whole cells)", choices=["shards", "fused"])
    dtype: str = option("float16", "shard dtype (mode shards)", choices=["float16", "bfloat16", "float32"])
    keep_shards: bool = option(True, "keep shards/ after the run (mode shards); false deletes them at the "
                               "end")


@dataclass
class RunSection:
    """[run]: the run folder, and an optional already-trained SAE."""

    out: str | None = option(None, "run folder (default: runs/<config name>); the CLI's --out overrides it")
    sae: str | None = option(None, "evaluate and interpret this trained SAE folder (sae_fast.load_sae) "
                             "instead of training one")
    threads: int | None = option(None, "CPU threads for torch, BLAS and numba during the run (None: all cores); "
                                 "the float results depend on it, so fix it to compare runs across machines",
                                 bounds="[1, inf)")


@functools.cache
def sections() -> dict:
    """Section name -> dataclass: the core sections, then the optional section of every stage that has one."""
    from sae_fast.interpret import InterpretConfig
    from sae_fast.run.stages import STAGES
    from sae_fast.sae.train import TrainConfig

    @dataclass
    class InterpretSection(InterpretConfig):
        """[interpret]: GO enrichment of each feature's top genes, against the same pipeline on baselines."""

        features: list[int] = option(default_factory=list, help="feature indices to show as examples in the "
                                     "summary (empty: the most significant three)")

    core = {"model": ModelSection, "data": DataSection, "extract": ExtractSection, "sae": TrainConfig,
            "interpret": InterpretSection, "run": RunSection}
    return {**core, **{s.name: s.section for s in STAGES if s.section is not None}}


class RunConfig:
    """A whole run: `config.<section>` is that section's dataclass; an optional section the TOML leaves out is
    None (its stage is skipped)."""

    def __init__(self, values: dict):
        self._values = dict(values)

    def __getattr__(self, name: str):
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        if name in sections():
            return None
        raise AttributeError(f"RunConfig has no section {name!r}")

    def items(self):
        """(name, section) of every section present, core sections first."""
        return [(n, s) for n, s in self._values.items() if s is not None]

    def to_dict(self) -> dict:
        return {name: to_dict(section) for name, section in self.items()}

    def __eq__(self, other) -> bool:
        return isinstance(other, RunConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"RunConfig({self.to_dict()!r})"


def _parse_value(text: str):
    """A --set value: TOML syntax when it parses (numbers, booleans, lists, quoted strings), else a string."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config (TOML), apply `SECTION.KEY=VALUE` overrides; unknown sections or keys are errors."""
    raw = load_toml(path) if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot:
            raise UserError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set sae.epochs=2")
        raw.setdefault(section, {})[field] = _parse_value(value.strip())
    where = str(path) if path is not None else "config"
    known = sections()
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown section(s) [{'], ['.join(unknown)}]; valid: "
                        f"[{'], ['.join(known)}]")
    for name, section in raw.items():
        if not isinstance(section, dict):
            raise UserError(f"{where}: {name} must be a [{name}] section, not a plain key")
    built, errors = {}, []
    for name, cls in known.items():
        if name in CORE or name in raw:
            try:
                built[name] = build(cls, dict(raw.get(name, {})), where=name)
            except UserError as e:
                errors += [f"{where}: {line}" for line in str(e).splitlines()]
    if errors:
        raise UserError("\n".join(errors))
    return RunConfig(built)


def to_toml(config: RunConfig) -> str:
    """The resolved config as TOML (None values, which TOML cannot spell, become comments)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = []
    for name, section in config.to_dict().items():
        lines.append(f"[{name}]")
        for k, v in section.items():
            lines.append(f"# {k} = (none)" if v is None else f"{k} = {value(v)}")
        lines.append("")
    return "\n".join(lines)


def load_model_on(name: str, path: str | None, device: str = "auto", dtype: str = "auto"):
    """sae_fast.load_model, loaded straight onto `device` in `dtype`; "auto" is the one dtype policy of the
    models (sae_fast.models.aido_cell.default_device_dtype): cuda if available, bfloat16 on CUDA, float32 on the
    CPU. So `device = "cpu"` gives float32 on a GPU machine too, unless dtype asks otherwise."""
    import torch

    from sae_fast import load_model

    try:
        device = None if device == "auto" else torch.device(device)
    except RuntimeError as e:
        raise UserError(f"device {device!r}: {e}") from None
    return load_model(name, path=path, device=device, dtype=None if dtype == "auto" else getattr(torch, dtype))


def model_for(config, adata):
    """[model] loaded onto its device (`load_model_on`), reading genes from [data] gene_key, on the gene context
    that [model] context chooses from `adata` (sae_fast.models.genes.context_genes; "all": the whole
    vocabulary)."""
    from sae_fast.models.genes import context_genes

    model = load_model_on(config.model.name, config.model.path, config.model.device, config.model.dtype)
    model.gene_key = config.data.gene_key
    try:
        genes = context_genes(model, adata, config.model.context, gene_key=config.data.gene_key)
    except UserError as e:
        raise UserError(f"model.{e}") from None
    return model if genes is None else model.restrict(genes)


def cells_and_model(config):
    """[data]'s cells and the run's model (`model_for`), checked: returns (adata, model, alignment). The genes
    are aligned and the counts checked here, before any forward pass; cells with no counts over the model's
    genes stop the run ([data] empty = "error") or are dropped here, once, for every stage ("drop")."""
    data = config.data
    adata = read_cells(data.path, data.counts, data.max_cells)
    model = model_for(config, adata)
    try:
        prepared = model.prepare(adata, batch_size=config.model.batch_size, empty=data.empty)
    except UserError as e:
        raise UserError(f"{data.path}: {e}") from None
    if prepared.n_cells < adata.n_obs:
        adata = adata[prepared.rows].copy()
    return adata, model, prepared.alignment


def read_cells(path: str, counts: str = "X", max_cells: int | None = None, *, where: str = "data.counts"):
    """The AnnData at `path` (an .h5ad or a bundled name) with the raw counts in X, taken from X, `raw`
    (adata.raw.X) or a layer; `where` names the option in errors. The model's `prepare` checks the counts."""
    from sae_fast import datasets

    adata = datasets.read(path)
    if max_cells is not None:
        adata = adata[:max_cells].copy()
    if counts == "raw":
        if adata.raw is None:
            raise UserError(f"{path}: {where} = 'raw' but the file has no adata.raw")
        adata = adata.raw.to_adata()
    elif counts != "X":
        if counts not in adata.layers:
            raise UserError(f"{path}: {where} = {counts!r} is not a layer of the file; layers: "
                            f"{', '.join(adata.layers) or 'none'} (or use X / raw)")
        adata.X = adata.layers[counts]
    return adata
