"""The main job as one config: model -> data -> extract -> train -> evaluate -> interpret -> summary.

A run config is a TOML file with one section per stage; every key is a field of the section's dataclass
below (or of `sae_fast.sae.train.TrainConfig` for `[sae]`), and every default follows Yanovsky &
Chernomoretz [Y]: AIDO.Cell-100M, layer 12, TopK k=32, 8x, Adam lr 1e-3 with cosine annealing, 10 epochs,
batches of 8 whole cells, GO BP enrichment.

    [model]      name, path                      which scFM (sae_fast.load_model)
    [data]       path, counts, max_cells         the cells (an .h5ad or a bundled name)
    [extract]    layer, tokens, mode, dtype      where to read the residual stream, shards or fused
    [sae]        arch, k, expansion, lr, epochs  the SAE and its trainer (TrainConfig)
    [interpret]  gene_sets, gene_filter, ...     GO enrichment, baselines (InterpretConfig), examples
    [run]        out, sae                        the run folder; an already-trained SAE to interpret instead

    result = run_pipeline(load_config("examples/demo.toml"), out="runs/demo")

The run folder holds config.resolved.toml, environment.json, log.jsonl (one JSON object a line: stage starts
and ends with their seconds, and the trainer's per-step metrics), state.json (which stages are done), sae/
(the checkpoint, with the trainer state for an exact resume), shards/ (mode "shards"), tables/, annotated.h5ad
and summary.txt. Every file is written under a temporary name and renamed, and a stage is marked done in
state.json only after all its files exist, so a killed run never leaves output that claims success. Running
the same config on the same folder again skips the stages that are done and resumes the interrupted one
(extraction after its last complete shard, training from its last checkpoint); `force=True` starts fresh.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sae_fast import utils
from sae_fast.config import build, load_toml, option, to_dict
from sae_fast.errors import UserError

STAGES = ["extract", "train", "evaluate", "interpret", "summary"]


@dataclass
class ModelSection:
    """[model]: the single-cell foundation model whose residual stream the SAE reads."""

    name: str = option("aido_cell_100m", "model name for sae_fast.load_model: mini (embedded demo model), "
                       "aido_cell_3m/10m/100m/650m, aido_cell (sizes from the checkpoint's config.json), "
                       "scgpt, geneformer")
    path: str | None = option(None, "checkpoint directory (HF folder for AIDO.Cell / Geneformer; "
                              "best_model.pt + args.json + vocab.json for scGPT); required for every model "
                              "except mini")
    batch_size: int = option(8, "cells per forward pass ([Y]: 8)")


@dataclass
class DataSection:
    """[data]: the cells, as raw counts."""

    path: str = option("pbmc3k", "an .h5ad file, or a bundled data set name (pbmc3k, pbmc_demo, "
                       "pbmc68k_reduced, wu2020_tcells)")
    counts: str = option("X", "where the raw integer counts are: X, raw (adata.raw.X) or a key of "
                         "adata.layers")
    max_cells: int | None = option(None, "use only the first N cells (for quick trials)")


@dataclass
class ExtractSection:
    """[extract]: where the residual stream is read and how the SAE is fed."""

    layer: int = option(12, "output of block L counted from 0, before the final norm ([Y]: 12 of "
                        "AIDO.Cell-100M)")
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


@functools.cache
def _sections() -> dict:
    """Section name -> dataclass. [sae] is the trainer's TrainConfig, [interpret] the InterpretConfig of
    sae_fast.interpret plus the example features of the summary (imported here: they are heavy)."""
    from sae_fast.interpret import InterpretConfig
    from sae_fast.sae.train import TrainConfig

    @dataclass
    class InterpretSection(InterpretConfig):
        """[interpret]: GO enrichment of each feature's top genes, against the same pipeline on baselines."""

        features: list[int] = option(default_factory=list, help="feature indices to show as examples in the "
                                     "summary (empty: the most significant three)")

    return {"model": ModelSection, "data": DataSection, "extract": ExtractSection, "sae": TrainConfig,
            "interpret": InterpretSection, "run": RunSection}


class RunConfig(NamedTuple):
    """A whole run: one dataclass per TOML section."""

    model: ModelSection
    data: DataSection
    extract: ExtractSection
    sae: object  # sae_fast.sae.train.TrainConfig
    interpret: object  # sae_fast.interpret.InterpretConfig + features
    run: RunSection

    def to_dict(self) -> dict:
        return {name: to_dict(section) for name, section in self._asdict().items()}


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
    sections = _sections()
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise UserError(f"{where}: unknown section(s) [{'], ['.join(unknown)}]; valid: "
                        f"[{'], ['.join(sections)}]")
    for name, section in raw.items():
        if not isinstance(section, dict):
            raise UserError(f"{where}: {name} must be a [{name}] section, not a plain key")
    return RunConfig(**{name: build(cls, dict(raw.get(name, {})), where=f"{where} [{name}]")
                        for name, cls in sections.items()})


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


