"""AIDO.Cell (GenBio's `cellfoundation`): a dense transformer over the whole transcriptome, a token per gene.

The equations (SPEC §4, checked against the reference modeling code in the `modelgenerator` wheel):

    input   x = [log1p(counts / T * 1e4) for each of the G vocabulary genes, D, D], D = max(log10 T, 5);
            clamp at 20 (T = total counts over the vocabulary genes; -1 = masked value, -2 = padding)
    embed   e = softmax(a * u + W2 u) @ lookup_table, u = LeakyReLU_0.1(W1 x)    (100 soft "bins" per scalar);
            -1 / -2 take mask_embedding / pad_embedding; h0 = e + position_embedding[arange(G + 2)]
    block   h += W_o Attn(N(h));  h += down(silu(gate(N h)) * up(N h))      (pre-norm, SwiGLU, non-causal)
    output  encoder.ln -> head: dense -> GELU -> N -> Linear(H, 1) + bias = predicted log1p-CPM per gene;
            cell embedding = mean of the last hidden state over the vocabulary genes present in the input
            AnnData ([Y]'s rule; embedding="all_genes": over every gene position, modelgenerator's), never
            over the 2 depth tokens

N is LayerNorm or RMSNorm and the linear layers carry biases or not, as config.json says. Attention runs via
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels): the 19,266 x 19,266
score matrix is never materialised, so memory grows linearly with the context.

Load a real checkpoint (an HF directory with config.json + model.safetensors or pytorch_model.bin) with
`load_aido_cell(path)` or `sae_fast.load_model("aido_cell_100m", path=...)`; nothing is downloaded here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sae_fast.errors import CheckpointError, UserError
from sae_fast.models.base import CellBatch, GeneAlignment, Hook, ModelOutput, PreparedData, ScFM
from sae_fast.models.checkpoint import check_state_dict, load_weights_only
from sae_fast.models.genes import nonempty_rows, vocabulary_keys

_POSITION_KEY = "bert.position_embedding.weight"

log = logging.getLogger(__name__)

MASK_VALUE = -1.0
PAD_VALUE = -2.0
N_DEPTH_TOKENS = 2
# The cell embedding: the mean of the final hidden state (after encoder.ln) over ...
EMBEDDING_RULES = {
    "present_genes": "[Y]'s code, the default: the vocabulary genes present in the input AnnData",
    "all_genes": "modelgenerator's: every gene position, genes absent from the data included",
}


@dataclass
class AIDOCellConfig:
    """The architecture, with the HF config.json field names (other config.json fields are ignored)."""

    hidden_size: int = 640
    num_hidden_layers: int = 18
    num_attention_heads: int = 20
    intermediate_size: int = 1664
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 19264  # = number of genes; the position table has 2 more rows (depth)
    bin_num: int = 100
    bin_alpha: float = 1.0
    pad_token_id: int = -2
    mask_token_id: int = -1
    add_linear_bias: bool = False
    normalization_type: str = "LayerNorm"  # or "RMSNorm"
    hidden_act: str = "swiglu"

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> AIDOCellConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.normalization_type not in ("LayerNorm", "RMSNorm"):
            raise CheckpointError(f"{where}: normalization_type {cfg.normalization_type!r} is not supported "
                                  "(LayerNorm or RMSNorm)")
        if cfg.hidden_act != "swiglu":
            raise CheckpointError(f"{where}: hidden_act {cfg.hidden_act!r} is not supported (only swiglu)")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError(f"{where}: hidden_size {cfg.hidden_size} is not a multiple of "
                                  f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    def to_dict(self) -> dict:
        return {"model_type": "cellfoundation", "architectures": ["CellFoundationForMaskedLM"],
                **dataclasses.asdict(self)}


# The released sizes (SPEC §4; 100M from its config.json). All use LayerNorm and bias-free linear layers.
AIDO_CELL_CONFIGS = {
    name: AIDOCellConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=a, intermediate_size=f)
    for name, (n, h, a, f) in {"3m": (6, 128, 4, 320), "10m": (8, 256, 8, 640), "100m": (18, 640, 20, 1664),
                               "650m": (32, 1280, 20, 3392)}.items()
}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in at least float32 (as LlamaRMSNorm); no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _norm(cfg: AIDOCellConfig) -> nn.Module:
    if cfg.normalization_type == "RMSNorm":
        return RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class _Module(nn.Module):
    """A plain container, so that state-dict keys follow the reference's module names."""


