"""scGPT (Cui et al. 2024, bowang-lab) behind the ScFM interface.

    model = load_scgpt("scGPT_human/")            # best_model.pt + args.json + vocab.json
    for batch in model.prepare(adata):  # gene symbols in adata.var_names; counts or any non-negative X
        out = model.forward(batch, layer=10, stop=True)

What the model sees (scGPT's own zero-shot embedding path, `scgpt.tasks.get_batch_cell_embeddings`):
- genes: the cell's non-zero genes that are in vocab.json (matched by symbol), `<cls>` first. Cells with more
  than max_seq_len - 1 such genes keep a seeded random sample of them (scGPT samples too; we keep vocabulary
  order, which changes nothing: scGPT has no position embeddings). Batches are padded with `<pad>` / pad_value
  (-2).
- values: per-cell quantile binning of the non-zero values into 1..n_bins-1 (0 stays 0), exactly scGPT's
  `preprocess.binning` rule: edges = quantiles of the cell's non-zero values at linspace(0, 1, n_bins-1); a
  value that equals one or more edges is spread uniformly over the tied bins with a random draw. The binning
  runs over all non-zero genes of the cell before sampling, as scGPT's collator does. It is invariant to
  per-cell scaling and to log1p, so raw counts and normalised data give the same tokens. `<cls>` carries
  pad_value, as in scGPT's embedding code (its fine-tuning tokenizer uses 0 instead: `cls_value=0`).
- architecture: token embedding + LayerNorm, plus a value encoder (clamp at 512 -> Linear(1,d) -> ReLU ->
  Linear -> LayerNorm); no positions; torch TransformerEncoderLayers (post-norm, ReLU; pre-norm if args.json
  says pre_norm); dropout ignored at inference.

Outputs: `layer=L` is the output of `transformer_encoder.layers[L]` (after norm2, post-norm), [P]'s hook
point. `expression` is the expression decoder (`decoder.fc`) prediction at each gene token: a binned value, 0
at <cls> and padding. `embedding` is the <cls> output (scGPT's rule; not L2-normalised, scGPT's embed_data
normalises it afterwards), or with `embedding="mean"` the mean over gene tokens ([P]'s mean pooling; padding
and <cls> excluded).

Needs the real checkpoint (e.g. scGPT_human, whole-human: d_model 512, 12 layers, 8 heads, FFN 512, n_bins 51)
for science; `random_init_config` builds random weights for tests and benchmarks only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sae_fast.config import option
from sae_fast.errors import CheckpointError, UserError
from sae_fast.models.aido_cell import default_device_dtype
from sae_fast.models.base import CellBatch, Hook, ModelOutput, PreparedData, ScFM
from sae_fast.models.checkpoint import check_state_dict, load_weights_only
from sae_fast.models.genes import count_rows, match_genes

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>", "<mask>")
# Heads of the official checkpoints that inference does not use: loaded without error, reported in
# `model.ignored_keys`. (decoder.zero_logit belongs to explicit_zero_prob models; we return the plain
# prediction.)
IGNORED_PREFIXES = ("mvc_decoder.", "cls_decoder.", "flag_encoder.", "grad_reverse_discriminator.",
                    "decoder.zero_logit.")


@dataclass
class ScGPTConfig:
    """scGPT architecture and tokenisation: the fields of its args.json that inference needs."""

    d_model: int = option(512, "embedding size (args.json 'embsize')")
    n_heads: int = option(8, "attention heads (args.json 'nheads')")
    d_ff: int = option(512, "feed-forward width (args.json 'd_hid')")
    n_layers: int = option(12, "transformer layers (args.json 'nlayers')")
    n_bins: int = option(51, "expression bins including bin 0 for zeros (args.json 'n_bins')")
    pad_token: str = option("<pad>", "padding token in vocab.json")
    pad_value: float = option(-2.0, "input value at padding (and at <cls>)")
    max_seq_len: int = option(1200, "tokens per cell including <cls>; cells with more genes are subsampled")
    pre_norm: bool = option(False, "pre-LayerNorm blocks (the released models are post-norm)")

    # args.json name -> field; the first four are required.
    ARGS = {"embsize": "d_model", "nheads": "n_heads", "d_hid": "d_ff", "nlayers": "n_layers",
            "n_bins": "n_bins", "pad_token": "pad_token", "pad_value": "pad_value",
            "max_seq_len": "max_seq_len", "pre_norm": "pre_norm"}

    @classmethod
    def from_args(cls, args: dict, where: str = "args.json") -> ScGPTConfig:
        """Read scGPT's args.json dict; a missing size or an unsupported option is a UserError naming it."""
        if "nheads" not in args and "nhead" in args:  # some scGPT scripts spell it 'nhead'
            args = {**args, "nheads": args["nhead"]}
        for key in ("embsize", "nheads", "d_hid", "nlayers"):
            if key not in args:
                raise UserError(f"{where}: missing key {key!r}; scGPT's args.json lists the model sizes "
                                "(embsize, nheads, d_hid, nlayers)")
        style = args.get("input_emb_style", "continuous")
        if style != "continuous":
            raise UserError(f"{where}: input_emb_style = {style!r} is not supported; only the released "
                            "'continuous' value encoder is")
        return cls(**{field: args[key] for key, field in cls.ARGS.items() if key in args})