# ------------------------------------------------------------------------------------------------------ input


def read_cells(data: DataSection):
    """The AnnData of [data], with the raw counts in X (the model's `prepare` checks them)."""
    from sae_fast import datasets

    adata = datasets.read(data.path)
    if data.max_cells is not None:
        adata = adata[: data.max_cells].copy()
    if data.counts == "raw":
        if adata.raw is None:
            raise UserError(f"{data.path}: data.counts = 'raw' but the file has no adata.raw")
        adata = adata.raw.to_adata()
    elif data.counts != "X":
        if data.counts not in adata.layers:
            raise UserError(f"{data.path}: data.counts = {data.counts!r} is not a layer of the file; layers: "
                            f"{', '.join(adata.layers) or 'none'} (or use X / raw)")
        adata.X = adata.layers[data.counts]
    return adata


def n_features(train_cfg, d_model: int) -> int:
    """The SAE's dictionary size the trainer will use: n_features, else expansion x d."""
    return int(train_cfg.n_features or train_cfg.expansion * d_model)


def check_features(features, n: int, where: str = "interpret.features") -> None:
    for f in features:
        if not 0 <= f < n:
            raise UserError(f"{where}: feature {f} is out of range: the SAE has features 0..{n - 1}")


def check_sae(sae, model, where: str) -> None:
    d = sae.W_dec.shape[1]
    if d != model.d_model:
        raise UserError(f"{where}: the SAE reads d = {d} but {model.name} has d_model = {model.d_model}; "
                        "train an SAE on this model (remove run.sae) or load the matching model")


# ------------------------------------------------------------------------------------------------- run folder