class GeneEmbedding(nn.Module):
    """Scalar expression value -> H-vector by a learned soft assignment to `bin_num` embeddings (xTrimoGene's
    auto-discretisation embedding, shared by AIDO.Cell and scFoundation); values equal to `mask_value` /
    `pad_value` take the mask / pad embedding."""

    def __init__(self, hidden_size: int, bin_num: int, bin_alpha: float, mask_value: float, pad_value: float):
        super().__init__()
        self.bin_alpha = bin_alpha
        self.mask_value, self.pad_value = float(mask_value), float(pad_value)
        self.linear1 = nn.Linear(1, bin_num)
        self.linear2 = nn.Linear(bin_num, bin_num)
        self.lookup_table = nn.Embedding(bin_num, hidden_size)
        self.mask_embedding = nn.Embedding(1, hidden_size)
        self.pad_embedding = nn.Embedding(1, hidden_size)

    def forward(self, values: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, H]
        u = F.leaky_relu(self.linear1(values.unsqueeze(-1).to(self.linear1.weight.dtype)), 0.1)
        weights = torch.softmax(self.bin_alpha * u + self.linear2(u), dim=-1)
        e = weights @ self.lookup_table.weight
        e = torch.where((values == self.mask_value).unsqueeze(-1), self.mask_embedding.weight[0], e)
        return torch.where((values == self.pad_value).unsqueeze(-1), self.pad_embedding.weight[0], e)


class SelfAttention(nn.Module):
    def __init__(self, cfg: AIDOCellConfig):
        super().__init__()
        bias = cfg.add_linear_bias
        self.n_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape

        def heads(t):
            return t.view(B, T, self.n_heads, H // self.n_heads).transpose(1, 2)

        # Fused kernel: never materialises the T x T scores. Non-causal; AIDO.Cell ignores the attention mask.
        o = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)))
        return o.transpose(1, 2).reshape(B, T, H)


class Block(nn.Module):
    """One pre-norm transformer block; module names as in the reference (`attention.ln`, `ln`, `mlp`)."""

    def __init__(self, cfg: AIDOCellConfig):
        super().__init__()
        bias = cfg.add_linear_bias
        self.attention = _Module()
        self.attention.ln = _norm(cfg)
        self.attention.self = SelfAttention(cfg)
        self.attention.output = _Module()
        self.attention.output.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)
        self.ln = _norm(cfg)
        self.mlp = _Module()
        self.mlp.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.mlp.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.mlp.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attention
        h = h + a.output.dense(a.self(a.ln(h)))
        x, m = self.ln(h), self.mlp
        return h + m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))


class PredictionHead(nn.Module):
    """`cls.predictions`: dense -> exact GELU -> norm -> Linear(H, 1) + bias: a value per token."""

    def __init__(self, cfg: AIDOCellConfig):
        super().__init__()
        self.transform = _Module()
        self.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform.LayerNorm = _norm(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T]
        t = self.transform
        return (self.decoder(t.LayerNorm(F.gelu(t.dense(h)))) + self.bias).squeeze(-1)


