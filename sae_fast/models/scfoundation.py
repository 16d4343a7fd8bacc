"""scFoundation (Hao et al. 2024, biomap-research; the xTrimoGene architecture) behind the ScFM interface, as [P]
used it: the encoder over the expressed genes, no decoder.

    model = load_scfoundation("scfoundation/")     # a folder holding models.ckpt, or the file itself
    for batch in model.prepare(adata):             # raw counts; symbols or Ensembl ids (sae_fast.models.genes)
        out = model.forward(batch, layer=10, stop=True)

What the model sees ([P]'s adapter, sae4scfm/scfm/scfoundation/adapter.py, = scFoundation's get_embedding.py
with `--tgthighres t4`):
- the counts of the 19,264 vocabulary genes (AIDO.Cell's list; genes absent from the data are 0), S = their total;
  values log1p(counts / S * 1e4), then two depth tokens: T = 4 (the target read depth, log10 scale) and
  log10(S + 1e-10) ([P]'s epsilon; scFoundation's own script takes log10(S), which drops S for a one-count cell);
- tokens = the positions whose value is > 0, in vocabulary order (the expressed genes, then T and S), each
  embedded by the auto-discretisation embedding (`token_emb`) plus `pos_emb[position]` (T at 19,264, S at
  19,265); batches are padded with the checkpoint's pad_token_id (value and position), masked in attention;
- the encoder: torch TransformerEncoderLayers (post-norm, ReLU, FFN 4 x dim), then a LayerNorm (`encoder.norm`).

Outputs: `layer=L` is the output of `encoder.transformer_encoder[L]` (= its norm2, [P]'s hook point).
`embedding` = concat(last real token, second-to-last real token, max-pool, mean-pool) of the final encoder
output (after `encoder.norm`): the S and T tokens, then pools over every real token, T and S included ([P]'s
rule, `embedding="all_tokens"`); `embedding="genes"` pools over the gene tokens only, as scFoundation's
get_embedding.py does for one unpadded cell (`geneemb[:, :-2]`). `expression` is always None: the decoder
(a Performer over all 19,266 positions) is not offered, and `model.require_expression(out)` says so.

Checkpoint: scFoundation's models.ckpt, read with torch.load(weights_only=True): a dict of sub-models ('cell' for
cell embeddings, [P]'s choice; 'gene', 'rde'), each {'config': {'model': 'mae_autobin', 'model_config':
{'mae_autobin': {...}}, 'dataset_config': {'rnaseq': {...}}}, 'state_dict': {'model.<key>': tensor}} (read as
scFoundation's load.py `convertconfig` does: a key is what follows its first 'model.'). The encoder keys must
match exactly (the decoder's are skipped and listed in `model.ignored_keys`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sae_fast.errors import CheckpointError, UserError
from sae_fast.models.aido_cell import GeneEmbedding, aido_cell_genes, default_device_dtype
from sae_fast.models.base import CellBatch, Hook, ModelOutput, PreparedData, ScFM
from sae_fast.models.checkpoint import check_state_dict, load_weights_only
from sae_fast.models.genes import count_rows, match_genes

log = logging.getLogger(__name__)

N_DEPTH_TOKENS = 2
# Official key prefix -> ours, for the embedding (our GeneEmbedding is shared with AIDO.Cell).
KEY_MAP = {"token_emb.mlp.": "token_emb.linear1.", "token_emb.mlp2.": "token_emb.linear2.",
           "token_emb.emb.": "token_emb.lookup_table.", "token_emb.emb_mask.": "token_emb.mask_embedding.",
           "token_emb.emb_pad.": "token_emb.pad_embedding."}
DECODER_PREFIXES = ("decoder.", "decoder_embed.", "norm.", "to_final.")  # not offered: skipped when loading
EMBEDDING_RULES = {
    "all_tokens": "[P]'s adapter: max- and mean-pool over every real token, T and S included",
    "genes": "scFoundation's get_embedding.py: max- and mean-pool over the gene tokens, without T and S",
}
NO_EXPRESSION = ("scFoundation's decoder (a Performer over all 19,266 positions) is not offered by sae-fast: "
                 "[P] uses the encoder only; use AIDO.Cell or scGPT for predicted expression")


@dataclass
class ScFoundationConfig:
    """The encoder's architecture and tokens, with the names of scFoundation's checkpoint config."""

    seq_len: int = 19266  # positions: the genes + T + S (pos_emb has seq_len + 1 rows)
    hidden_dim: int = 768
    depth: int = 12
    heads: int = 12
    ff_mult: int = 4
    bin_num: int = 100
    bin_alpha: float = 1.0
    pad_token_id: int = 103
    mask_token_id: int = 102

    @classmethod
    def from_checkpoint(cls, config: dict, where: str) -> ScFoundationConfig:
        """Read the sub-model's 'config' dict the way load.py's convertconfig merges it."""
        try:
            model_type = config["model"]
            merged = {**config["model_config"][model_type], **config["dataset_config"]["rnaseq"]}
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: config lacks {e}; expected scFoundation's layout (config.model, "
                                  "config.model_config[model], config.dataset_config.rnaseq)") from None
        if model_type != "mae_autobin":
            raise CheckpointError(f"{where}: config.model = {model_type!r}; only scFoundation's 'mae_autobin' is "
                                  "supported")
        enc = merged.get("encoder", {})
        if enc.get("module_type") != "transformer":
            raise CheckpointError(f"{where}: encoder module_type = {enc.get('module_type')!r}; only the "
                                  "released 'transformer' encoder is supported")
        try:
            cfg = cls(seq_len=int(merged["seq_len"]), hidden_dim=int(enc["hidden_dim"]), depth=int(enc["depth"]),
                      heads=int(enc["heads"]), bin_num=int(merged["bin_num"]),
                      bin_alpha=float(merged["bin_alpha"]), pad_token_id=int(merged["pad_token_id"]),
                      mask_token_id=int(merged["mask_token_id"]))
        except KeyError as e:
            raise CheckpointError(f"{where}: config lacks {e} (seq_len, bin_num, bin_alpha, pad_token_id, "
                                  "mask_token_id; encoder.hidden_dim, depth, heads)") from None
        if cfg.hidden_dim % cfg.heads:
            raise CheckpointError(f"{where}: encoder hidden_dim {cfg.hidden_dim} is not a multiple of heads "
                                  f"{cfg.heads}")
        return cfg


class ScFoundation(ScFM):
    """scFoundation's encoder (`token_emb`, `pos_emb`, `encoder.transformer_encoder[i]`, `encoder.norm`)."""

    name = "scfoundation"
    no_expression = NO_EXPRESSION

    def __init__(self, cfg: ScFoundationConfig, genes: list[str] | None = None, *, embedding: str = "all_tokens"):
        super().__init__()
        if embedding not in EMBEDDING_RULES:
            raise UserError(f"embedding = {embedding!r}; choose {' or '.join(map(repr, EMBEDDING_RULES))}")
        self.genes = list(genes) if genes is not None else aido_cell_genes()
        if len(self.genes) + N_DEPTH_TOKENS > cfg.seq_len:  # T and S sit at positions G and G + 1
            raise CheckpointError(f"vocabulary mismatch: {len(self.genes)} genes + T + S do not fit the checkpoint's "
                                  f"seq_len {cfg.seq_len} (pos_emb.weight has seq_len + 1 rows); pass genes=")
        if not 0 <= cfg.pad_token_id <= cfg.seq_len:
            raise CheckpointError(f"pad_token_id {cfg.pad_token_id} is outside pos_emb ({cfg.seq_len + 1} rows)")
        self.config = cfg
        self.embedding_rule = embedding
        self.n_layers, self.d_model = cfg.depth, cfg.hidden_dim
        self.ignored_keys: list[str] = []
        self.token_emb = GeneEmbedding(cfg.hidden_dim, cfg.bin_num, cfg.bin_alpha, cfg.mask_token_id,
                                       cfg.pad_token_id)
        self.pos_emb = nn.Embedding(cfg.seq_len + 1, cfg.hidden_dim)
        self.encoder = nn.Module()
        self.encoder.transformer_encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.hidden_dim, cfg.heads, cfg.hidden_dim * cfg.ff_mult, dropout=0.0,
                                       activation="relu", batch_first=True, norm_first=False)
            for _ in range(cfg.depth))
        self.encoder.norm = nn.LayerNorm(cfg.hidden_dim)
        self.eval()

    # ------------------------------------------------------------------ tokenisation
    def prepare(self, adata, batch_size: int = 8, *, layer: str | None = None, gene_key: str | None = None,
                target_depth: float = 4.0, max_genes: int | None = None, seed: int = 0,
                empty: str = "error") -> PreparedData:
        """Tokenise `adata` for scFoundation's encoder: a re-iterable stream of CellBatch (inputs 'values',
        'positions').

        X (or adata.layers[layer]) holds raw counts (non-negative; normalised here). `target_depth` is T ([P]
        and get_embedding.py's default `t4`: 4). `max_genes` keeps a seeded random sample of that many expressed
        genes per cell (T and S always kept; [P] samples 4,096 tokens and may drop them); None keeps every
        expressed gene, as scFoundation does. A cell without counts over the vocabulary (log10 0 in the
        reference) is an error naming it, or with `empty="drop"` is left out with a warning."""
        P, matched, alignment, kept = match_genes(
            adata, self.genes, gene_key=self.gene_key if gene_key is None else gene_key,
            layer=layer, model="scFoundation", empty=empty,
            no_overlap="no gene of the AnnData is in scFoundation's 19,264-gene vocabulary (HGNC symbols such as "
                       "'CD3E', or their Ensembl ids); pass gene_key= naming an adata.var column of symbols")
        if max_genes is not None and max_genes < 1:
            raise UserError(f"max_genes = {max_genes}; give a positive number of genes per cell, or None for all")

        def batches() -> Iterator[CellBatch]:
            for lo in range(0, len(kept), batch_size):
                rows = kept[lo:lo + batch_size]
                counts, _ = count_rows(adata, rows, P, layer=layer, model="scFoundation")
                yield self._tokenise(counts, rows, matched, float(target_depth), max_genes, seed)

        return PreparedData(batches, kept, batch_size, alignment)

    def _tokenise(self, counts: np.ndarray, rows: np.ndarray, matched: np.ndarray, target_depth: float,
                  max_genes: int | None, seed: int) -> CellBatch:
        G = len(self.genes)
        cells = []
        for x, row in zip(counts, rows):
            total = x.sum()
            values = np.log1p(x / total * 1e4)
            depth = np.array([target_depth, np.log10(total + 1e-10)])  # [P]'s epsilon: S > 0 at total 1
            nz = np.flatnonzero(values > 0)
            if max_genes is not None and len(nz) > max_genes:
                nz = np.sort(np.random.default_rng((seed, int(row))).choice(nz, max_genes, replace=False))
            keep = depth > 0  # as the reference: only positions with a value > 0 become tokens
            pos = np.concatenate([matched[nz], np.arange(G, G + N_DEPTH_TOKENS)[keep]])
            cells.append((pos, np.concatenate([values[nz], depth[keep]]), len(nz)))
        T = max(len(p) for p, _, _ in cells)
        B, pad = len(cells), self.config.pad_token_id
        positions = torch.full((B, T), pad, dtype=torch.long)
        values = torch.full((B, T), float(pad))
        gene_ids = torch.full((B, T), -1, dtype=torch.long)
        expression = torch.zeros(B, T)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, (pos, val, n_genes) in enumerate(cells):
            n = len(pos)
            positions[b, :n] = torch.from_numpy(pos)
            values[b, :n] = torch.from_numpy(val).float()
            gene_ids[b, :n_genes] = torch.from_numpy(pos[:n_genes])
            expression[b, :n_genes] = values[b, :n_genes]
            mask[b, :n] = True
        return CellBatch({"values": values, "positions": positions}, gene_ids, torch.from_numpy(rows), mask,
                         expression)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: CellBatch, layer: int | None = None, hook: Hook | None = None, *,
                stop: bool = False, start: torch.Tensor | None = None) -> ModelOutput:
        """Run the encoder; see sae_fast.models.base. `expression` is always None (no decoder)."""
        device = self.pos_emb.weight.device
        batch = batch.to(device) if batch.mask.device != device else batch
        pad = ~batch.mask
        h = None
        if start is None:
            h = self.token_emb(batch.inputs["values"]) + self.pos_emb(batch.inputs["positions"])
        layers = self.encoder.transformer_encoder
        h, hidden, stopped = self.run_blocks(h, batch, lambda i, x: layers[i](x, src_key_padding_mask=pad),
                                             layer=layer, hook=hook, stop=stop, start=start)
        if stopped:
            return ModelOutput(hidden, None, None)
        return ModelOutput(hidden, None, self.cell_embedding(self.encoder.norm(h), batch))

    @property
    def embedding_dim(self) -> int:
        return 4 * self.d_model  # [P]'s concatenation of two tokens and two pools

    def cell_embedding(self, last: torch.Tensor, batch: CellBatch) -> torch.Tensor:
        """concat(last real token, second-to-last real token, max-pool, mean-pool) [B, 4 d]; the pools run over
        every real token ("all_tokens", [P]) or the gene tokens ("genes", scFoundation's get_embedding.py)."""
        n = batch.mask.sum(1)
        rows = torch.arange(last.shape[0], device=last.device)
        pool = batch.mask if self.embedding_rule == "all_tokens" else batch.gene_ids >= 0
        w = pool.unsqueeze(-1)
        top = last.masked_fill(~w, float("-inf")).amax(1)
        mean = (last * w.to(last.dtype)).sum(1) / w.sum(1).to(last.dtype)
        return torch.cat([last[rows, n - 1], last[rows, n - 2], top, mean], dim=1)


