"""Geneformer V1 and V2 (Theodoris et al. 2023; Chen et al. 2024) behind the ScFM interface.

    model = load_geneformer("Geneformer/gf-6L-30M-i2048", version=1,
                            token_dictionary="token_dictionary_gc30M.pkl",
                            gene_median="gene_median_dictionary_gc30M.pkl")
    for batch in model.prepare(adata):  # raw counts; Ensembl ids in adata.var["ensembl_id"] or var_names
        out = model.forward(batch, layer=4, stop=True)

The network is transformers' BertForMaskedLM (optional dependency: `pip install 'sae-fast[geneformer]'`)
loaded from an HF directory (config.json + model.safetensors or pytorch_model.bin); we run its embeddings and
then its encoder layers `bert.encoder.layer[i]` one by one with the padding mask, so hooks, stop and start
work on it.

Rank-value encoding (Geneformer's TranscriptomeTokenizer): each cell's counts are divided by its total counts
(adata.obs["n_counts"] if present, else the sum of the row over all genes), times 10,000, divided by each
gene's non-zero median over the pretraining corpus (`gene_median`); the non-zero genes are sorted by that
value, descending (ties keep token-dictionary order; Geneformer's unstable argsort leaves them arbitrary), and
truncated to 2,048 tokens (V1) or to 4,094 genes between <cls> and <eos> (V2: 4,096 tokens). Genes are Ensembl
ids; genes without a token or a median are dropped and reported in `prepared.alignment`. The token dictionary
and the medians are the pickles shipped with the model (or JSON copies, or dicts): loading a pickle is the
user's explicit choice.

Outputs: `layer=L` is the output of `bert.encoder.layer[L]` = HF `hidden_states[L+1]`. `embedding` follows
Geneformer's EmbExtractor (emb_mode "cell", emb_layer -1): the mean of the penultimate layer's output over the
gene tokens, i.e. without padding and, in V2, without <cls> and <eos>. Geneformer predicts gene identities,
not expression values, so `expression` is the masked-LM head's log-probability of each token's own gene at its
rank (0 at special tokens and padding); it is None when the checkpoint has no MLM head.

Needs the real checkpoint and dictionaries for science; `random_init_config` builds random weights for tests.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sae_fast.errors import CheckpointError, UserError
from sae_fast.models.aido_cell import default_device_dtype
from sae_fast.models.base import CellBatch, Hook, ModelOutput, PreparedData, ScFM
from sae_fast.models.genes import count_rows, match_genes

log = logging.getLogger(__name__)

INSTALL = "Geneformer needs the optional dependency transformers: pip install 'sae-fast[geneformer]'"
INPUT_SIZE = {1: 2048, 2: 4096}  # tokens per cell, V2 including <cls> and <eos>


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(INSTALL) from None
    return transformers


def read_mapping(obj, what: str) -> dict:
    """A gene -> value dictionary given as a dict, a .json file or a .pkl/.pickle file (pickles run code when
    loaded: pass only files you trust, such as those shipped with Geneformer)."""
    if isinstance(obj, dict):
        return obj
    if obj is None:
        raise UserError(f"Geneformer needs {what}= (shipped with the model as a .pkl; a dict or .json also "
                        "works)")
    path = Path(obj)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        elif path.suffix in (".pkl", ".pickle"):
            with open(path, "rb") as f:
                data = pickle.load(f)  # noqa: S301 - the user's explicit choice, documented above
        else:
            raise UserError(f"{path}: {what} must be a .pkl, .pickle or .json file")
    except (json.JSONDecodeError, pickle.UnpicklingError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} holds a {type(data).__name__}, expected a dict of Ensembl id -> "
                        "value")
    return data


class Geneformer(ScFM):
    """A transformers BertForMaskedLM with Geneformer's tokenisation and hookable layers."""

    name = "geneformer"

    def __init__(self, mlm, token_dictionary: dict, gene_median: dict, *, version: int = 1,
                 embedding_layer: int = -2, has_mlm_head: bool = True):
        super().__init__()
        if version not in INPUT_SIZE:
            raise UserError(f"version = {version!r}; Geneformer versions are 1 (2,048 tokens) and 2 (4,096, "
                            "<cls>/<eos>)")
        need = ["<pad>"] + (["<cls>", "<eos>"] if version == 2 else [])
        for tok in need:
            if tok not in token_dictionary:
                raise UserError(f"the token dictionary has no {tok!r}; Geneformer V{version} needs "
                                f"{', '.join(need)} (V2 dictionaries are the *_gc104M / gc95M files)")
        if version == 1 and "<cls>" in token_dictionary:
            log.warning("Geneformer: the token dictionary has <cls>/<eos> (a V2 dictionary) but version=1")
        cfg = mlm.config
        self.mlm = mlm
        self.version = version
        self.has_mlm_head = has_mlm_head
        if not has_mlm_head:
            self.no_expression = "the checkpoint has no masked-LM head (cls.predictions.*)"
        self.n_layers, self.d_model = cfg.num_hidden_layers, cfg.hidden_size
        self.embedding_layer = embedding_layer % self.n_layers
        self.max_len = min(INPUT_SIZE[version], cfg.max_position_embeddings)
        self.pad_id = int(token_dictionary["<pad>"])
        self.cls_id = int(token_dictionary["<cls>"]) if version == 2 else None
        self.eos_id = int(token_dictionary["<eos>"]) if version == 2 else None
        bad = [(g, t) for g, t in token_dictionary.items() if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise CheckpointError(f"token dictionary entry {bad[0][0]!r} -> {bad[0][1]} is outside "
                                  f"'bert.embeddings.word_embeddings.weight' ({cfg.vocab_size} rows); use "
                                  "the dictionary that ships with this checkpoint")
        genes = sorted((int(t), str(g)) for g, t in token_dictionary.items()
                       if not str(g).startswith("<") and g in gene_median)
        if not genes:
            raise UserError("no gene has both a token and a median: do token_dictionary and gene_median "
                            "belong to the same Geneformer release?")
        self.genes = [g for _, g in genes]
        self._gene_token = np.array([t for t, _ in genes], dtype=np.int64)
        self._median = np.array([float(gene_median[g]) for g in self.genes])
        self.eval()

    # ------------------------------------------------------------------ tokenisation
    def prepare(self, adata, batch_size: int = 8, *, layer: str | None = None, gene_key: str | None = None,
                n_counts_key: str = "n_counts", empty: str = "error") -> PreparedData:
        """Rank-value encode `adata` (raw counts) for Geneformer: a re-iterable stream of CellBatch.

        Genes are matched by Ensembl id (a version suffix is dropped): the adata.var column `gene_key`, else
        var_names, then the Ensembl and symbol var columns found by name (ensembl_id, gene_ids, ...), symbols
        being mapped to Ensembl ids (sae_fast.models.genes). CellBatch.expression holds each gene token's
        median-scaled value (the value that was ranked). A cell without counts over the vocabulary is an error
        naming it, or with `empty="drop"` is left out with a warning (`cell_ids` keep the AnnData's rows)."""
        P, matched, alignment, kept = match_genes(
            adata, self.genes, gene_key=self.gene_key if gene_key is None else gene_key,
            layer=layer, model="Geneformer", empty=empty,
            no_overlap="no gene of the AnnData is in Geneformer's token dictionary, which uses Ensembl ids (e.g. "
                       "'ENSG00000167286'), nor maps to it as a symbol: add adata.var['ensembl_id'] or pass "
                       "gene_key=")
        median = self._median[matched]
        n_counts = None
        if n_counts_key in adata.obs:
            n_counts = np.asarray(adata.obs[n_counts_key], dtype=np.float64)

        def batches() -> Iterator[CellBatch]:
            for start in range(0, len(kept), batch_size):
                rows = kept[start:start + batch_size]
                X, totals = count_rows(adata, rows, P, layer=layer, model="Geneformer", integer=True)
                total = n_counts[rows] if n_counts is not None else totals
                with np.errstate(divide="ignore", invalid="ignore"):
                    scaled = np.where(X > 0, X / total[:, None] * 10_000 / median, 0.0)
                yield self._tokenise(scaled, rows, matched)

        return PreparedData(batches, kept, batch_size, alignment)

    def _tokenise(self, scaled: np.ndarray, rows: np.ndarray, gene_of_col: np.ndarray) -> CellBatch:
        n_genes = self.max_len - (2 if self.version == 2 else 0)
        ranked = []
        for x in scaled:
            nz = np.flatnonzero(x)
            ranked.append(nz[np.argsort(-x[nz], kind="stable")][:n_genes])
        first = 1 if self.version == 2 else 0
        T = max(1, max(len(r) for r in ranked) + 2 * first)
        B = len(ranked)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        gene_ids = torch.full((B, T), -1, dtype=torch.long)
        expression = torch.zeros(B, T)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, r in enumerate(ranked):
            n = len(r)
            genes = torch.from_numpy(gene_of_col[r])
            tokens[b, first:first + n] = torch.from_numpy(self._gene_token[gene_of_col[r]])
            gene_ids[b, first:first + n] = genes
            expression[b, first:first + n] = torch.from_numpy(scaled[b, r]).float()
            if self.version == 2:
                tokens[b, 0], tokens[b, n + 1] = self.cls_id, self.eos_id
            mask[b, :n + 2 * first] = True
        return CellBatch({"input_ids": tokens}, gene_ids, torch.from_numpy(rows), mask, expression)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: CellBatch, layer: int | None = None, hook: Hook | None = None, *,
                stop: bool = False, start: torch.Tensor | None = None) -> ModelOutput:
        self.check_layer(layer)
        if layer is None and (stop or hook is not None or start is not None):
            raise UserError("hook=, stop=True and start= need layer=L (the block whose output they act on)")
        bert = self.mlm.bert
        device = bert.embeddings.word_embeddings.weight.device
        batch = batch.to(device) if batch.mask.device != device else batch
        if start is None:
            h, first = bert.embeddings(input_ids=batch.inputs["input_ids"]), 0
        else:  # block `layer` already ran: its output is `start`
            h, first = start, layer + 1
        # BERT's extended attention mask: 0 where a key is a real token, the dtype's minimum at padding
        additive = (~batch.mask).to(h.dtype)[:, None, None, :] * torch.finfo(h.dtype).min
        hidden = pooled = None
        for i in range(self.n_layers):
            if i >= first:
                out = bert.encoder.layer[i](h, attention_mask=additive)
                h = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
            if i == layer:
                edited = hook(h, batch) if hook is not None else None
                h = hidden = h if edited is None else edited
                if stop:
                    return ModelOutput(hidden, None, None)
            if i == self.embedding_layer and i >= first - 1:  # with start=, blocks before `layer` never ran
                w = (batch.gene_ids >= 0).to(h.dtype).unsqueeze(-1)
                pooled = (h * w).sum(1) / w.sum(1).clamp(min=1)
        return ModelOutput(hidden, self._own_gene_logprob(h, batch) if self.has_mlm_head else None, pooled)

    def _own_gene_logprob(self, h: torch.Tensor, batch: CellBatch) -> torch.Tensor:
        """log p(token at t | context) from the masked-LM head, one cell at a time ([T, vocab] logits)."""
        ids = batch.inputs["input_ids"]
        logp = [self.mlm.cls(h[b:b + 1])[0].float().log_softmax(-1).gather(-1, ids[b, :, None])[:, 0]
                for b in range(h.shape[0])]
        out = torch.stack(logp)
        return torch.where(batch.gene_ids >= 0, out, 0.0)