def read_gene_list(path: str | Path) -> list[str]:
    """A vocabulary file: one gene a line, or `gene_name<TAB>index` with a header (AIDO.Cell's tsv)."""
    lines = [ln.split("\t")[0].strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    return lines[1:] if lines and lines[0] == "gene_name" else lines


def aido_cell_genes() -> list[str]:
    """AIDO.Cell's (= scFoundation's) 19,264 genes in model order (bundled: sae_fast/data)."""
    from sae_fast.datasets import data_path

    return read_gene_list(data_path("aido_cell_genes_19264.tsv"))


class AIDOCell(ScFM):
    """AIDO.Cell with hooks on the residual stream. `genes` = the vocabulary (position p is gene p)."""

    name = "aido_cell"

    def __init__(self, cfg: AIDOCellConfig, genes: list[str] | None = None, *, embedding: str = "present_genes"):
        super().__init__()
        if embedding not in EMBEDDING_RULES:
            raise UserError(f"embedding = {embedding!r}; choose {' or '.join(map(repr, EMBEDDING_RULES))} "
                            f"({'; '.join(f'{k}: {v}' for k, v in EMBEDDING_RULES.items())})")
        self.embedding_rule = embedding
        self.config = cfg
        self.genes = list(genes) if genes is not None else aido_cell_genes()
        if len(self.genes) != cfg.max_position_embeddings:
            raise CheckpointError(f"vocabulary mismatch: {len(self.genes)} genes but config "
                                  f"max_position_embeddings = {cfg.max_position_embeddings} (bert.position_"
                                  "embedding.weight needs a row per gene + 2 depth tokens); pass its genes")
        self.n_layers, self.d_model = cfg.num_hidden_layers, cfg.hidden_size
        self.bert = _Module()
        self.bert.gene_embedding = GeneEmbedding(cfg.hidden_size, cfg.bin_num, cfg.bin_alpha, cfg.mask_token_id,
                                                 cfg.pad_token_id)
        n_positions = cfg.max_position_embeddings + N_DEPTH_TOKENS
        self.bert.position_embedding = nn.Embedding(n_positions, cfg.hidden_size)
        self.bert.encoder = _Module()
        self.bert.encoder.layer = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.bert.encoder.ln = _norm(cfg)
        self.cls = _Module()
        self.cls.predictions = PredictionHead(cfg)
        self._gene_index = {g: i for i, g in enumerate(self.genes)}

    # ------------------------------------------------------------------ input
    def prepare(self, adata, batch_size: int = 8, *, layer: str | None = None, mask_fraction: float = 0.0,
                seed: int = 0, gene_key: str | None = None, empty: str = "error") -> PreparedData:
        """Align `adata`'s genes to the vocabulary, normalise as AIDO.Cell does and stream CellBatch objects.

        Genes: symbols or Ensembl ids, in var_names or a var column (`gene_key`, else found by name; see
        sae_fast.models.genes). `adata.X` (or `adata.layers[layer]`) must hold raw counts; it may be sparse and
        is densified one batch at a time. `inputs["values"]` is [B, G + 2]: log1p(counts / T * 1e4) per
        vocabulary gene (0 where the data lacks the gene), then the two depth tokens max(log10 T, 5), all
        clamped at 20; `inputs["present"]` marks the vocabulary genes found in the AnnData (what [Y]'s cell
        embedding averages over). With `mask_fraction` > 0 a seeded random fraction of gene values is replaced
        by -1 (the masked-value task); `expression` always holds the unmasked values. A cell with no counts over
        the vocabulary (T = 0, NaN in the reference) is an error naming it, or with `empty="drop"` is left out
        with a warning (`cell_ids` keep the AnnData's row numbers)."""
        X, where = _counts_matrix(adata, layer)
        names = [str(g) for g in adata.var_names]
        cols, alignment = self._align(adata, names, where, self.gene_key if gene_key is None else gene_key)
        _check_counts(X, adata, names, where)
        log.info("%s: %s", self.name, alignment.summary())
        G = len(self.genes)
        present = np.flatnonzero(cols >= 0)
        rows = nonempty_rows(adata, X, cols[present], empty=empty, model=self.name)
        alignment.dropped_cells = X.shape[0] - len(rows)
        X_aligned = X[:, cols[present]]
        present_mask = torch.zeros(G + N_DEPTH_TOKENS, dtype=torch.bool)
        present_mask[torch.from_numpy(present)] = True

        def batches():
            rng = np.random.default_rng(seed)
            for lo in range(0, len(rows), batch_size):
                ids = rows[lo:lo + batch_size]
                block = X_aligned[ids]
                block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
                counts = np.zeros((block.shape[0], G), np.float64)
                counts[:, present] = block
                values = normalise(torch.from_numpy(counts))
                expression = values.clone()
                expression[:, G:] = 0
                if mask_fraction > 0:
                    hide = torch.from_numpy(rng.random((values.shape[0], G)) < mask_fraction)
                    values[:, :G] = values[:, :G].masked_fill(hide, MASK_VALUE)
                B = values.shape[0]
                gene_ids = torch.cat([torch.arange(G), torch.full((N_DEPTH_TOKENS,), -1)]).expand(B, -1)
                yield CellBatch({"values": values, "present": present_mask.expand(B, -1)}, gene_ids,
                                torch.from_numpy(ids), torch.ones(B, G + N_DEPTH_TOKENS, dtype=torch.bool),
                                expression)

        return PreparedData(batches, rows, batch_size, alignment)

    def _align(self, adata, names: list[str], where: str, gene_key: str | None
               ) -> tuple[np.ndarray, GeneAlignment]:
        keys, routes = vocabulary_keys(adata, self.genes, gene_key=gene_key)
        first: dict[str, int] = {}
        for j, g in enumerate(keys):
            if g is not None:
                first.setdefault(g, j)
        cols = np.array([first.get(g, -1) for g in self.genes], dtype=np.int64)
        matched = [g for g in self.genes if g in first]
        if not matched:
            raise UserError(f"{where}: none of its {len(names)} genes (e.g. {', '.join(names[:3])}) is in "
                            f"{self.name}'s {len(self.genes)}-gene vocabulary, as a symbol or an Ensembl id, in "
                            "var_names or in a var column (gene_symbols, feature_name, gene_name, gene_ids, "
                            "ensembl_id); pass gene_key= naming the var column of gene symbols")
        used = set(cols[cols >= 0].tolist())
        alignment = GeneAlignment(n_vocab=len(self.genes), matched=matched,
                                  missing_from_data=[g for g in self.genes if g not in first],
                                  dropped_from_data=[g for j, g in enumerate(names) if j not in used],
                                  routes=routes)
        return cols, alignment

    def restrict(self, genes: Sequence[str]) -> AIDOCell:
        """This model on a smaller gene context: a model whose vocabulary is `genes` (a subset of this one's, kept
        in this vocabulary's order), sharing every weight but the position embedding, of which it keeps the rows
        of those genes and of the depth tokens. Its forward pass equals this model's on inputs that hold only
        those genes at their own positions (`inputs["positions"]`, as in gene-subset pretraining): attention
        costs (n / G)^2 of the full context's. A cheaper, non-standard context: AIDO.Cell itself always reads
        all of its genes."""
        wanted = set(genes)
        unknown = [g for g in wanted if g not in self._gene_index]
        if unknown:
            raise UserError(f"context gene(s) {', '.join(sorted(unknown)[:5])} not in {self.name}'s "
                            f"{len(self.genes)}-gene vocabulary")
        if not wanted:
            raise UserError("an empty gene context")
        idx = sorted(self._gene_index[g] for g in wanted)
        G = len(self.genes)
        cfg = dataclasses.replace(self.config, max_position_embeddings=len(idx))
        small = AIDOCell(cfg, [self.genes[i] for i in idx], embedding=self.embedding_rule)
        small.name, small.gene_key = self.name, self.gene_key
        state = self.state_dict()
        rows = torch.tensor(idx + list(range(G, G + N_DEPTH_TOKENS)), device=state[_POSITION_KEY].device)
        state[_POSITION_KEY] = state[_POSITION_KEY].index_select(0, rows)
        small.load_state_dict(state, assign=True)
        return small.train(self.training)

    # ------------------------------------------------------------------ model
    def embed(self, values: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream before block 0 (HF hidden_states[0]). Token t sits at position t (= gene t)
        unless `positions` [B, T] says otherwise (a subset of the genes, as in gene-subset training)."""
        e = self.bert.gene_embedding(values)
        pos = self.bert.position_embedding
        return e + (pos.weight[: values.shape[1]] if positions is None else pos(positions))

    def forward(self, batch: CellBatch, layer: int | None = None, hook: Hook | None = None, *,
                stop: bool = False, start: torch.Tensor | None = None) -> ModelOutput:
        """Run the model; see sae_fast.models.base. `hidden` is block `layer`'s output (None if no layer)."""
        self.check_layer(layer)
        if layer is None and (stop or hook is not None or start is not None):
            raise UserError("forward: stop=, hook= and start= need layer=L")
        values = batch.inputs["values"].to(self.bert.position_embedding.weight.device)
        if start is None:
            positions = batch.inputs.get("positions")
            h, first = self.embed(values, None if positions is None else positions.to(values.device)), 0
        else:
            h, first = start.to(self.bert.position_embedding.weight.dtype), layer + 1
        hidden = start
        for i in range(first, self.n_layers):
            h = self.bert.encoder.layer[i](h)
            if i == layer:
                if hook is not None:
                    edited = hook(h, batch)
                    h = h if edited is None else edited
                hidden = h
                if stop:
                    return ModelOutput(hidden, None, None)
        last = self.bert.encoder.ln(h)
        expression = self.cls.predictions(last)[:, : len(self.genes)]
        return ModelOutput(hidden, expression, self.cell_embedding(last, batch))

    def cell_embedding(self, last: torch.Tensor, batch: CellBatch) -> torch.Tensor:
        """Mean of the final hidden state (after `encoder.ln`) over the tokens that `embedding_rule` names:
        "present_genes" ([Y]'s code: the vocabulary genes found in the input AnnData, `inputs["present"]`; every
        gene token for a batch built without it) or "all_genes" (modelgenerator's: every gene position, absent
        genes included); never the 2 depth tokens."""
        genes = (batch.gene_ids >= 0) & batch.mask
        if self.embedding_rule == "present_genes" and "present" in batch.inputs:
            genes = genes & batch.inputs["present"]
        w = genes.to(last.device).unsqueeze(-1).to(last.dtype)
        return (last * w).sum(1) / w.sum(1)


def normalise(counts: torch.Tensor) -> torch.Tensor:
    """Counts [B, G] (vocabulary order) -> AIDO.Cell's input values [B, G + 2] (float32)."""
    total = counts.sum(1, keepdim=True)
    values = torch.log1p(counts / total.clamp_min(1e-12) * 1e4)
    depth = torch.log10(total.clamp_min(1e-12)).clamp_min(5.0).expand(-1, N_DEPTH_TOKENS)
    return torch.cat([values, depth], 1).clamp_max(20.0).float()


def _counts_matrix(adata, layer: str | None):
    where = f"AnnData ({adata.n_obs} cells x {adata.n_vars} genes)"
    if layer is None:
        return adata.X, f"{where} .X"
    if layer not in adata.layers:
        raise UserError(f"{where}: no layer {layer!r}; layers: {', '.join(adata.layers) or 'none'}")
    return adata.layers[layer], f"{where} .layers[{layer!r}]"


def _check_counts(X, adata, names: list[str], where: str, chunk: int = 4096) -> None:
    """Raw counts or a clear error: finite, non-negative, integer-valued (checked without densifying X)."""
    import scipy.sparse as sp

    for lo in range(0, X.shape[0], chunk):
        block = X[lo:lo + chunk]
        if sp.issparse(block):
            block = sp.coo_matrix(block)
            vals, rows, colj = block.data, block.row, block.col
        else:
            block = np.asarray(block)
            rows, colj = np.nonzero(block != 0)
            vals = block[rows, colj]
        for bad, what in ((~np.isfinite(vals), "non-finite"), (vals < 0, "negative"),
                          (vals != np.round(vals), "non-integer")):
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                raise UserError(
                    f"{where} holds {what} values (e.g. {vals[k]:.4g} at cell "
                    f"{adata.obs_names[lo + rows[k]]!r}, gene {names[colj[k]]!r}); AIDO.Cell expects raw "
                    "counts: pass adata.raw.to_adata() or set layer=... to the counts layer")


# ---------------------------------------------------------------------- checkpoints
def _checkpoint_file(path: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    raise UserError(f"{path}: no model.safetensors or pytorch_model.bin; expected an HF AIDO.Cell directory")


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a pytorch_model.bin read with weights_only=True (no code runs)."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    sd = load_weights_only(file)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def load_state_strict(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Copy `sd` into `model`, refusing any missing key, unexpected key or wrong shape (one-line error)."""
    sd = dict(sd)
    tied = sd.pop("cls.predictions.decoder.bias", None)  # the reference ties it to cls.predictions.bias
    if tied is not None:
        sd.setdefault("cls.predictions.bias", tied)
    check_state_dict(model.state_dict(), sd, where, "the checkpoint does not match the architecture in config.json")
    model.load_state_dict(sd, strict=True)


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA, fp32 on the CPU, unless given."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_aido_cell(path: str | Path, *, genes: list[str] | None = None, embedding: str = "present_genes",
                   device=None, dtype=None) -> AIDOCell:
    """Load an HF AIDO.Cell directory: config.json + model.safetensors (or pytorch_model.bin), strictly.

    The gene vocabulary is `genes`, else the directory's genes.tsv, else AIDO.Cell's bundled 19,264 genes.
    `embedding` is the cell-embedding rule (EMBEDDING_RULES: [Y]'s "present_genes" or modelgenerator's
    "all_genes")."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; expected an HF AIDO.Cell directory (config.json + "
                        "model.safetensors or pytorch_model.bin)")
    try:
        cfg = AIDOCellConfig.from_dict(json.loads((path / "config.json").read_text()),
                                       where=str(path / "config.json"))
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{path / 'config.json'}: not a valid AIDO.Cell config ({e})") from None
    source = "genes="
    if genes is None:
        source = str(path / "genes.tsv") if (path / "genes.tsv").is_file() else "AIDO.Cell's 19,264-gene list"
        genes = read_gene_list(path / "genes.tsv") if (path / "genes.tsv").is_file() else aido_cell_genes()
    if len(genes) != cfg.max_position_embeddings:
        raise CheckpointError(f"{path}: vocabulary mismatch: {len(genes)} genes in {source} but config.json "
                              f"has max_position_embeddings = {cfg.max_position_embeddings} (bert.position_"
                              "embedding.weight holds a row per gene + 2 depth tokens); pass its genes")
    file = _checkpoint_file(path)
    with torch.device("meta"):
        model = AIDOCell(cfg, genes, embedding=embedding)
    model = model.to_empty(device="cpu")
    load_state_strict(model, read_state_dict(file), str(file))
    device, dtype = default_device_dtype(device, dtype)
    return model.to(device=device, dtype=dtype).eval()


def random_aido_cell(cfg: AIDOCellConfig, genes: list[str] | None = None, *, seed: int = 0, device=None,
                     dtype=None, embedding: str = "present_genes") -> AIDOCell:
    """An AIDO.Cell with random weights (N(0, 0.02), as the reference's init): for tests and benchmarks."""
    if genes is None and cfg.max_position_embeddings != 19264:
        genes = [f"GENE{i}" for i in range(cfg.max_position_embeddings)]
    gen = torch.Generator().manual_seed(seed)
    model = AIDOCell(cfg, genes, embedding=embedding)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.ndim == 1:
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    device, dtype = default_device_dtype(device, dtype)
    return model.to(device=device, dtype=dtype).eval()


def save_aido_cell(model: AIDOCell, path: str | Path, *, extra_files: dict[str, str] | None = None) -> None:
    """Write an HF-style directory: config.json, model.safetensors and genes.tsv (each written atomically)."""
    from safetensors.torch import save_file

    from sae_fast.utils import atomic_path, write_json

    path = Path(path)
    write_json(path / "config.json", model.config.to_dict())
    with atomic_path(path / "model.safetensors") as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_path(path / "genes.tsv") as tmp:
        tmp.write_text("\n".join(model.genes) + "\n")
    for name, text in (extra_files or {}).items():
        with atomic_path(path / name) as tmp:
            tmp.write_text(text)

