"""Defaults are what the docs say, and those the docs attribute to a paper are that paper's values."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from sae_fast.config import options_table
from sae_fast.run import load_config, sections

ROOT = Path(__file__).resolve().parents[1]

# [Y]'s setting (SPEC §1-2: AIDO.Cell-100M, layer 12, TopK k=32, 8x, Adam lr 1e-3, 10 epochs, 8 cells per forward
# pass, GO BP, the paper's gene filter and top-gene rule, q < 0.05), which the run's defaults follow.
Y = {"model.name": "aido_cell_100m", "model.batch_size": 8, "data.path": "pbmc3k", "extract.layer": 12,
     "extract.tokens": "all", "extract.mode": "fused", "sae.arch": "topk", "sae.k": 32, "sae.expansion": 8,
     "sae.lr": 1e-3, "sae.epochs": 10, "interpret.gene_sets": "go_bp", "interpret.gene_filter": "paper",
     "interpret.top_rule": "paper", "interpret.alpha": 0.05}
# the one default that is not [Y]'s, and what docs/run.md must say about it
NOT_Y = {"sae.batch_size": (8192, "8,192 tokens, Pedrocchi et al.'s [P] step")}


def defaults() -> dict:
    """SECTION.KEY -> default, for every section (the optional ones of plug-in stages too)."""
    from sae_fast.config import to_dict

    return {f"{name}.{k}": v for name, cls in sections().items() for k, v in to_dict(cls()).items()}


def test_defaults_are_y_except_the_documented_one():
    d = defaults()
    assert {k: d[k] for k in Y} == Y
    run_md = " ".join((ROOT / "docs" / "run.md").read_text().split())
    for key, (value, words) in NOT_Y.items():
        assert d[key] == value
        assert words in run_md and f"`[{key.split('.')[0]}] {key.split('.')[1]}`" in run_md


def _paper_claims(help_text: str):
    """(paper, value) pairs a help text attributes to a paper as the default: '([Y]: 12 ...)',
    '([Y], [P]: 1e-3)', 'topk ([Y])', '(default [P]'s 8192 ...)'."""
    for m in re.finditer(r"\[Y\](?:, \[P\])?: (-?[\d.e+-]+)\b", help_text):
        yield "Y", ast.literal_eval(m.group(1))
    for m in re.finditer(r"(\w+) \(\[Y\]\)", help_text):
        yield "Y", m.group(1)
    for m in re.finditer(r"default \[P\]'s (\d+)", help_text):
        yield "P", int(m.group(1))


def test_every_paper_attribution_in_the_help_is_the_default():
    checked = 0
    for name, cls in sections().items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for paper, value in _paper_claims(f.metadata.get("help", "")):
                key = f"{name}.{f.name}"
                if paper == "Y":
                    assert key not in NOT_Y, f"{key}: the help attributes the default to [Y], the docs do not"
                assert default == value, f"{key}: default {default!r}, but the help says [{paper}]: {value!r}"
                checked += 1
    assert checked >= 8  # layer, batch_size (both), k, expansion, lr, epochs, arch, gene_filter


def test_option_tables_in_the_docs_are_the_code():
    from sae_fast.interpret.pipeline import InterpretConfig
    from sae_fast.sae.train import TrainConfig

    for doc, cls in [("train.md", TrainConfig), ("interpret.md", InterpretConfig)]:
        assert options_table(cls) in (ROOT / "docs" / doc).read_text(), (
            f"docs/{doc}: the options table differs from {cls.__name__}; paste "
            f"sae_fast.config.options_table({cls.__name__}) there")


def _doc_value(text: str):
    text = text.strip().strip("`")
    words = {"none": None, "true": True, "false": False}
    return words[text] if text in words else ast.literal_eval(text)


def test_run_md_tables_give_the_code_defaults():
    """Every `| `key` | default | ... |` row under a `### [section]` heading of docs/run.md."""
    d = defaults()
    section, seen = None, 0
    for line in (ROOT / "docs" / "run.md").read_text().splitlines():
        if m := re.match(r"### `\[(\w+)\]`", line):
            section = m.group(1)
        elif section and (m := re.match(r"\| (`\w+`(?:, `\w+`)*) \| ([^|]+) \|", line)):
            keys = re.findall(r"`(\w+)`", m.group(1))
            values = [m.group(2)] if len(keys) == 1 else m.group(2).split(", ")
            for key, text in zip(keys, values, strict=True):
                assert _doc_value(text) == d[f"{section}.{key}"], f"docs/run.md [{section}] {key}: {text}"
                seen += 1
    assert seen >= 25


def test_aido_example_is_y_setup():
    """examples/aido_cell_100m_pbmc3k.toml is [Y]'s setup, including its step of 8 whole cells."""
    from sae_fast.models.aido_cell import aido_cell_genes

    cfg = load_config(ROOT / "examples" / "aido_cell_100m_pbmc3k.toml")
    flat = {f"{n}.{k}": v for n, s in cfg.to_dict().items() for k, v in s.items()}
    assert {k: flat[k] for k in Y} == Y
    assert cfg.model.batch_size == 8 and cfg.extract.mode == "fused"
    assert cfg.sae.batch_size == 8 * len(aido_cell_genes()) == 154_112


def test_whole_cell_tokens_are_the_vocabulary():
    """A fused whole-cell batch of B cells holds B x (vocabulary size) tokens (no depth tokens), so 8 x 19,264
    is one forward batch of AIDO.Cell: checked on mini, which has AIDO.Cell's architecture."""
    import sae_fast
    from sae_fast import datasets
    from sae_fast.activations.fused import fused_source

    model = sae_fast.load_model("mini")
    adata = datasets.pbmc3k()[:8].copy()
    src = fused_source(model, adata, 1, tokens="all", cells_per_batch=8)
    assert src.n_tokens == 8 * len(model.genes)
