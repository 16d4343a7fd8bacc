"""The ScFM interface: every single-cell foundation model behind one hookable forward.

    batches = model.prepare(adata)                 # align genes, normalise, tokenise -> CellBatch stream
    out = model.forward(batch, layer=L)            # full run; out.hidden is the output of block L
    out = model.forward(batch, layer=L, stop=True) # extraction: nothing beyond block L is computed
    out = model.forward(batch, layer=L, hook=h)    # h(hidden, batch) -> edited hidden (or None = unchanged)
    out = model.forward(batch, layer=L, start=h)   # steering: h is block L's output; run blocks L+1.. only

`layer=L` is the output of block L counted from 0, before any final norm (AIDO.Cell's `encoder.layer[L]`,
HF `hidden_states[L+1]`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from sae_fast.errors import UserError


class CellBatch(NamedTuple):
    """A batch of B cells tokenised for one model, T tokens each.

    `gene_ids` index `model.genes` and are -1 for special tokens (depth tokens, <cls>, padding); they say which
    gene each token is. `cell_ids` are row numbers in the AnnData that `prepare` was given."""

    inputs: dict[str, torch.Tensor]  # model-specific input tensors, each [B, T] (values, token ids, ...)
    gene_ids: torch.Tensor  # [B, T] int64, -1 = not a gene
    cell_ids: torch.Tensor  # [B] int64
    mask: torch.Tensor  # [B, T] bool, True = a real (non-padding) token
    expression: torch.Tensor  # [B, T] float: the normalised input value at each token (0 where not a gene)

    def to(self, device) -> CellBatch:
        return CellBatch({k: v.to(device) for k, v in self.inputs.items()}, self.gene_ids.to(device),
                         self.cell_ids.to(device), self.mask.to(device), self.expression.to(device))


class ModelOutput(NamedTuple):
    hidden: torch.Tensor | None  # [B, T, d] residual stream at the requested layer (after any hook edit)
    expression: torch.Tensor | None  # [B, T_genes] the model's predicted expression (None when stop=True)
    embedding: torch.Tensor | None  # [B, d] cell embedding by the model's own rule (None when stop=True)


Hook = Callable[[torch.Tensor, CellBatch], "torch.Tensor | None"]


@dataclass
class GeneAlignment:
    """What `prepare` did to the AnnData's genes: which matched the vocabulary and which did not."""

    n_vocab: int
    matched: list[str] = field(default_factory=list)
    missing_from_data: list[str] = field(default_factory=list)  # vocabulary genes filled with 0
    dropped_from_data: list[str] = field(default_factory=list)  # data genes outside the vocabulary
    routes: dict[str, int] = field(default_factory=dict)  # data genes matched by each route (var_names, ...)
    dropped_cells: int = 0  # cells with no counts over the vocabulary, left out with empty="drop"

    def summary(self) -> str:
        via = ", ".join(f"{route} {n:,}" for route, n in self.routes.items())
        return (f"{len(self.matched)}/{self.n_vocab} vocabulary genes found in the data"
                + (f" (data genes matched via {via})" if via else "") + "; "
                f"{len(self.missing_from_data)} absent from the data (input as 0), "
                f"{len(self.dropped_from_data)} data genes outside the vocabulary dropped"
                + (f"; {self.dropped_cells} cells without counts over the vocabulary dropped"
                   if self.dropped_cells else ""))


class PreparedData:
    """The iterable that `prepare` returns: re-iterable, with `len()` in batches and the gene alignment."""

    def __init__(self, make_iter: Callable[[], Iterator[CellBatch]], rows: np.ndarray, batch_size: int,
                 alignment: GeneAlignment):
        self._make_iter = make_iter
        self.rows = rows  # the AnnData rows streamed, in order (cells without counts left out by empty="drop")
        self.n_cells = len(rows)
        self.batch_size = batch_size
        self.alignment = alignment

    def __iter__(self) -> Iterator[CellBatch]:
        return self._make_iter()

    def __len__(self) -> int:
        return -(-self.n_cells // self.batch_size)


class ScFM(nn.Module):
    """Base class of the model zoo. Subclasses set `genes`, `n_layers`, `d_model` and implement the rest."""

    name: str = "scfm"
    genes: list[str]  # the model's gene vocabulary, indexed by CellBatch.gene_ids
    gene_key: str | None = None  # prepare()'s default gene_key: the adata.var column holding the genes
    n_layers: int
    d_model: int

    @property
    def embedding_dim(self) -> int:
        """Width of the cell embedding (ModelOutput.embedding): d_model unless the model's rule concatenates."""
        return self.d_model

    def prepare(self, adata, batch_size: int = 8, **kw) -> PreparedData:
        raise NotImplementedError

    def forward(self, batch: CellBatch, layer: int | None = None, hook: Hook | None = None, *,
                stop: bool = False, start: torch.Tensor | None = None) -> ModelOutput:
        raise NotImplementedError

    no_expression: str | None = None  # why `ModelOutput.expression` is None for this model, if it always is

    def require_expression(self, out: ModelOutput | None, hint: str = "") -> torch.Tensor:
        """`out.expression`, or a UserError for a caller that needs predicted expression (steering DEGs, ...):
        the one message for it, ending with `hint` (what to do instead). None stands for passes that gave none."""
        if out is not None and out.expression is not None:
            return out.expression
        why = self.no_expression or "this forward pass stopped before the head (stop=True)"
        raise UserError(f"{self.name} gives no predicted expression here: {why}" + (f"; {hint}" if hint else ""))

    def run_blocks(self, h: torch.Tensor | None, batch: CellBatch, block: Callable[[int, torch.Tensor], torch.Tensor],
                   *, layer: int | None, hook: Hook | None, stop: bool, start: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Blocks 0..n_layers-1 as `block(i, h)`, or with `start` (block `layer`'s output) only the blocks after
        `layer`. At block `layer` the output (or `start`) goes through `hook`, and is `hidden`; `stop` returns
        there. Returns (h, hidden, stopped)."""
        self.check_layer(layer)
        if layer is None and (stop or hook is not None or start is not None):
            raise UserError("hook=, stop=True and start= need layer=L (the block whose output they act on)")
        first = 0 if start is None else layer + 1
        h = h if start is None else start
        hidden = None
        for i in range(self.n_layers):
            if i >= first:
                h = block(i, h)
            if i == layer:
                edited = hook(h, batch) if hook is not None else None
                h = hidden = h if edited is None else edited
                if stop:
                    return h, hidden, True
        return h, hidden, False

    def restrict(self, genes: Sequence[str]) -> ScFM:
        """The model on a gene context that is a subset of its vocabulary (AIDO.Cell's family only)."""
        raise UserError(f"{self.name} chooses its own input tokens, so [model] context applies only to AIDO.Cell "
                        "models (mini, aido_cell_*); leave context = \"all\"")

    def check_layer(self, layer: int | None) -> None:
        if layer is not None and not 0 <= layer < self.n_layers:
            raise UserError(f"layer {layer} is out of range: {self.name} has layers 0..{self.n_layers - 1}")
