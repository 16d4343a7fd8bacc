"""The SAE family: TopK, BatchTopK, ReLU (L1), Gated and Matryoshka sparse autoencoders.

All share one layout (SPEC §1), so checkpoints, steering and interpretation treat them alike:

    W_enc [F, d], b_enc [F]   encoder (row f reads feature f)
    W_dec [F, d]              decoder, rows = feature directions, kept at unit norm
    b_pre [d]                 pre-encoder bias = decoder bias: x_hat = W_dec^T z + b_pre; encode sees x-b_pre

`encode(x)` always returns a `SparseCode(indices [N, k'], values [N, k'])`; `decode(code)` maps it back to [N,
d]; `forward(x)` is `(decode(encode(x)), code)`. k' is k for TopK; for the codes whose row counts vary
(BatchTopK, Matryoshka, and the dense-by-nature ReLU / Gated SAEs) the code is padded to the largest active
count in the batch with value-0 entries, so `code.values != 0` marks the real ones.

`loss(x)` is the training objective as a `SAELoss` NamedTuple. Every term is a mean over the tokens of the
batch (of a per-token sum over d), so averaging gradients over data-parallel ranks equals one big-batch step.

Encoder trick: W_enc (x - b_pre) + b_enc = W_enc x + (b_enc - W_enc b_pre). The sparse kernels then see the
raw x (no [N, d] copy, no gradient through x) and b_pre still gets its exact encoder gradient, -W_enc^T (d
loss/d b_enc), through a tiny [F, d] matrix-vector product.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as nnf
from torch import nn

from sae_fast import ops
from sae_fast.config import option
from sae_fast.errors import UserError
from sae_fast.ops import SparseCode

ARCHS = ("topk", "batchtopk", "relu", "gated", "matryoshka")


@dataclasses.dataclass
class SAEConfig:
    """Sparse autoencoder architecture (SPEC §1). Defaults follow [Y]: TopK, 8x, k = 32."""

    arch: str = option("topk", "SAE architecture: topk ([Y]), batchtopk ([P]), relu (L1 penalty), gated "
                       "(Rajamanoharan et al. 2024) or matryoshka (Bussmann et al. 2025, BatchTopK inside)",
                       choices=ARCHS)
    d_in: int | None = option(None, "input width d (the model's hidden size); None = infer from the data")
    n_features: int | None = option(None, "dictionary size F; None = expansion * d_in")
    expansion: int = option(8, "F = expansion * d_in when n_features is not given ([Y]: 8, 640 -> 5120)")
    k: int = option(32, "active features per token for topk; their mean per token for batchtopk and "
                    "matryoshka (a batch keeps k * batch_size values) ([Y]: 32; [P]: 10 or 20)")
    relu: bool = option(True, "topk: apply ReLU to the kept values; --no-relu keeps them signed ([Y]'s code)")
    l1_coeff: float = option(1e-2, "relu/gated: weight lambda of the L1 penalty lambda * sum_i z_i "
                             "||W_dec,i||; in units of activation (each active z shrinks by about lambda/2), "
                             "so scale it with your data")
    matryoshka_prefixes: list[int] | None = option(
        None, "matryoshka: nested dictionary sizes m_1 < ... < F whose prefixes must each reconstruct x; "
        "None = F/16, F/8, F/4, F/2, F")
    aux_k: int | None = option(None, "AuxK: how many dead latents reconstruct the residual; None = d_in / 2")
    aux_coeff: float = option(1 / 32, "AuxK loss weight (Gao et al. 2024: 1/32); 0 disables it")
    threshold_beta: float = option(0.99, "batchtopk/matryoshka: decay of the inference threshold theta, a "
                                   "bias-corrected moving average of each batch's smallest kept value (weights "
                                   "beta^age: about the last 1/(1-beta) steps) (Bussmann et al., SAELens: 0.99)")
    dead_tokens: int = option(10_000_000, "a latent is dead after this many training tokens without firing")
    backend: str = option("auto", "sparse kernel backend for sae_fast.ops (auto: triton on CUDA, cpp on CPU)",
                          choices=ops.BACKENDS)

    def resolved(self, d_in: int | None = None) -> SAEConfig:
        """A copy with d_in, n_features, aux_k and the Matryoshka prefixes filled in and checked."""
        d = self.d_in if self.d_in is not None else d_in
        if d is None or d < 1:
            raise UserError(f"SAE d_in = {d!r}: give a positive input width (or let the trainer infer it)")
        F = self.n_features if self.n_features is not None else self.expansion * d
        if self.arch not in ARCHS:
            raise UserError(f"SAE arch = {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if F < 1:
            raise UserError(f"SAE n_features = {F}: must be positive (or set expansion >= 1)")
        if not 0 <= self.threshold_beta < 1:
            raise UserError(f"SAE threshold_beta = {self.threshold_beta}: must be in [0, 1)")
        if self.arch in ("topk", "batchtopk", "matryoshka") and not 1 <= self.k <= F:
            raise UserError(f"SAE k = {self.k}: must be between 1 and n_features = {F}")
        prefixes = None
        if self.arch == "matryoshka":
            prefixes = self.matryoshka_prefixes or [F // 16, F // 8, F // 4, F // 2, F]
            prefixes = sorted({int(m) for m in prefixes if int(m) > 0} | {F})
            if prefixes[-1] != F:
                raise UserError(f"matryoshka_prefixes {self.matryoshka_prefixes}: sizes must be <= "
                                f"n_features = {F}")
        return dataclasses.replace(self, d_in=d, n_features=F, matryoshka_prefixes=prefixes,
                                   aux_k=self.aux_k if self.aux_k is not None else max(1, d // 2))


class SAELoss(NamedTuple):
    """One training step's objective and its parts (all means over the batch's tokens)."""

    loss: torch.Tensor  # what to backpropagate
    mse: torch.Tensor  # mean over tokens of ||x - x_hat||^2 (for Matryoshka: of the full dictionary)
    aux: torch.Tensor  # AuxK (dead latents), Gated's auxiliary reconstruction, or 0
    sparsity: torch.Tensor  # L1 term (relu/gated), else 0
    code: SparseCode


def geometric_median(x: torch.Tensor, iters: int = 20, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm in float64: the point minimising the sum of Euclidean distances to the rows of "
      "x."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


def _pad_dense(z: torch.Tensor) -> SparseCode:
    """A dense non-negative code [N, F] as a SparseCode padded to the largest active count in the batch."""
    width = int((z != 0).sum(1).max()) if z.shape[0] else 0
    values, indices = z.topk(max(width, 1), dim=1)
    return SparseCode(indices, values)


class _MeanSquaredNorm(torch.autograd.Function):
    """mean over rows of ||r||^2, keeping only r itself for backward, where r's buffer becomes the gradient
    2 r / N in place. With r = x_hat - x computed in x_hat's buffer, the loss adds no [N, d] temporaries (the
    TopK-style losses use ops.sparse_mse, which needs no gradient buffer at all)."""

    @staticmethod
    def forward(ctx, r):
        ctx.save_for_backward(r)
        flat = r.reshape(-1)
        return torch.dot(flat, flat) / max(r.shape[0], 1)

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return r.mul_(2 * g / max(r.shape[0], 1))


def _mean_sq(r: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||r||^2 (sum over d). Consumes r: its buffer is reused for the gradient."""
    return _MeanSquaredNorm.apply(r)


