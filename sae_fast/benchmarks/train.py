"""`sae-fast bench train`: one full TopK SAE training step, ours vs a dense PyTorch step vs EleutherAI
sparsify.

A step = forward, backward, decoder-gradient projection, Adam, decoder renormalisation, on the same batch
(fp32; d=640, F=5120, k=32, N=4096 by default, as [Y]'s AIDO.Cell-100M SAE). Rows:

* reference: the dense step (encoder Linear, torch.topk, scatter into a dense [N, F] code, decoder Linear,
  autograd, torch Adam); speedup = reference / ours.
* floor: the bare encoder GEMM x W_enc^T at the same N, the work no TopK SAE step can skip;
  `floor_ratio` = ours / floor (1.0 would be perfect).
* sparsify: EleutherAI sparsify's SparseCoder (TopK, expansion 8, k 32) step on the same batch: its forward
  (fvu loss), backward, its decoder-gradient projection, torch Adam, its renormalisation.
* dictionary_learning / sae_lens: not installed here (their dependencies would replace torch or add ~40
  packages); their rows say so (NOT_INSTALLED).

Peak memory: one step at N=32,768 for ours and for the dense reference, each in a fresh process
(`peak_rss_of`), reported as bytes and as the ratio ours / reference (goal: <= 1/3), and as `memory_ratio_net`
after removing the constant both pay for importing torch's optimizer machinery (`optimizer_import_bytes`).

What should move, and by how much (d=640, F=5120, k=32, N=4096): the encoder GEMM is 2NdF = 13.4 GFLOP. The
dense step does five such GEMMs (encoder forward, decoder forward, decoder backward for dz and dW_dec, encoder
backward for dW_enc) plus topk and [N, F] scatters, i.e. >= 5x the floor. Ours does one GEMM (chunked, fused
with the top-k selection) and sparse work of ~N k d = 84 MFLOP per kernel (decode, its two gradients, the
encoder gradient), plus Adam over 2 x 3.3M parameters (fused, one pass) and two O(F d) passes for the decoder
constraint: expect ~1.3x the floor, so ~3.5-4x faster than dense. Memory: dense holds several [N, F] fp32
matrices (671 MB each at N=32,768); ours holds [N, k] codes and one chunk of pre-activations.
"""

from __future__ import annotations

import importlib.util

import torch

from sae_fast.benchmarks.common import device_name, peak_rss_of, record, time_fn

# Peers we tried to install (pip install --dry-run, Nov 2026) and did not, to keep the environment intact.
NOT_INSTALLED = {
    "sae_lens": "not installed: `pip install sae-lens` (6.54) pulls ~40 packages into the environment "
                "(transformer-lens, wandb, opentelemetry, nltk, plotly, ...)",
    "dictionary_learning": "not installed: `pip install dictionary-learning` (0.1.0) would replace torch "
                           "with "
                           "torch 2.14.1 + CUDA 13 wheels (several GB) and add nnsight, diffusers, wandb",
}


def _sizes(quick: bool) -> dict:
    if quick:
        return {"d": 64, "F": 512, "k": 8, "N": 512, "N_mem": 2048}
    return {"d": 640, "F": 5120, "k": 32, "N": 4096, "N_mem": 32768}


class DenseTopK(torch.nn.Module):
    """The plain-PyTorch TopK SAE a user would write: everything dense."""

    def __init__(self, d: int, F: int, k: int):
        super().__init__()
        self.k = k
        self.encoder = torch.nn.Linear(d, F)
        self.decoder = torch.nn.Linear(F, d)
        with torch.no_grad():
            W = torch.nn.functional.normalize(torch.randn(F, d), dim=1)
            self.decoder.weight.copy_(W.T)
            self.encoder.weight.copy_(W)
            self.encoder.bias.zero_()
            self.decoder.bias.zero_()

    def step(self, opt, x):
        pre = self.encoder(x - self.decoder.bias)
        v, i = pre.topk(self.k, dim=1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, i, v.relu())
        loss = (self.decoder(z) - x).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W, g = self.decoder.weight, self.decoder.weight.grad  # columns are the features here
            g.sub_((g * W).sum(0, keepdim=True) * W)
        opt.step()
        with torch.no_grad():
            W.div_(W.norm(dim=0, keepdim=True))