def bin_values(x: np.ndarray, n_bins: int, rng) -> np.ndarray:
    """scGPT's binning of one cell's non-zero values `x` into 1..n_bins-1 (`rng.random` breaks ties).

    Edges are the quantiles of x at linspace(0, 1, n_bins - 1). A value strictly between edges gets the bin
    above the edges below it; a value equal to k tied edges gets one of those k bins uniformly at random
    (scGPT's `_digitize(side="both")`). One draw per value is always consumed, as in scGPT."""
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(x, edges)
    right = np.digitize(x, edges, right=True)
    return np.ceil(rng.random(len(x)) * (right - left) + left).astype(np.int64)


class _GeneEncoder(nn.Module):
    def __init__(self, n_tokens: int, d: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d)
        self.enc_norm = nn.LayerNorm(d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(tokens))


class _ValueEncoder(nn.Module):
    """scGPT's ContinuousValueEncoder: clamp(max=512) -> Linear(1, d) -> ReLU -> Linear(d, d) -> LayerNorm."""

    def __init__(self, d: int, max_value: float = 512.0):
        super().__init__()
        self.linear1 = nn.Linear(1, d)
        self.linear2 = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.unsqueeze(-1).clamp(max=self.max_value)
        return self.norm(self.linear2(torch.relu(self.linear1(x))))