def load_scfoundation(path: str | Path, *, key: str = "cell", genes: list[str] | None = None,
                      embedding: str = "all_tokens", device=None, dtype=None) -> ScFoundation:
    """Load scFoundation's encoder from models.ckpt (a folder holding it, or the file), strictly.

    `key` picks the sub-model ('cell', [P]'s and get_embedding.py's choice for cell embeddings; 'gene'; 'rde'); a
    checkpoint holding one model ({'config', 'state_dict'} at the top) is read as is. The file is read with
    torch.load(weights_only=True): a pickle holding anything but tensors, dicts, lists and numbers is refused,
    as is a missing, unexpected (outside the decoder) or wrong-shape encoder key, each with a one-line
    CheckpointError. `genes`: the vocabulary (default: the bundled 19,264 genes). fp32 on the CPU, bf16 on CUDA,
    unless device/dtype say."""
    path = Path(path)
    file = path / "models.ckpt" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file}: not found; pass scFoundation's models.ckpt (or the folder holding it)")
    data = load_weights_only(file)
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: holds a {type(data).__name__}, not scFoundation's dict of models")
    if "state_dict" not in data:
        if key not in data:
            raise CheckpointError(f"{file}: no model {key!r}; it holds {', '.join(map(repr, data)) or 'nothing'} "
                                  "(scFoundation's models.ckpt holds 'cell', 'gene' and 'rde')")
        data = data[key]
    where = f"{file}[{key!r}]" if isinstance(data, dict) and "state_dict" in data else str(file)
    if not isinstance(data, dict) or "state_dict" not in data or "config" not in data:
        raise CheckpointError(f"{where}: expected {{'config': ..., 'state_dict': ...}} (scFoundation's layout)")
    cfg = ScFoundationConfig.from_checkpoint(data["config"], where)
    state = {}
    for k, v in data["state_dict"].items():
        if "model." not in str(k):
            raise CheckpointError(f"{where}: key {k!r} lacks the 'model.' prefix of scFoundation's state_dict")
        state[str(k).split("model.", 1)[1]] = v
    with torch.device("meta"):
        model = ScFoundation(cfg, genes, embedding=embedding)
    model = model.to_empty(device="cpu")
    model.ignored_keys = sorted(k for k in state if k.startswith(DECODER_PREFIXES))
    state = {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIXES)}
    expected = {_official(k): v for k, v in model.state_dict().items()}
    check_state_dict(expected, state, where, "does the checkpoint's config describe these weights?")
    model.load_state_dict({_ours(k): v for k, v in state.items()}, strict=True)
    device, dtype = default_device_dtype(device, dtype)
    return model.to(device=device, dtype=dtype).eval()


def _official(key: str) -> str:
    for theirs, ours in KEY_MAP.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def _ours(key: str) -> str:
    for theirs, ours in KEY_MAP.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


__all__ = ["ScFoundation", "ScFoundationConfig", "load_scfoundation"]