class RunFolder:
    """A run's folder: state.json (stages done, config), log.jsonl, and the stages' outputs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state_path = self.path / "state.json"
        self.log_path = self.path / "log.jsonl"

    def state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def done(self, stage: str) -> bool:
        return stage in self.state().get("done", {})

    def mark_done(self, stage: str, seconds: float, **info) -> None:
        state = self.state()
        state.setdefault("done", {})[stage] = {"seconds": round(seconds, 3), **info}
        utils.write_json(self.state_path, state)

    def log(self, event: str, **fields) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "event": event, **fields}, default=str) + "\n")

    def open(self, config: RunConfig, force: bool) -> bool:
        """Create the folder, or reopen it for a resume. Returns True when resuming."""
        if force and self.path.exists():
            if any(self.path.iterdir()) and not self.state_path.exists():
                raise UserError(f"{self.path}: not a sae-fast run folder (no state.json); refusing to delete "
                                "it with --force: choose another --out")
            shutil.rmtree(self.path)
        if self.path.exists() and any(self.path.iterdir()):
            if not self.state_path.exists():
                raise UserError(f"{self.path}: exists and is not a sae-fast run folder (no state.json); "
                                "choose another --out")
            old = self.state().get("config")
            new = json.loads(json.dumps(config.to_dict()))
            if old != new:
                diff = [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {v!r}" for s, sec in new.items()
                        for k, v in sec.items() if (old or {}).get(s, {}).get(k) != v]
                raise UserError(f"{self.path}: holds a run of a different config ({'; '.join(diff[:3])}); "
                                "pass --force to start it fresh, or choose another --out")
            resuming = True
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            utils.write_json(self.state_path, {"config": config.to_dict(), "done": {}})
            resuming = False
        if not (self.path / "config.resolved.toml").exists():  # (also after a kill right after state.json)
            with utils.atomic_path(self.path / "config.resolved.toml") as tmp:
                tmp.write_text(to_toml(config))
        if not (self.path / "environment.json").exists():
            utils.write_json(self.path / "environment.json", environment())
        return resuming


def environment() -> dict:
    """The machine and the versions of the libraries that shape the numbers."""
    from importlib import metadata

    env = utils.machine_description()
    versions = {}
    for pkg in ["sae-fast", "torch", "triton", "numpy", "scipy", "numba", "anndata", "scanpy", "gseapy",
                "scikit-learn", "pandas", "safetensors"]:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    env["packages"] = versions
    try:
        import torch

        from sae_fast import ops

        env["ops_backend_cpu"] = ops.backend_for(torch.zeros(1))
    except Exception:  # the environment is informative: a failing probe must not stop the run
        pass
    return env


# ----------------------------------------------------------------------------------------------------- stages


class RunResult(NamedTuple):
    out: Path
    summary: str  # the printed summary table, ending with "finished in N s"
    seconds: float  # this invocation's wall time
    resumed: bool
    skipped: list[str]  # stages already done by an earlier invocation


def _say(msg: str) -> None:
    if utils.VERBOSITY >= 1:
        print(msg, flush=True)


def run_pipeline(config: RunConfig, out: str | Path | None = None, *, force: bool = False,
                 title: str | None = None) -> RunResult:
    """Run (or resume) the whole job of `config` in the folder `out` and return the summary.

    Everything that can be wrong with the input (files, counts, vocabulary, layer, SAE size, feature indices)
    is checked before the run folder is touched."""
    t0 = time.perf_counter()
    from sae_fast import load_model

    out = Path(out or config.run.out or "runs/run")
    # -- load and validate: nothing is written before all of this passes
    model = load_model(config.model.name, path=config.model.path)
    try:
        model.check_layer(config.extract.layer)
    except UserError as e:
        raise UserError(f"extract.layer: {e}") from None
    adata = read_cells(config.data)
    try:  # aligns the genes and checks the counts (finite, non-negative integers) before any forward pass
        alignment = model.prepare(adata, batch_size=config.model.batch_size).alignment
    except UserError as e:
        raise UserError(f"{config.data.path}: {e}") from None
    if utils.VERBOSITY >= 2:
        print(f"{config.data.path}: {alignment.summary()}")
    sae = None
    if config.run.sae is not None:
        from sae_fast import load_sae

        sae = load_sae(config.run.sae)
        check_sae(sae, model, f"run.sae = {config.run.sae}")
        check_features(config.interpret.features, sae.W_dec.shape[0])
    else:
        check_features(config.interpret.features, n_features(config.sae, model.d_model))
    for key in config.interpret.label_keys:
        if key not in adata.obs:
            columns = ", ".join(adata.obs.columns) or "none"
            raise UserError(f"{config.data.path}: obs has no column {key!r} (interpret.label_keys); columns: "
                            f"{columns}")

    folder = RunFolder(out)
    resumed = folder.open(config, force)
    folder.log("resume" if resumed else "start", config=config.to_dict() if not resumed else None,
               cells=adata.n_obs, genes=adata.n_vars, model=model.name)
    _say(f"{'resuming' if resumed else 'starting'} run in {out}: {model.name} layer {config.extract.layer}, "
         f"{adata.n_obs} cells x {adata.n_vars} genes")

    skipped = []
    stages = [s for s in STAGES if not (s == "train" and sae is not None)
              and not (s == "extract" and config.extract.mode == "fused")]
    shards_dir = out / "shards"
    sae_dir = out / "sae"
    summary = ""
    for i, stage in enumerate(stages, 1):
        if stage != "summary" and folder.done(stage):
            skipped.append(stage)
            _say(f"[{i}/{len(stages)}] {stage}: done earlier, skipped")
            continue
        _say(f"[{i}/{len(stages)}] {stage}")
        folder.log("stage_start", stage=stage)
        ts = time.perf_counter()
        info = {}
        if stage == "extract":
            from sae_fast import extract

            extract(model, adata, config.extract.layer, shards_dir, tokens=config.extract.tokens,
                    dtype=config.extract.dtype, resume=True, batch_size=config.model.batch_size)
        elif stage == "train":
            info = _train(config, model, adata, shards_dir, sae_dir, folder)
        elif stage == "evaluate":
            sae = sae if sae is not None else _load_trained(sae_dir)
            info = _evaluate(config, sae, model, adata, shards_dir, folder)
        elif stage == "interpret":
            sae = sae if sae is not None else _load_trained(sae_dir)
            _interpret(config, sae, model, adata, folder)
        else:
            seconds = time.perf_counter() - t0
            summary = compose_summary(folder, config, model, seconds, title=title)
            with utils.atomic_path(out / "summary.txt") as tmp:
                tmp.write_text(summary + "\n")
        seconds = time.perf_counter() - ts
        folder.log("stage_done", stage=stage, seconds=round(seconds, 3), **info)
        folder.mark_done(stage, seconds, **info)
        _say(f"    {stage} took {seconds:.1f} s")
    if config.extract.mode == "shards" and not config.extract.keep_shards and shards_dir.exists():
        shutil.rmtree(shards_dir)
    return RunResult(out, summary, time.perf_counter() - t0, resumed, skipped)


def _train(config: RunConfig, model, adata, shards_dir: Path, sae_dir: Path, folder: RunFolder) -> dict:
    """Train (or resume training) into sae/, then copy the trainer's per-step metrics into log.jsonl."""
    from sae_fast import train_sae
    from sae_fast.sae.checkpoint import save_sae
    from sae_fast.sae.train import LOG

    cfg = dataclasses.replace(config.sae, out_dir=sae_dir)
    sae = train_sae(_token_source(config, model, adata, shards_dir, shuffle=True), config=cfg)
    layer = config.extract.layer
    save_sae(sae, sae_dir, model_name=model.name, hook_name=f"blocks.{layer}.hook_resid_post",
             hook_layer=layer)
    if (sae_dir / LOG).is_file():
        for line in (sae_dir / LOG).read_text().splitlines():
            folder.log("train_step", **json.loads(line))
    return {"n_features": int(sae.W_dec.shape[0]), "d": int(sae.W_dec.shape[1])}