def load_geneformer(path: str | Path | None = None, *, token_dictionary=None, gene_median=None,
                    version: int = 1, embedding_layer: int = -2, random_init_config=None,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    seed: int = 0) -> Geneformer:
    """Load Geneformer from an HF directory (config.json + model.safetensors or pytorch_model.bin).

    token_dictionary: Ensembl id -> token id (with <pad>, <mask>, and for V2 <cls>, <eos>); gene_median:
    Ensembl id -> non-zero median. Each a dict, a .json file, or the .pkl shipped with the model. version: 1
    (2,048 tokens, no special tokens) or 2 (4,096 with <cls>/<eos>). embedding_layer: the block whose output
    is mean-pooled into the cell embedding (-2 = penultimate, Geneformer's default; with start= past that
    block the embedding is None). Missing encoder weights or wrong shapes are a one-line CheckpointError
    naming the key; a checkpoint without the MLM head loads with expression=None. Without a path,
    `random_init_config` (a BertConfig or its keyword dict) builds random weights (seeded) for tests and
    benchmarks. On CUDA when available (bfloat16), else the CPU (float32), unless device/dtype say."""
    transformers = _transformers()
    tokens = read_mapping(token_dictionary, "token_dictionary")
    medians = read_mapping(gene_median, "gene_median")
    has_head = True
    if path is None:
        if random_init_config is None:
            raise UserError("Geneformer weights cannot be downloaded here: pass path= to the model's folder "
                            "(config.json + model.safetensors), or random_init_config= for random weights")
        cfg = (random_init_config if isinstance(random_init_config, transformers.BertConfig)
               else transformers.BertConfig(**random_init_config))
        torch.manual_seed(seed)
        mlm = transformers.BertForMaskedLM(cfg)
    else:
        mlm, has_head = _load_dir(Path(path), transformers)
    model = Geneformer(mlm.eval(), tokens, medians, version=version, embedding_layer=embedding_layer,
                       has_mlm_head=has_head)
    device, dtype = default_device_dtype(device, dtype)
    return model.to(device=device, dtype=dtype)


def _load_dir(path: Path, transformers):
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; pass the Geneformer model folder (config.json + "
                        "model.safetensors)")
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise UserError(f"{path}: no model.safetensors or pytorch_model.bin")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type != "bert":
        raise UserError(f"{path}/config.json: model_type {config.model_type!r}; Geneformer checkpoints are "
                        "'bert'")
    try:
        mlm, info = transformers.BertForMaskedLM.from_pretrained(
            path, config=config, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot load the weights ({str(e).splitlines()[0]})") from None
    mismatched = sorted(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ()))
    if mismatched:
        raise CheckpointError(f"{path}: key {mismatched[0]!r} has the wrong shape for config.json"
                              + (f" (+{len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
    missing = sorted(info.get("missing_keys", ()))
    encoder_missing = [k for k in missing if not k.startswith("cls.")]
    if encoder_missing:
        raise CheckpointError(f"{path}: missing key {encoder_missing[0]!r}"
                              + (f" (+{len(encoder_missing) - 1} more)" if len(encoder_missing) > 1 else ""))
    if missing:
        log.warning("Geneformer: %s has no masked-LM head (%s): expression output disabled", path, missing[0])
    return mlm, not missing


__all__ = ["Geneformer", "load_geneformer", "read_mapping"]
