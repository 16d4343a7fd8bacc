"""Feature edits in the residual stream (SPEC §3): Scale, Add, Clamp, Ablate.

Each is a small frozen dataclass. Given the SAE, it edits a block output `hidden` [B, T, d] at the tokens its
`tokens` selection picks, and returns the edited tensor (a new one: the input is never modified), or None when
it is a no-op by construction (Scale at alpha = 1 everywhere, Add with 0, Clamp on no feature):

    Scale({123: 2.0})            x' = x + W_dec^T ((alpha - 1) * z)      [Y]; = W_dec^T (alpha * z) + b_pre + e(x)
    Add({123: 1.5})              x' = x + a * W_dec[123]                 no encode
    Clamp([7, 9], value=-2.0)    z_i := c where feature i is active      [P]: the reconstruction replaces x
    Ablate([7, 9])               Clamp to 0

Token selection (`tokens`): "all" (every real token: genes, AIDO.Cell's 2 depth tokens, <cls>; not padding;
[Y]'s code edits every position), "genes" (gene tokens only), "expressed" (gene tokens with input value > 0),
or a list of gene symbols (those genes' tokens).

Scale is computed in delta form: alpha = 1 leaves x exactly (0 is added), and only the steered features' pairs
carry a non-zero coefficient. The code z comes from the SAE's own encoder (its sparse kernels in sae_fast.ops,
on whatever device the hidden state is on); z, and so the error term e(x) = x - SAE(x), is computed without
the edit and without gradient.

Clamp has two options the papers differ on. `error_term`: False ([P]'s code, sae4scfm core/steering.py: the
reconstruction W_dec^T z' + b_pre replaces x) or True (x' = x + W_dec^T (z' - z), the error term kept).
`encode` for BatchTopK / Matryoshka SAEs: "batch" ([P]'s code: BatchTopK over the selected tokens of the
forward batch, so the edit depends on the batch's composition) or "threshold" (the learned inference
threshold, per token). Defaults are [P]'s choices.

Every intervention works as a model hook too: `model.forward(batch, layer=L, hook=Clamp([3]).hook(sae,
model))`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from sae_fast import ops
from sae_fast.errors import UserError

TOKEN_RULES = ("all", "genes", "expressed")
ENCODE_MODES = ("auto", "batch", "threshold")


def _tokens(tokens) -> str | tuple[str, ...]:
    if isinstance(tokens, str):
        if tokens not in TOKEN_RULES:
            raise UserError(f"tokens={tokens!r}: choose all, genes, expressed, or give a list of gene symbols")
        return tokens
    genes = tuple(map(str, tokens))
    if not genes:
        raise UserError("tokens=[]: an empty gene list selects no token; use tokens='all' or name genes")
    return genes


def _feature(f, where: str) -> int:
    """A feature index: an int, an integral float, or a decimal string (JSON keys)."""
    if isinstance(f, str) and f.strip().lstrip("-").isdigit():
        return int(f)
    if isinstance(f, bool) or not isinstance(f, (int, np.integer, float, np.floating)) or not float(f).is_integer():
        raise UserError(f"{where}: feature {f!r} is not an integer feature index")
    return int(f)


def _finite(v, what: str) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{what} = {v!r} is not a number") from None
    if not math.isfinite(v):
        raise UserError(f"{what} = {v} is not finite; give a finite number")
    return v


def n_features(sae) -> int:
    return int(sae.W_dec.shape[0])


def check_features(features, sae, where: str) -> None:
    """One-line error for the first feature index outside 0..F-1."""
    F = n_features(sae)
    for f in features:
        if not 0 <= f < F:
            raise UserError(f"{where}: feature {f} is out of range: the SAE has features 0..{F - 1}")


def encode(sae, x: torch.Tensor, mode: str = "auto") -> ops.SparseCode:
    """The SAE code of x [N, d] through the SAE's own sparse kernels, on x's device, without gradient.

    mode "auto" = the SAE's own rule (`sae.encode`; a BatchTopK SAE in eval mode uses its threshold once
    learned); "batch" = BatchTopK over these N rows ([P]'s code); "threshold" = the learned threshold."""
    if mode not in ENCODE_MODES:
        raise UserError(f"encode={mode!r}: choose one of {', '.join(ENCODE_MODES)}")
    x = x.to(sae.W_enc.dtype)
    with torch.no_grad():
        arch = getattr(sae, "arch", "")
        if mode == "auto" or arch not in ("batchtopk", "matryoshka"):
            return sae.encode(x)
        if mode == "batch":
            return ops.batch_topk_encode(x, sae.W_enc, sae._b_eff(), sae.cfg.k, relu=True,
                                         backend=sae.cfg.backend)
        if not sae.threshold_learned():
            raise UserError("encode='threshold': this BatchTopK SAE has no learned threshold yet (train it, or "
                            "use encode='batch')")
        theta = sae.threshold  # a scalar, or one value per feature (SAELens checkpoints)
        return ops.threshold_encode(x, sae.W_enc, sae._b_eff(), theta if theta.dim() else float(theta),
                                    backend=sae.cfg.backend)


def scale_delta(code: ops.SparseCode, alpha: torch.Tensor, W_dec: torch.Tensor, backend: str = "auto"):
    """W_dec^T ((alpha - 1) * z) for a full alpha vector [F]: one sparse decode whose coefficients are zero
    except at the steered features' active pairs. Differentiable in alpha (contrastive steering)."""
    coef = code.values * (alpha[code.indices] - 1)
    return ops.sparse_decode(code.indices, coef.to(W_dec.dtype), W_dec, backend=backend)


@dataclasses.dataclass(frozen=True)
class Intervention:
    """Base class: the token selection and the plumbing shared by every edit. Subclasses implement
    `_edit(x [N, d], sae) -> [N, d]` on the selected rows, `feature_indices()` and `is_noop()`."""

    def feature_indices(self) -> list[int]:
        raise NotImplementedError

    def is_noop(self) -> bool:
        raise NotImplementedError

    def _edit(self, x: torch.Tensor, sae) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, sae, model=None) -> None:
        """Raise a one-line UserError for a feature out of the SAE's range or a gene not in the vocabulary."""
        check_features(self.feature_indices(), sae, type(self).__name__)
        if model is not None and isinstance(self.tokens, tuple):
            known = set(map(str, model.genes))
            unknown = [g for g in self.tokens if g not in known]
            if unknown:
                raise UserError(f"{type(self).__name__}(tokens=...): gene {unknown[0]!r} is not in "
                                f"{model.name}'s vocabulary ({len(unknown)} unknown); use the model's symbols")

    def token_mask(self, batch, model=None) -> torch.Tensor:
        """Bool [B, T]: the tokens this intervention edits."""
        mask = batch.mask
        if self.tokens == "all":
            return mask
        sel = mask & (batch.gene_ids >= 0)
        if self.tokens == "expressed":
            sel = sel & (batch.expression.to(sel.device) > 0)
        elif isinstance(self.tokens, tuple):
            if model is None:
                raise UserError("a gene-list token selection needs the model (its gene vocabulary)")
            index = {g: i for i, g in enumerate(map(str, model.genes))}
            ids = torch.tensor([index[g] for g in self.tokens if g in index], device=sel.device)
            sel = sel & torch.isin(batch.gene_ids, ids)
        return sel

    def __call__(self, hidden: torch.Tensor, batch, sae, model=None) -> torch.Tensor | None:
        """The edited block output [B, T, d] (a new tensor), or None if this edit changes nothing."""
        if self.is_noop():
            return None
        sel = self.token_mask(batch, model).to(hidden.device)
        d = hidden.shape[-1]
        if bool(sel.all()):
            return self._edit(hidden.reshape(-1, d), sae).view_as(hidden)
        out = hidden.clone()
        if bool(sel.any()):
            out[sel] = self._edit(hidden[sel], sae)
        return out

    def hook(self, sae, model=None):
        """This edit as a `model.forward(..., hook=)` callable."""
        return lambda hidden, batch: self(hidden, batch, sae, model)

    def recipe(self) -> dict:
        """A JSON-friendly description that rebuilds the intervention (see `from_recipe`)."""
        out = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple) and v and isinstance(v[0], tuple):
                v = {str(k): a for k, a in v}
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def from_recipe(recipe: Mapping) -> Intervention:
    """The intervention that `recipe()` described."""
    kinds = {c.__name__: c for c in (Scale, Add, Clamp, Ablate)}
    r = dict(recipe)
    kind = r.pop("type", None)
    if kind not in kinds:
        raise UserError(f"intervention type {kind!r} unknown; choose one of {', '.join(kinds)}")
    return kinds[kind](**r)


