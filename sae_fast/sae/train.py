"""The SAE trainer: Adam + linear warmup + cosine decay, decoder-norm constraint, AuxK, exact resume.

    sae = train_sae(batches, arch="topk", k=32, epochs=10, out_dir="runs/sae")  # batches: [n, d] tensors
    sae = train_sae(model=m, adata=a, layer=12)  # fused: tokens straight from the model's forward pass

Data. `source` is any re-iterable of [n, d] tensors (or arrays): a list, a DataLoader, a `ShardLoader`, or a
function returning a fresh iterator. One pass over it is an epoch. The trainer re-batches the stream into
steps of exactly `batch_size` rows (the last step of an epoch takes the remainder), so the optimisation does
not depend on how the source happens to chunk its data. A source with `set_epoch(e)` is told the epoch before
each pass.

Schedule length. The cosine runs over `max_steps` if given, else over epochs * ceil(tokens per epoch /
batch_size). Tokens per epoch come from `source.n_tokens`, a tensor's or a list's row count, or else one
counting pass over the source (avoid it for expensive sources by giving `max_steps` or an `n_tokens`
attribute).

Checkpoints (out_dir). Every `checkpoint_every` steps and at the end, `trainer_state.pt` (one file, written to
a temp name and renamed) holds the weights, Adam and scheduler state, the dead-latent clocks, RNG states, and
the data position (epoch, batches consumed in it, plus the RNG state at the epoch's start);
`sae_weights.safetensors` + `cfg.json` hold the SAE for `load_sae`, and `metrics.jsonl` the logged metrics.
Calling `train_sae` again with the same settings and out_dir resumes: it restores the state, replays the
current epoch's data position without computing (re-iterating the source, skipping consumed batches) and
continues; the result is bitwise identical to an uninterrupted run on the CPU (same seed, same data, same
threads).

Distributed. If torch.distributed is initialised, gradients are averaged over ranks after backward, weighted
by each rank's token count, and the dead-latent firing counts are summed, so N ranks with parts of a batch take
the same step as one process with the whole batch. The ranks agree on every step (`distributed.lockstep`: one
tiny all-reduce per step): an epoch ends on all ranks when the first runs out of batches, so ranks whose
sources hold different token counts (fused training with expressed tokens) stay in step; the surplus rows of
the other ranks are left out of that epoch. Only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from sae_fast.activations import distributed
from sae_fast.config import build, option
from sae_fast.errors import UserError
from sae_fast.sae.modules import SAEConfig, SparseAutoencoder
from sae_fast.utils import atomic_path, progress

STATE = "trainer_state.pt"
LOG = "metrics.jsonl"
# Settings that may change between a run and its resume without changing the result.
_RUNTIME_FIELDS = {"out_dir", "checkpoint_every", "log_every", "device", "backend"}


@dataclasses.dataclass
class TrainConfig(SAEConfig):
    """Training a sparse autoencoder (SPEC §1). Defaults follow Yanovsky & Chernomoretz [Y], except batch_size:
    8,192 tokens is Pedrocchi et al.'s [P] step; [Y]'s step is 8 whole cells, i.e. 8 x tokens per cell."""

    lr: float = option(1e-3, "Adam learning rate (peak, after warmup) ([Y], [P]: 1e-3; [P] large data: 1e-4)",
                       bounds="(0, inf)")
    warmup_steps: int = option(0, "linear learning-rate warmup steps before the cosine decay to 0",
                              bounds="[0, inf)")
    epochs: int = option(10, "passes over the data ([Y]: 10)", bounds="[1, inf)")
    batch_size: int = option(8192, "tokens per optimisation step; the source stream is re-batched to this "
                             "size (default [P]'s 8192; [Y]: batches of 8 whole cells, 8 x 19,264 = 154,112 "
                             "tokens for AIDO.Cell)", bounds="[1, inf)")
    seed: int = option(0, "random seed (initial weights; also seeds torch's global RNG, e.g. DataLoader "
                       "shuffles)")
    max_steps: int | None = option(None, "stop after this many steps; also the cosine length (None = all "
                                   "epochs)", bounds="[1, inf)")
    out_dir: Path | None = option(None, "directory for checkpoints, the final SAE and metrics.jsonl; an "
                                  "existing run there is resumed (None = keep nothing on disk)")
    checkpoint_every: int = option(1000, "write the full trainer state every this many steps (and at the "
                                   "end)", bounds="[1, inf)")
    log_every: int = option(50, "log MSE, FVU, L0, dead fraction and tokens/s every this many steps",
                           bounds="[1, inf)")
    device: str = option("auto", "torch device for training (auto = cuda if available, else cpu)")

    def sae_config(self) -> SAEConfig:
        return SAEConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SAEConfig)})


class EvalResult(NamedTuple):
    """Reconstruction quality over a whole source."""

    mse: float  # mean over tokens of ||x - x_hat||^2
    fvu: float  # sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    l0: float  # mean number of active features per token
    dead_fraction: float  # features that never fired on this source
    n_tokens: int


# --- data ---------------------------------------------------------------------------------------------------

def _epoch_iter(source, epoch: int):
    if hasattr(source, "set_epoch"):
        source.set_epoch(epoch)
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return iter([source])
    return iter(source()) if callable(source) and not hasattr(source, "__iter__") else iter(source)


def _as_rows(t, d: int | None) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 2 or (d is not None and t.shape[1] != d):
        want = f"[n, {d}]" if d is not None else "[n, d]"
        raise UserError(f"train_sae: the source yielded a batch of shape {list(t.shape)}; expected {want} "
                        f"float activations")
    return t


def _rebatch(it, batch_size: int, d: int | None):
    """Cut a stream of [n_i, d] tensors into [batch_size, d] batches (the last one may be shorter)."""
    held, n_held = [], 0
    for t in it:
        t = _as_rows(t, d)
        held.append(t)
        n_held += t.shape[0]
        if n_held >= batch_size:
            buf = torch.cat(held) if len(held) > 1 else held[0]
            n_out = n_held // batch_size * batch_size
            yield from buf[:n_out].split(batch_size)
            held, n_held = ([buf[n_out:]] if n_out < n_held else []), n_held - n_out
    if n_held:
        yield torch.cat(held)


def _tokens_per_epoch(source) -> int:
    if hasattr(source, "n_tokens"):
        return int(source.n_tokens)
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return int(source.shape[0])
    if isinstance(source, (list, tuple)):
        return sum(int(_as_rows(t, None).shape[0]) for t in source)
    return sum(int(_as_rows(t, None).shape[0]) for t in _epoch_iter(source, 0))


def _check_source(source) -> None:
    if source is None:
        raise UserError("train_sae: give a source of [n, d] activation batches, or model=, adata= and "
                        "layer=")
    if not callable(source) and hasattr(source, "__next__") and iter(source) is source:
        raise UserError("train_sae: the source is a one-shot iterator (e.g. a generator object) and "
                        "cannot be replayed for several epochs or a resume; pass a list, a DataLoader, or a "
                        "function that returns a fresh iterator (e.g. lambda: my_batches())")


# --- RNG and distributed helpers ----------------------------------------------------------------------------

def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _gather_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's [n_r, d] rows, concatenated in rank order: the global first batch, for the b_pre init."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    buf = x.new_zeros(int(max(sizes)), x.shape[1])
    buf[:x.shape[0]] = x
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    return torch.cat([p[:int(m)] for p, m in zip(parts, sizes)])


def _average_grads(params: list[torch.nn.Parameter], n_local: int) -> None:
    """Token-weighted mean of the ranks' gradients, one all-reduce of a flat buffer: sum_r n_r g_r / sum_r n_r.

    Each g_r is the gradient of a mean over rank r's n_r tokens, so this is the gradient of the mean over all
    tokens of the step, whatever each rank's batch size (ranks can hold different counts in a step: the last
    step of an epoch, or fused training, whose per-rank token counts differ)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [grads[0].new_ones(1)]).mul_(n_local)
    dist.all_reduce(flat)
    flat /= flat[-1].clamp_min(1)
    for g, part in zip(grads, flat[:-1].split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


# --- the trainer --------------------------------------------------------------------------------------------

def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def make_optimizer(sae: SparseAutoencoder, lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel (one pass over all parameters) where this torch has it."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):  # fused Adam unsupported on this device/torch: the multi-tensor path
        return torch.optim.Adam(sae.parameters(), lr=lr, foreach=True)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device = {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None


def _comparable(cfg: TrainConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()
            if k not in _RUNTIME_FIELDS}


def _load_state(path: Path, cfg: TrainConfig) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state is a user-facing problem
        raise UserError(f"{path}: unreadable trainer state ({type(e).__name__}: {e}); delete it to start "
                        "over") from None
    stored, now = state["config"], _comparable(cfg)
    diff = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    if diff:
        show = ", ".join(f"{k}: {stored.get(k)!r} there vs {now.get(k)!r} now" for k in diff)
        raise UserError(f"{path.parent}: holds a run with other settings ({show}); use the same settings to "
                        f"resume it, or another out_dir")
    return state


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the killed run got further), and a last
    line the kill cut short."""
    if path.is_file():
        lines = []
        for ln in path.read_text().splitlines():
            try:
                if json.loads(ln)["step"] <= step:
                    lines.append(ln)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn line (the appending process was killed mid-write)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in lines))


def _save(out_dir: Path, sae, opt, sched, cfg, pos: dict) -> None:
    state = {"sae": {k: v.detach().cpu() for k, v in sae.state_dict().items()},
             "tokens_since_fired": sae.tokens_since_fired.cpu(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng": _rng_state(), "config": _comparable(cfg),
             "sae_config": dataclasses.asdict(sae.cfg), **pos}
    with atomic_path(out_dir / STATE) as tmp:
        torch.save(state, tmp)
    sae.save(out_dir)


def train_step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x: torch.Tensor, world: int = 1):
    """One optimisation step on batch x: loss, backward, (all-reduce), decoder constraint, Adam, dead clocks.

    Returns the step's SAELoss. The learning-rate scheduler is the caller's."""
    out = sae.loss(x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if world > 1:
        _average_grads(list(sae.parameters()), x.shape[0])
    sae.remove_parallel_grad()
    opt.step()
    sae.normalize_decoder()
    with torch.no_grad():
        F = sae.cfg.n_features
        # how often each feature fired: a scatter of the [N, k] nonzero flags (no boolean-mask gather)
        fired = (out.code.values != 0).reshape(-1).long()
        counts = torch.zeros(F + 1, dtype=torch.long, device=x.device)
        counts.index_add_(0, out.code.indices.reshape(-1), fired)
        counts[F] = x.shape[0]  # one extra slot carries the token count through the all-reduce
        if world > 1:
            dist.all_reduce(counts)
        sae.mark_fired(counts[:F] > 0, int(counts[F]))
    return out


def train_sae(source=None, config: TrainConfig | None = None, *, model=None, adata=None, layer=None,
              **overrides) -> SparseAutoencoder:
    """Train an SAE on a stream of activations (see the module docstring); returns it in eval mode.

    `overrides` are TrainConfig fields (arch, d_in, n_features or expansion, k, lr, epochs, batch_size, seed,
    out_dir, ...) applied on top of `config`. With `model`, `adata` and `layer` the tokens come straight from
    the model's forward pass (sae_fast.activations.fused) instead of `source`."""
    base = dataclasses.asdict(config) if config is not None else {}
    cfg = build(TrainConfig, {**base, **overrides}, where="train_sae")
    for name in ("epochs", "batch_size", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"train_sae: {name} = {getattr(cfg, name)} must be >= 1")
    if cfg.lr <= 0 or (cfg.max_steps is not None and cfg.max_steps < 1):
        raise UserError(f"train_sae: lr = {cfg.lr} must be > 0 and max_steps = {cfg.max_steps} >= 1 "
                        "(or None)")
    if model is not None:
        from sae_fast.activations.fused import fused_source

        source = fused_source(model, adata, layer, cfg)
    _check_source(source)
    device = _resolve_device(cfg.device)
    rank, world = distributed.world()
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    state_file = out_dir / STATE if out_dir is not None else None
    state = _load_state(state_file, cfg) if state_file is not None and state_file.is_file() else None

    torch.manual_seed(cfg.seed)
    if state is None:
        stream = _rebatch(_epoch_iter(source, 0), cfg.batch_size, cfg.d_in)
        first = next(stream, None)
        stream.close()  # the loader's gather threads stop here, not when the generator happens to be collected
        if first is None:
            raise UserError("train_sae: the source yielded no rows")
        sae = SparseAutoencoder.from_config(cfg.sae_config().resolved(d_in=first.shape[1]))
        sae.init_b_pre(_gather_rows(first.to(device), world) if world > 1 else first)
        total = cfg.max_steps or cfg.epochs * math.ceil(_tokens_per_epoch(source) / cfg.batch_size)
        pos = {"step": 0, "epoch": 0, "consumed": 0, "total_steps": total}
    else:
        sae = SparseAutoencoder.from_config(SAEConfig(**state["sae_config"]))
        sae.load_state_dict(state["sae"])
        sae.tokens_since_fired.copy_(state["tokens_since_fired"])
        pos = {k: state[k] for k in ("step", "epoch", "consumed", "total_steps", "epoch_rng")}
    sae.to(device).train()
    if world > 1 and state is None:
        for t in sae.parameters():  # the sources may have drawn from the RNG unevenly before the init
            dist.broadcast(t.data, 0)
    opt = make_optimizer(sae, cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, pos["total_steps"]))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    writer = rank == 0 and out_dir is not None
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        _trim_log(out_dir / LOG, pos["step"])

    d = sae.cfg.d_in
    bar = progress(total=pos["total_steps"] * cfg.batch_size, desc=f"train {sae.cfg.arch} SAE", unit="tok",
                   unit_scale=True, initial=pos["step"] * cfg.batch_size, disable=rank != 0)
    log_file = open(out_dir / LOG, "a") if writer else None  # noqa: SIM115 - closed in finally
    t_last, tok_last = time.perf_counter(), 0
    try:
        while pos["step"] < pos["total_steps"] and pos["epoch"] < cfg.epochs:
            resuming = state is not None and pos["consumed"] > 0
            if state is not None:  # replay the epoch's start (its source draws), or go straight on
                _set_rng_state(pos["epoch_rng"] if resuming else state["rng"])
            pos["epoch_rng"] = _rng_state()
            batches = _rebatch(_epoch_iter(source, pos["epoch"]), cfg.batch_size, d)
            if world > 1:  # ranks may cut their streams into different numbers of steps: stop with the first
                batches = distributed.lockstep(batches)
            for i, x in enumerate(batches):
                if i < pos["consumed"]:
                    continue
                if resuming:
                    _set_rng_state(state["rng"])
                    resuming = False
                x = x.to(device=device, dtype=torch.float32, non_blocking=True)
                out = train_step(sae, opt, x, world)
                sched.step()
                pos["step"] += 1
                pos["consumed"] = i + 1
                bar.update(x.shape[0])
                tok_last += x.shape[0]
                if pos["step"] % cfg.log_every == 0 or pos["step"] == pos["total_steps"]:
                    now = time.perf_counter()
                    m = _metrics(out, x, sae, sched, pos, tok_last / max(now - t_last, 1e-9))
                    t_last, tok_last = now, 0
                    bar.set_postfix(mse=f"{m['mse']:.4g}", fvu=f"{m['fvu']:.3f}", l0=f"{m['l0']:.1f}",
                                    dead=f"{m['dead_fraction']:.3f}")
                    if log_file is not None:
                        log_file.write(json.dumps(m) + "\n")
                        log_file.flush()
                if writer and pos["step"] % cfg.checkpoint_every == 0:
                    _save(out_dir, sae, opt, sched, cfg, pos)
                if pos["step"] >= pos["total_steps"]:
                    break
            else:
                if resuming:  # the checkpoint closed this epoch: nothing left to replay in it
                    _set_rng_state(state["rng"])
                if pos["consumed"] == 0:
                    raise UserError(f"train_sae: the source yielded no rows in epoch {pos['epoch']}")
                pos["epoch"] += 1
                pos["consumed"] = 0
            batches.close()  # joins the loader's threads (also after a break) before anything else runs
            state = None
        if writer and (pos["step"] % cfg.checkpoint_every or not (out_dir / STATE).is_file()):
            _save(out_dir, sae, opt, sched, cfg, pos)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    return sae.eval()


def _metrics(out, x, sae, sched, pos, tokens_per_s) -> dict:
    with torch.no_grad():
        var = (x - x.mean(0)).pow(2).sum()
        err = out.mse * x.shape[0]
        return {"step": pos["step"], "epoch": pos["epoch"], "loss": float(out.loss), "mse": float(out.mse),
                "fvu": float(err / var.clamp_min(1e-30)),
                "l0": float((out.code.values != 0).sum(1).float().mean()),
                "dead_fraction": float(sae.dead_mask.float().mean()), "aux": float(out.aux),
                "lr": sched.get_last_lr()[0], "tokens_per_s": tokens_per_s}


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, source, batch_size: int = 8192) -> EvalResult:
    """Stream `source` through the SAE in eval mode: MSE, FVU (against the source's own mean), L0, and the
    fraction of features that never fire."""
    _check_source(source)
    was_training = sae.training
    sae.eval()
    dev = sae.W_dec.device
    F, d = sae.cfg.n_features, sae.cfg.d_in
    n, sq_err, active = 0, 0.0, 0
    s1 = torch.zeros(d, dtype=torch.float64, device=dev)
    s2 = torch.zeros((), dtype=torch.float64, device=dev)
    fired = torch.zeros(F, dtype=torch.bool, device=dev)
    try:
        for x in _rebatch(_epoch_iter(source, 0), batch_size, d):
            x = x.to(device=dev, dtype=torch.float32)
            x_hat, code = sae(x)
            sq_err += float((x_hat - x).double().pow(2).sum())
            nz = code.values != 0
            active += int(nz.sum())
            fired[code.indices[nz]] = True
            s1 += x.double().sum(0)
            s2 += x.double().pow(2).sum()
            n += x.shape[0]
    finally:
        sae.train(was_training)
    if n == 0:
        raise UserError("evaluate: the source yielded no rows")
    total_var = float(s2 - s1.pow(2).sum() / n)
    dead = 1 - float(fired.float().mean())
    return EvalResult(sq_err / n, sq_err / max(total_var, 1e-30), active / n, dead, n)