def _load_trained(sae_dir: Path):
    from sae_fast import load_sae

    return load_sae(sae_dir)


def _token_source(config: RunConfig, model, adata, shards_dir: Path, shuffle: bool):
    """The SAE's training / evaluation tokens: the shards (mode shards) or the forward pass (mode fused), in
    batches of `sae.batch_size` tokens ([Y]'s whole-cell batches of `model.batch_size` cells when fused)."""
    cfg = config.sae
    if config.extract.mode == "shards":
        from sae_fast import open_shards

        return open_shards(shards_dir).loader(cfg.batch_size, shuffle=shuffle, seed=cfg.seed)
    from sae_fast.activations.fused import fused_source

    return fused_source(model, adata, config.extract.layer, cfg, tokens=config.extract.tokens,
                        cells_per_batch=config.model.batch_size)


class _Progress:
    """A re-iterable source of [n, d] batches that advances a progress bar by the rows it yields."""

    def __init__(self, source, bar):
        self.source, self.bar = source, bar

    def __iter__(self):
        for x in self.source:
            yield x
            self.bar.update(x.shape[0])


def _evaluate(config: RunConfig, sae, model, adata, shards_dir: Path, folder: RunFolder) -> dict:
    from sae_fast.sae.train import evaluate

    source = _token_source(config, model, adata, shards_dir, shuffle=False)
    total = getattr(source, "n_tokens", None)
    with utils.progress(total=total, desc="evaluate SAE", unit="tok", unit_scale=True) as bar:
        m = evaluate(sae, _Progress(source, bar))
    metrics = {k: float(v) if not isinstance(v, int) else v for k, v in m._asdict().items()}
    utils.write_json(folder.path / "tables" / "sae_metrics.json", metrics)
    return metrics


def _interpret(config: RunConfig, sae, model, adata, folder: RunFolder) -> None:
    from sae_fast.interpret import format_summary, interpret_sae, write_results

    result = interpret_sae(sae, model, adata, config.extract.layer, config=config.interpret)
    write_results(result, folder.path)
    with utils.atomic_path(folder.path / "tables" / "interpret_summary.txt") as tmp:
        tmp.write_text(format_summary(result, features=config.interpret.features or None))


def compose_summary(folder: RunFolder, config: RunConfig, model, seconds: float,
                    title: str | None = None) -> str:
    """The closing table: SAE metrics, the interpretation summary, and `finished in N s`."""
    tables = folder.path / "tables"
    metrics = json.loads((tables / "sae_metrics.json").read_text())
    interp = (tables / "interpret_summary.txt").read_text().rstrip()
    bar = "=" * 78
    lines = [bar, title or f"sae-fast run: {model.name}, layer {config.extract.layer}", bar]
    if config.model.name == "mini":
        lines.append("These numbers come from the embedded demo model `mini` (a small AIDO.Cell-\n"
                     "architecture model pretrained on the bundled cells), not from AIDO.Cell-100M.")
    n_feat = metrics.get("n_features") or folder.state().get("done", {}).get("train", {}).get("n_features")
    lines += ["", "SAE", f"  features            {n_feat}" if n_feat else None,
              f"  FVU                 {metrics['fvu']:.4f}   (fraction of variance unexplained)",
              f"  L0                  {metrics['l0']:.2f}   (active features per token)",
              f"  dead                {100 * metrics['dead_fraction']:.1f} %",
              f"  tokens evaluated    {int(metrics['n_tokens']):,}",
              "", interp, "", f"run folder: {folder.path}", bar, f"finished in {seconds:.0f} s"]
    return "\n".join(line for line in lines if line is not None)