def _pairs(values, where: str, what: str) -> tuple[tuple[int, float], ...]:
    """{feature: number} (or a full [F] vector) -> sorted ((feature, value), ...), every value checked."""
    if isinstance(values, Mapping):
        items = [(_feature(f, where), v) for f, v in values.items()]
    elif isinstance(values, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(values, str):
        arr = values.detach().cpu().tolist() if isinstance(values, torch.Tensor) else list(np.asarray(values))
        if arr and isinstance(arr[0], (tuple, list)):  # already ((feature, value), ...) pairs
            items = [(_feature(f, where), v) for f, v in arr]
        else:
            items = list(enumerate(arr))
    else:
        raise UserError(f"{where}: give a dict {{feature: {what}}} or a full vector with one {what} per "
                        f"feature; got {type(values).__name__}")
    return tuple(sorted((f, _finite(v, f"{where}: {what} of feature {f}")) for f, v in items))


@dataclasses.dataclass(frozen=True)
class Scale(Intervention):
    """x' = W_dec^T (alpha * z) + b_pre + e(x) ([Y]), computed as x + W_dec^T ((alpha - 1) * z).

    alphas: {feature: alpha}, or a full vector with one alpha per feature; unnamed features keep alpha = 1.
    encode: the SAE's encode rule (see `encode`)."""

    alphas: object = dataclasses.field(default_factory=dict)
    tokens: object = "all"
    encode: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "alphas", _pairs(self.alphas, "Scale", "alpha"))
        object.__setattr__(self, "tokens", _tokens(self.tokens))
        if self.encode not in ENCODE_MODES:
            raise UserError(f"Scale(encode={self.encode!r}): choose one of {', '.join(ENCODE_MODES)}")

    def steered(self) -> tuple[tuple[int, float], ...]:
        return tuple((f, a) for f, a in self.alphas if a != 1.0)

    def feature_indices(self) -> list[int]:
        return [f for f, _ in self.alphas]

    def is_noop(self) -> bool:
        return not self.steered()

    def alpha_vector(self, sae, device=None) -> torch.Tensor:
        alpha = torch.ones(n_features(sae), dtype=sae.W_dec.dtype, device=device or sae.W_dec.device)
        for f, a in self.steered():
            alpha[f] = a
        return alpha

    def _edit(self, x, sae):
        code = encode(sae, x, self.encode)
        delta = scale_delta(code, self.alpha_vector(sae, x.device), sae.W_dec.detach(), sae.cfg.backend)
        return x + delta.to(x.dtype)