def _ours(s, device):
    from sae_fast import TopKSAE
    from sae_fast.sae.train import make_optimizer, train_step

    sae = TopKSAE(s["d"], s["F"], s["k"]).to(device)
    opt = make_optimizer(sae, 1e-3)
    return lambda x: train_step(sae, opt, x)


def _dense(s, device):
    ref = DenseTopK(s["d"], s["F"], s["k"]).to(device)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    return lambda x: ref.step(opt, x)


def _sparsify(s, device):
    import sparsify.sparse_coder
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.utils import eager_decode

    if device == "cpu":  # its Triton decoder needs a GPU; on the CPU sparsify's own fallback is embedding_bag
        sparsify.sparse_coder.decoder_impl = eager_decode
    sae = SparseCoder(s["d"], SparseCoderConfig(expansion_factor=s["F"] // s["d"], k=s["k"]), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)

    def step(x):
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


_MEM_CODE = {
    "ours": "from sae_fast.benchmarks.train import _ours\nstep = _ours({s!r}, 'cpu')\n",
    "reference": "from sae_fast.benchmarks.train import _dense\nstep = _dense({s!r}, 'cpu')\n",
}


def _peak(which: str, s: dict) -> int:
    code = (_MEM_CODE[which].format(s=s) + f"torch.manual_seed(0)\nx = torch.randn({s['N_mem']}, {s['d']})\n"
            "step(x)\n")
    return peak_rss_of(code)


def run(quick: bool = False) -> list[dict]:
    s = _sizes(quick)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_name = device_name(device)
    torch.manual_seed(0)
    x = torch.randn(s["N"], s["d"], device=device)
    repeat = 3 if quick else 5
    cfg = {k: s[k] for k in ("d", "F", "k", "N")} | {"dtype": "float32"}

    ours = _ours(s, device)
    t_ours = time_fn(lambda: ours(x), repeat=repeat)
    dense = _dense(s, device)
    t_ref = time_fn(lambda: dense(x), repeat=repeat)
    W = torch.randn(s["F"], s["d"], device=device)
    t_floor = time_fn(lambda: x @ W.T, repeat=repeat)
    rows = [record("train", cfg, dev_name, t_ours, t_ref, reference="dense PyTorch TopK step",
                   floor_s=t_floor, floor_ratio=t_ours / t_floor)]

    for name, why in NOT_INSTALLED.items():
        rows.append(record("train", cfg | {"peer": name}, dev_name, t_ours, float("nan"), reference=name,
                           skipped=why))
    if importlib.util.find_spec("sparsify") is None:
        rows.append(record("train", cfg | {"peer": "sparsify"}, dev_name, t_ours, float("nan"),
                           reference="sparsify", skipped="eai-sparsify is not installed (pip install "
                                                         "eai-sparsify)"))
    else:
        step = _sparsify(s, device)
        t_peer = time_fn(lambda step=step: step(x), repeat=repeat)
        rows.append(record("train", cfg | {"peer": "sparsify"}, dev_name, t_ours, t_peer,
                           reference="sparsify",
                           decoder="triton" if device == "cuda" else "eager (embedding_bag)"))

    if device == "cpu":
        mem_ours, mem_ref = _peak("ours", s), _peak("reference", s)
        # Both pay torch's one-off cost of creating any torch.optim optimizer (it imports torch._dynamo,
        # ~140 MB of modules); the net ratio leaves that shared constant out.
        fixed = peak_rss_of("torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])")
        rows.append(record("train-mem", cfg | {"N": s["N_mem"]}, dev_name, float(mem_ours), float(mem_ref),
                           reference="dense PyTorch TopK step", unit="bytes (peak RSS)",
                           memory_ratio=mem_ours / mem_ref if mem_ref else float("nan"),
                           optimizer_import_bytes=fixed,
                           memory_ratio_net=(mem_ours - fixed) / (mem_ref - fixed) if mem_ref > fixed
                           else float("nan")))
    return rows