class _ExprDecoder(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(),
                                nn.Linear(d, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h).squeeze(-1)


class ScGPT(ScFM):
    """scGPT's TransformerModel for inference, with parameter names equal to the official state dict."""

    name = "scgpt"

    def __init__(self, cfg: ScGPTConfig, vocab: dict[str, int], *, embedding: str = "cls",
                 cls_value: float | None = None):
        super().__init__()
        if embedding not in ("cls", "mean"):
            raise UserError(f"embedding = {embedding!r}; choose 'cls' (scGPT's rule) or 'mean' ([P]'s)")
        for tok in (cfg.pad_token, "<cls>"):
            if tok not in vocab:
                raise UserError(f"vocab.json has no {tok!r} token; scGPT vocabularies end with <pad>, <cls>, "
                                "<eoc>")
        self.cfg = cfg
        self.embedding_rule = embedding
        self.cls_value = cfg.pad_value if cls_value is None else float(cls_value)
        self.n_layers, self.d_model = cfg.n_layers, cfg.d_model
        gene_items = sorted((i, g) for g, i in vocab.items() if g not in SPECIAL_TOKENS)
        self.genes = [g for _, g in gene_items]
        self._gene_token = np.array([i for i, _ in gene_items], dtype=np.int64)  # model.genes index -> token
        self.pad_id, self.cls_id = vocab[cfg.pad_token], vocab["<cls>"]
        self.ignored_keys: list[str] = []

        n_tokens = max(vocab.values()) + 1
        self.encoder = _GeneEncoder(n_tokens, cfg.d_model)
        self.value_encoder = _ValueEncoder(cfg.d_model)
        self.transformer_encoder = nn.Module()
        self.transformer_encoder.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=0.0, activation="relu",
                                       batch_first=True, norm_first=cfg.pre_norm)
            for _ in range(cfg.n_layers))
        self.decoder = _ExprDecoder(cfg.d_model)
        self.eval()

    # ------------------------------------------------------------------ tokenisation
    def prepare(self, adata, batch_size: int = 8, *, seed: int = 0, layer: str | None = None,
                gene_key: str | None = None, max_seq_len: int | None = None, empty: str = "error") -> PreparedData:
        """Tokenise `adata` for scGPT: a re-iterable stream of CellBatch (inputs 'genes' and 'values').

        Genes are matched by symbol: adata.var_names, or the adata.var column `gene_key`, or a symbol column
        found by name, or Ensembl ids mapped to symbols (sae_fast.models.genes). X (or adata.layers[layer]) may
        be raw counts or normalised (binning ignores per-cell scale and log1p) but must be non-negative. Binning
        ties and gene sampling draw from a generator seeded by (seed, cell row), so every pass, and every batch
        size, gives the same tokens. A cell without counts over the vocabulary is an error naming it, or with
        `empty="drop"` is left out with a warning (`cell_ids` keep the AnnData's row numbers)."""
        P, matched, alignment, kept = match_genes(
            adata, self.genes, gene_key=self.gene_key if gene_key is None else gene_key,
            layer=layer, model="scGPT", empty=empty,
            no_overlap="no gene of the AnnData matches scGPT's vocab.json (gene symbols such as 'CD3E', or their "
                       "Ensembl ids); pass gene_key= naming an adata.var column of HGNC symbols")
        max_len = max_seq_len or self.cfg.max_seq_len
        if max_len < 2:
            raise UserError(f"max_seq_len = {max_len}; it must leave room for <cls> and at least one gene")
        token_of_col = self._gene_token[matched]
        gene_of_col = matched

        def batches() -> Iterator[CellBatch]:
            for start in range(0, len(kept), batch_size):
                rows = kept[start:start + batch_size]
                X, _ = count_rows(adata, rows, P, layer=layer, model="scGPT")
                yield self._tokenise(X, rows, token_of_col, gene_of_col, max_len, seed)

        return PreparedData(batches, kept, batch_size, alignment)

    def _tokenise(self, X: np.ndarray, rows: np.ndarray, token_of_col, gene_of_col, max_len: int,
                  seed: int) -> CellBatch:
        cells = []
        for x, row in zip(X, rows):
            rng = np.random.default_rng((seed, int(row)))
            nz = np.flatnonzero(x)
            bins = bin_values(x[nz], self.cfg.n_bins, rng) if len(nz) else np.zeros(0, np.int64)
            if len(nz) > max_len - 1:
                keep = np.sort(rng.choice(len(nz), max_len - 1, replace=False))
                nz, bins = nz[keep], bins[keep]
            cells.append((nz, bins))
        T = 1 + max(len(nz) for nz, _ in cells)
        B = len(cells)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        values = torch.full((B, T), float(self.cfg.pad_value))
        gene_ids = torch.full((B, T), -1, dtype=torch.long)
        expression = torch.zeros(B, T)
        tokens[:, 0], values[:, 0] = self.cls_id, self.cls_value
        for b, (nz, bins) in enumerate(cells):
            n = len(nz)
            tokens[b, 1:n + 1] = torch.from_numpy(token_of_col[nz])
            gene_ids[b, 1:n + 1] = torch.from_numpy(gene_of_col[nz])
            values[b, 1:n + 1] = expression[b, 1:n + 1] = torch.from_numpy(bins).float()
        mask = tokens != self.pad_id
        inputs = {"genes": tokens, "values": values}
        return CellBatch(inputs, gene_ids, torch.from_numpy(rows), mask, expression)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: CellBatch, layer: int | None = None, hook: Hook | None = None, *,
                stop: bool = False, start: torch.Tensor | None = None) -> ModelOutput:
        device = self.encoder.embedding.weight.device
        batch = batch.to(device) if batch.mask.device != device else batch
        pad = ~batch.mask
        h = None
        if start is None:
            values = batch.inputs["values"].to(self.encoder.embedding.weight.dtype)
            h = self.encoder(batch.inputs["genes"]) + self.value_encoder(values)
        layers = self.transformer_encoder.layers
        h, hidden, stopped = self.run_blocks(h, batch, lambda i, x: layers[i](x, src_key_padding_mask=pad),
                                             layer=layer, hook=hook, stop=stop, start=start)
        if stopped:
            return ModelOutput(hidden, None, None)
        is_gene = batch.gene_ids >= 0
        expression = torch.where(is_gene, self.decoder(h), 0.0)
        if self.embedding_rule == "cls":
            embedding = h[:, 0]
        else:
            w = is_gene.to(h.dtype).unsqueeze(-1)
            embedding = (h * w).sum(1) / w.sum(1).clamp(min=1)
        return ModelOutput(hidden, expression, embedding)