@dataclasses.dataclass(frozen=True)
class Add(Intervention):
    """x' = x + sum_i a_i W_dec[i] at the selected tokens (no encode; a = 0 is a no-op)."""

    coefficients: object = dataclasses.field(default_factory=dict)
    tokens: object = "all"

    def __post_init__(self):
        object.__setattr__(self, "coefficients", _pairs(self.coefficients, "Add", "coefficient"))
        object.__setattr__(self, "tokens", _tokens(self.tokens))

    def feature_indices(self) -> list[int]:
        return [f for f, _ in self.coefficients]

    def is_noop(self) -> bool:
        return all(a == 0 for _, a in self.coefficients)

    def _edit(self, x, sae):
        feats = [f for f, a in self.coefficients if a != 0]
        W = sae.W_dec.detach()
        a = torch.tensor([a for _, a in self.coefficients if a != 0], dtype=W.dtype, device=W.device)
        return x + (a @ W[feats]).to(x.dtype)


@dataclasses.dataclass(frozen=True)
class Clamp(Intervention):
    """Where feature i (of `features`) is active, set z_i := value, and decode ([P]; value -2 by default).

    error_term False ([P]'s code): x' = W_dec^T z' + b_pre, the reconstruction replaces x at the selected
    tokens. True: x' = x + W_dec^T (z' - z). encode: "batch" ([P]'s code: BatchTopK over the selected tokens
    of the batch) or "threshold" for BatchTopK / Matryoshka SAEs; other SAEs use their own rule. An empty
    feature list is no edit at all (not even the reconstruction)."""

    features: object = ()
    value: float = -2.0
    tokens: object = "all"
    error_term: bool = False
    encode: str = "batch"

    def __post_init__(self):
        name = type(self).__name__
        if isinstance(self.features, (str, bytes)) or not isinstance(self.features, (Sequence, np.ndarray,
                                                                                       torch.Tensor, set)):
            raise UserError(f"{name}(features={self.features!r}): give a list of feature indices")
        feats = [self.features] if np.ndim(self.features) == 0 and not isinstance(self.features, set) else \
            list(self.features)
        object.__setattr__(self, "features", tuple(dict.fromkeys(_feature(f, name) for f in feats)))
        object.__setattr__(self, "value", _finite(self.value, f"{name}: value"))
        object.__setattr__(self, "tokens", _tokens(self.tokens))
        object.__setattr__(self, "error_term", bool(self.error_term))
        if self.encode not in ENCODE_MODES:
            raise UserError(f"{name}(encode={self.encode!r}): choose one of {', '.join(ENCODE_MODES)}")

    def feature_indices(self) -> list[int]:
        return list(self.features)

    def is_noop(self) -> bool:
        return not self.features

    def _edit(self, x, sae):
        code = encode(sae, x, self.encode)
        W = sae.W_dec.detach()
        lut = torch.zeros(n_features(sae), dtype=torch.bool, device=code.indices.device)
        lut[list(self.features)] = True
        hit = lut[code.indices] & (code.values != 0)  # active pairs of the clamped features
        new = torch.where(hit, torch.full_like(code.values, self.value), code.values)
        if self.error_term:
            return x + ops.sparse_decode(code.indices, new - code.values, W, backend=sae.cfg.backend).to(x.dtype)
        return (ops.sparse_decode(code.indices, new, W, backend=sae.cfg.backend) + sae.b_pre.detach()).to(x.dtype)


@dataclasses.dataclass(frozen=True)
class Ablate(Clamp):
    """Clamp to 0: the features' contributions are removed where they are active."""

    value: float = 0.0

    def __post_init__(self):
        if self.value != 0:
            raise UserError(f"Ablate(value={self.value}): Ablate clamps to 0; use Clamp for another value")
        super().__post_init__()


__all__ = ["Ablate", "Add", "Clamp", "Intervention", "Scale", "encode", "from_recipe", "scale_delta"]