def _sq_err(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the squared reconstruction error summed over d."""
    return _mean_sq(x_hat - x)


class SparseAutoencoder(nn.Module):
    """Base class: parameters, decode, the decoder-norm constraint, dead-latent bookkeeping and AuxK."""

    arch = ""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg = cfg.resolved()
        self.cfg = cfg
        d, F = cfg.d_in, cfg.n_features
        W_dec = nnf.normalize(torch.randn(F, d), dim=1)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())  # W_enc = W_dec^T as maps, i.e. the same [F, d] array
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.b_pre = nn.Parameter(torch.zeros(d))
        # Training state (not part of the SAELens weights file): tokens since each latent last fired.
        self.register_buffer("tokens_since_fired", torch.zeros(F, dtype=torch.long), persistent=False)

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> SparseAutoencoder:
        """Build the architecture named by cfg.arch."""
        cfg = cfg.resolved()
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                  if f.name not in ("arch", "d_in", "n_features", "expansion")}
        return ARCH_CLASSES[cfg.arch](cfg.d_in, cfg.n_features, **fields)

    # --- the sparse code ------------------------------------------------------------------------------------

    def _b_eff(self) -> torch.Tensor:
        """b_enc - W_enc b_pre: the encoder bias for the raw input (see the module docstring)."""
        return self.b_enc - self.W_enc @ self.b_pre

    def encode(self, x: torch.Tensor) -> SparseCode:
        raise NotImplementedError

    def decode(self, code: SparseCode) -> torch.Tensor:
        """x_hat = W_dec^T z + b_pre, touching only the active features."""
        x_hat = ops.sparse_decode(code.indices, code.values, self.W_dec, backend=self.cfg.backend)
        return x_hat.add_(self.b_pre)  # in place: no second [N, d] buffer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
        code = self.encode(x)
        return self.decode(code), code

    def loss(self, x: torch.Tensor) -> SAELoss:
        """Reconstruction MSE plus AuxK on dead latents (TopK-style SAEs; ReLU and Gated override this)."""
        code = self.encode(x)
        mse, residual = ops.sparse_mse(code.indices, code.values, self.W_dec, self.b_pre, x,
                                       backend=self.cfg.backend)  # residual = x_hat - x
        aux = self.aux_loss(x, residual)
        return SAELoss(mse + self.cfg.aux_coeff * aux, mse, aux, mse.new_zeros(()), code)

    # --- training-time helpers ------------------------------------------------------------------------------

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @torch.no_grad()
    def mark_fired(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Advance the dead-latent clocks by n_tokens and reset the ones of features with fired[f] True."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    def aux_loss(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """AuxK (Gao et al. 2024): the top aux_k dead latents reconstruct the error x - x_hat = -residual.

        Scaled by min(n_dead / aux_k, 1) as in SAELens / sparsify, so a handful of dead latents gets a small
        push. Costs nothing while no latent is dead (the usual case)."""
        dead = self.dead_mask
        n_dead = int(dead.sum())
        if not self.training or n_dead == 0 or self.cfg.aux_coeff == 0:
            return x.new_zeros(())
        k_aux = min(self.cfg.aux_k, n_dead)
        rows = dead.nonzero().squeeze(1)
        sub = ops.topk_encode(x, self.W_enc[rows], self._b_eff()[rows], k_aux, relu=True,
                              backend=self.cfg.backend)
        e_hat = ops.sparse_decode(rows[sub.indices], sub.values, self.W_dec, backend=self.cfg.backend)
        return min(n_dead / self.cfg.aux_k, 1.0) * _mean_sq(e_hat + residual.detach())

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the component of each decoder row's gradient along the row (call before optimizer.step())."""
        W, g = self.W_dec, self.W_dec.grad
        if g is not None:  # g -= <g_f, w_f> w_f, without an [F, d] temporary
            g.addcmul_(W, torch.linalg.vecdot(g, W)[:, None], value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Put every decoder row back on the unit sphere (call after optimizer.step())."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min_(1e-12))

    @torch.no_grad()
    def init_b_pre(self, sample: torch.Tensor) -> None:
        """b_pre := geometric median of a sample of inputs (Weiszfeld, float64)."""
        self.b_pre.copy_(geometric_median(sample).to(self.b_pre))

    def save(self, path) -> None:
        """Write `sae_weights.safetensors` + `cfg.json` (SAELens-compatible names) to the directory `path`."""
        from sae_fast.sae.checkpoint import save_sae

        save_sae(self, path)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"d_in={c.d_in}, n_features={c.n_features}, k={c.k}" if self.arch != "relu" else \
            f"d_in={c.d_in}, n_features={c.n_features}, l1_coeff={c.l1_coeff}"


class TopKSAE(SparseAutoencoder):
    """z = TopK_k(W_enc (x - b_pre) + b_enc), then ReLU (relu=False keeps signed values, as [Y]'s code)."""

    arch = "topk"

    def __init__(self, d_in: int, n_features: int, k: int = 32, **options):
        super().__init__(SAEConfig(arch=self.arch, d_in=d_in, n_features=n_features, k=k, **options))

    def encode(self, x: torch.Tensor) -> SparseCode:
        return ops.topk_encode(x, self.W_enc, self._b_eff(), self.cfg.k, relu=self.cfg.relu,
                               backend=self.cfg.backend)


class BatchTopKSAE(SparseAutoencoder):
    """Bussmann et al. 2024: keep the k*B largest of relu(pre) over a batch of B tokens (k per token on
    average).

    At inference (eval mode) a per-token rule replaces the batch rule: keep pre > theta, where theta is the
    bias-corrected moving average (Adam's correction; decay beta = threshold_beta) of the smallest value kept per
    training batch: sum_t beta^(T-t) m_t / sum_t beta^(T-t). Without the correction (theta started at the first
    batch's m_1 and moved by (1 - beta) per step) the untrained first batch kept a weight beta^(T-1): at
    beta = 0.999 a run of a few hundred steps ended with theta near its random-init value, and eval kept half
    the features training did. Under torch.distributed each rank selects within its own batch and theta follows
    the mean over ranks of their smallest kept values. theta may also be one value per feature (a JumpReLU SAE
    loaded from SAELens); values are relu(pre) kept where pre > theta, as in SAELens' JumpReLU."""

    arch = "batchtopk"

    def __init__(self, d_in: int, n_features: int, k: int = 32, **options):
        super().__init__(SAEConfig(arch=self.arch, d_in=d_in, n_features=n_features, k=k, **options))
        self._init_threshold()

    def _init_threshold(self) -> None:
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0 until the first training batch sets it
        # sum_t (1 - beta) beta^(T-t): the weight theta's average has accumulated (0: not yet learned)
        self.register_buffer("threshold_weight", torch.tensor(0.0))

    def threshold_learned(self) -> bool:
        """Whether eval-mode encode uses the threshold (else the batch rule): after any training batch, or for
        a threshold loaded from a checkpoint."""
        return bool(self.threshold_weight > 0)

    def encode(self, x: torch.Tensor) -> SparseCode:
        if self.training or not self.threshold_learned():
            return ops.batch_topk_encode(x, self.W_enc, self._b_eff(), self.cfg.k, relu=True,
                                         backend=self.cfg.backend)
        theta = self.threshold.clamp_min(0)
        return ops.threshold_encode(x, self.W_enc, self._b_eff(), theta if theta.dim() else float(theta),
                                    backend=self.cfg.backend)

    @torch.no_grad()
    def update_threshold(self, code: SparseCode) -> None:
        """Fold this batch's smallest positive kept value m into theta: with w the accumulated weight,
        theta <- (beta w theta + (1 - beta) m) / (beta w + 1 - beta), w <- beta w + 1 - beta (the first batch
        sets theta = m)."""
        pos = code.values[code.values > 0]
        smallest = pos.min() if pos.numel() else self.threshold.new_zeros(())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(smallest)
            smallest /= torch.distributed.get_world_size()
        beta = self.cfg.threshold_beta
        old = beta * self.threshold_weight
        self.threshold_weight.copy_(old + (1 - beta))
        self.threshold.copy_((old * self.threshold + (1 - beta) * smallest) / self.threshold_weight)

    def loss(self, x: torch.Tensor) -> SAELoss:
        out = super().loss(x)
        if self.training:
            self.update_threshold(out.code)
        return out


class MatryoshkaSAE(BatchTopKSAE):
    """Bussmann et al. 2025: a BatchTopK SAE whose dictionary prefixes W_dec[:m] (m in matryoshka_prefixes)
    must each reconstruct x on their own, so early features learn general concepts and later ones refine them.

    Loss = mean over prefixes m of ||x - (W_dec[:m]^T z[:m] + b_pre)||^2 (the paper's sum divided by the
    number of prefixes, keeping the scale of the other architectures) + AuxK. Each prefix reconstruction is a
    cumulative sum of per-group sparse decodes, so nothing dense is formed."""

    arch = "matryoshka"

    def __init__(self, d_in: int, n_features: int, k: int = 32, **options):
        SparseAutoencoder.__init__(self, SAEConfig(arch=self.arch, d_in=d_in, n_features=n_features, k=k,
                                                   **options))
        self._init_threshold()

    def loss(self, x: torch.Tensor) -> SAELoss:
        code = self.encode(x)
        x_hat = self.b_pre.expand_as(x)
        start, losses = 0, []
        for end in self.cfg.matryoshka_prefixes:
            in_group = (code.indices >= start) & (code.indices < end)
            x_hat = x_hat + ops.sparse_decode(code.indices, code.values * in_group, self.W_dec,
                                              backend=self.cfg.backend)
            losses.append(_sq_err(x, x_hat))
            start = end
        mse = losses[-1]
        aux = self.aux_loss(x, x_hat - x)
        if self.training:
            self.update_threshold(code)
        total = torch.stack(losses).mean() + self.cfg.aux_coeff * aux
        return SAELoss(total, mse, aux, mse.new_zeros(()), code)


class ReLUSAE(SparseAutoencoder):
    """The standard SAE: z = relu(W_enc (x - b_pre) + b_enc), loss = MSE + l1_coeff * sum_i z_i ||W_dec,i||.

    The decoder rows are unit-norm, so the norm factor is 1 (and its gradient, parallel to the row, is removed
    by the constraint anyway). Its code is dense by nature: training uses dense matrices; encode() pads."""

    arch = "relu"

    def __init__(self, d_in: int, n_features: int, **options):
        super().__init__(SAEConfig(arch=self.arch, d_in=d_in, n_features=n_features, **options))

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(nnf.linear(x, self.W_enc, self._b_eff()))

    def encode(self, x: torch.Tensor) -> SparseCode:
        return _pad_dense(self._dense(x))

    def loss(self, x: torch.Tensor) -> SAELoss:
        z = self._dense(x)
        x_hat = z @ self.W_dec + self.b_pre
        mse = _sq_err(x, x_hat)
        l1 = z.sum(1).mean()
        with torch.no_grad():
            code = _pad_dense(z)
        return SAELoss(mse + self.cfg.l1_coeff * l1, mse, mse.new_zeros(()), l1, code)


class GatedSAE(SparseAutoencoder):
    """Rajamanoharan et al. 2024. With u = W_enc (x - b_pre) (W_enc = W_gate):

        gate:      pi_gate = u + b_enc,                 f_gate = 1[pi_gate > 0]
        magnitude: pi_mag  = exp(r_mag) * u + b_mag,    f_mag  = relu(pi_mag)   (W_mag = exp(r_mag) W_gate)
        z = f_gate * f_mag;  x_hat = W_dec^T z + b_pre

    loss = ||x - x_hat||^2 + l1_coeff * sum relu(pi_gate) + ||x - (W_dec^T relu(pi_gate) + b_pre)||^2, the
    last with W_dec and b_pre frozen (it trains the gate, which the Heaviside step does not)."""

    arch = "gated"

    def __init__(self, d_in: int, n_features: int, **options):
        super().__init__(SAEConfig(arch=self.arch, d_in=d_in, n_features=n_features, **options))
        self.r_mag = nn.Parameter(torch.zeros(self.cfg.n_features))
        self.b_mag = nn.Parameter(torch.zeros(self.cfg.n_features))

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = nnf.linear(x, self.W_enc, -(self.W_enc @ self.b_pre))
        pi_gate = u + self.b_enc
        z = (pi_gate > 0) * torch.relu(self.r_mag.exp() * u + self.b_mag)
        return pi_gate, z

    def encode(self, x: torch.Tensor) -> SparseCode:
        return _pad_dense(self._paths(x)[1])

    def loss(self, x: torch.Tensor) -> SAELoss:
        pi_gate, z = self._paths(x)
        x_hat = z @ self.W_dec + self.b_pre
        mse = _sq_err(x, x_hat)
        gate = torch.relu(pi_gate)
        l1 = gate.sum(1).mean()
        aux = _sq_err(x, gate @ self.W_dec.detach() + self.b_pre.detach())
        with torch.no_grad():
            code = _pad_dense(z)
        return SAELoss(mse + self.cfg.l1_coeff * l1 + aux, mse, aux, l1, code)


ARCH_CLASSES: dict[str, type[SparseAutoencoder]] = {
    "topk": TopKSAE, "batchtopk": BatchTopKSAE, "relu": ReLUSAE, "gated": GatedSAE,
    "matryoshka": MatryoshkaSAE,
}