def load_scgpt(path: str | Path | None = None, *, random_init_config: ScGPTConfig | dict | None = None,
               vocab: dict[str, int] | Sequence[str] | None = None, embedding: str = "cls",
               cls_value: float | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, seed: int = 0) -> ScGPT:
    """Load scGPT from a directory holding best_model.pt, args.json and vocab.json (scGPT's release layout).

    The state dict is read with torch.load(weights_only=True); flash-attn checkpoints' packed
    `self_attn.Wqkv.{weight,bias}` become `self_attn.in_proj_{weight,bias}`; heads unused at inference
    (mvc_decoder, cls_decoder, ...) are skipped and listed in `model.ignored_keys`. Any other unexpected,
    missing or wrong-shape key, and a vocabulary whose size differs from `encoder.embedding.weight`, is a
    one-line CheckpointError naming the key.

    Without a path, `random_init_config` (a ScGPTConfig or an args.json-style dict) and `vocab` (gene symbols;
    <pad>/<cls>/<eoc> are appended) build a randomly initialised model (seeded) for tests and benchmarks.
    The model goes to CUDA when available (bfloat16), else the CPU (float32), unless device/dtype say."""
    if path is None:
        if random_init_config is None:
            raise UserError("scGPT weights cannot be downloaded here: pass path= to a folder with "
                            "best_model.pt, args.json and vocab.json (e.g. scGPT_human), or "
                            "random_init_config= for random weights")
        cfg = (random_init_config if isinstance(random_init_config, ScGPTConfig)
               else ScGPTConfig.from_args(random_init_config, "random_init_config"))
        if vocab is None:
            raise UserError("random_init_config= needs vocab= (the gene symbols of the random model)")
        if not isinstance(vocab, dict):
            genes = [str(g) for g in vocab]
            vocab = {g: i for i, g in enumerate(genes + [t for t in SPECIAL_TOKENS[:3] if t not in genes])}
        torch.manual_seed(seed)
        model = ScGPT(cfg, vocab, embedding=embedding, cls_value=cls_value)
    else:
        model = _load_dir(Path(path), embedding=embedding, cls_value=cls_value)
    device, dtype = default_device_dtype(device, dtype)
    return model.to(device=device, dtype=dtype)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: not found; an scGPT checkpoint folder holds best_model.pt, args.json and "
                        "vocab.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _load_dir(path: Path, *, embedding: str, cls_value: float | None) -> ScGPT:
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; pass the scGPT folder holding best_model.pt, args.json "
                        "and vocab.json")
    cfg = ScGPTConfig.from_args(_read_json(path / "args.json"), str(path / "args.json"))
    vocab = _read_json(path / "vocab.json")
    weights = path / "best_model.pt"
    if not weights.is_file():
        raise UserError(f"{weights}: not found; an scGPT checkpoint folder holds best_model.pt")
    state = load_weights_only(weights)
    if not isinstance(state, dict):
        raise UserError(f"{weights}: holds a {type(state).__name__}, not a state dict of tensors")
    state = {k.removeprefix("module.").replace("self_attn.Wqkv.", "self_attn.in_proj_"): v
             for k, v in state.items()}
    emb = state.get("encoder.embedding.weight")
    if emb is None:
        raise CheckpointError(f"{weights}: missing key 'encoder.embedding.weight'")
    if emb.shape[0] != len(vocab) or max(vocab.values()) >= emb.shape[0]:
        raise CheckpointError(f"{weights}: 'encoder.embedding.weight' has {emb.shape[0]} rows but vocab.json "
                              f"has {len(vocab)} tokens; use the vocab.json shipped with this checkpoint")
    model = ScGPT(cfg, vocab, embedding=embedding, cls_value=cls_value)
    model.ignored_keys = sorted(k for k in state if k.startswith(IGNORED_PREFIXES))
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    check_state_dict(model.state_dict(), state, str(weights), "is this an scGPT checkpoint matching args.json?")
    model.load_state_dict(state)
    if model.ignored_keys:
        heads = sorted({k.rsplit(".", 2)[0].split(".")[0] for k in model.ignored_keys})
        log.info("scGPT: skipped %d weights of heads unused at inference (%s)", len(model.ignored_keys),
                 ", ".join(heads))
    return model


__all__ = ["ScGPT", "ScGPTConfig", "bin_values", "load_scgpt"]
