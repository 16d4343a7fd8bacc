"""SAE checkpoints: `sae_weights.safetensors` + `cfg.json` in SAELens' layout. Never pickle.

SAELens (v6) names and shapes: W_enc [d_in, d_sae] (our W_enc transposed), b_enc [d_sae], W_dec [d_sae, d_in],
b_dec [d_in] (our b_pre). Architectures map to SAELens ones that compute the same function at inference:

    topk        -> "topk"      (SAELens applies ReLU after TopK: exact for relu=True only, noted in cfg.json)
    batchtopk   -> "jumprelu"  with threshold [d_sae] = our learned theta (inference rule: keep pre > theta)
    matryoshka  -> "jumprelu"  likewise
    relu        -> "standard"
    gated       -> "gated"     b_gate = our b_enc, plus r_mag and b_mag

Our own settings (arch, k, relu, l1_coeff, ...) live under the "sae_fast" key of cfg.json; `load_sae` rebuilds
exactly the saved module (bitwise weights) from these two files alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_fast.errors import CheckpointError, UserError
from sae_fast.utils import atomic_path, write_json

WEIGHTS = "sae_weights.safetensors"
CFG = "cfg.json"
SAELENS_ARCH = {"topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu", "relu": "standard",
                "gated": "gated"}


def _tensor_layout(sae) -> dict[str, tuple[str, tuple[int, ...]]]:
    """SAELens tensor name -> (our attribute, SAELens shape)."""
    d, F = sae.cfg.d_in, sae.cfg.n_features
    layout = {"W_enc": ("W_enc", (d, F)), "b_enc": ("b_enc", (F,)), "W_dec": ("W_dec", (F, d)),
              "b_dec": ("b_pre", (d,))}
    if sae.arch == "gated":
        layout["b_gate"] = layout.pop("b_enc")
        layout.update(r_mag=("r_mag", (F,)), b_mag=("b_mag", (F,)))
    if sae.arch in ("batchtopk", "matryoshka"):
        layout["threshold"] = ("threshold", (F,))
    return layout


def _to_saelens(name: str, t: torch.Tensor, F: int) -> torch.Tensor:
    if name == "W_enc":
        return t.T.contiguous()
    if name == "threshold":
        return t.expand(F).contiguous()
    return t.contiguous()


def save_sae(sae, path, *, model_name: str | None = None, hook_name: str | None = None,
             hook_layer: int | None = None) -> Path:
    """Write the SAE to directory `path` (created if needed); each file atomically. Returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    F = cfg.n_features
    tensors = {name: _to_saelens(name, getattr(sae, attr).detach().cpu(), F)
               for name, (attr, _) in _tensor_layout(sae).items()}
    dtype = str(sae.W_dec.dtype).removeprefix("torch.")
    meta = {"model_name": model_name, "hook_name": hook_name, "hook_layer": hook_layer}
    cfg_json = {
        "architecture": SAELENS_ARCH[cfg.arch], "d_in": cfg.d_in, "d_sae": F, "dtype": dtype, "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        **({"k": cfg.k, "activation_fn_kwargs": {"k": cfg.k}} if cfg.arch == "topk" else {}),
        **meta, "metadata": dict(meta),
        "sae_fast": {**dataclasses.asdict(cfg), "saelens_exact": not (cfg.arch == "topk" and not cfg.relu)},
    }
    with atomic_path(path / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(path / CFG, cfg_json)
    return path


def load_sae(path, device: str | torch.device = "cpu"):
    """Load an SAE written by `save_sae` / `sae.save` / `train_sae(out_dir=...)`: safetensors + JSON only.

    Returns the module in eval mode. A missing file, a missing tensor or a wrong shape raises a one-line
    CheckpointError (a UserError) naming the file and the tensor."""
    from sae_fast.sae.modules import SAEConfig, SparseAutoencoder

    path = Path(path)
    cfg_file, weights_file = path / CFG, path / WEIGHTS
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise CheckpointError(f"{f}: not found; point load_sae at a directory written by sae.save() or "
                                  f"train_sae(out_dir=...)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if "sae_fast" not in raw:
        raise CheckpointError(f"{cfg_file}: no 'sae_fast' section; this loader reads SAEs saved by sae-fast")
    known = {f.name for f in dataclasses.fields(SAEConfig)}
    try:
        cfg = SAEConfig(**{k: v for k, v in raw["sae_fast"].items() if k in known})
        sae = SparseAutoencoder.from_config(cfg)
    except (TypeError, UserError) as e:
        raise CheckpointError(f"{cfg_file}: bad 'sae_fast' settings ({e})") from None
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_file}: not a readable safetensors file ({e})") from None
    with torch.no_grad():
        for name, (attr, shape) in _tensor_layout(sae).items():
            if name not in tensors:
                raise CheckpointError(f"{weights_file}: missing tensor '{name}' (expected shape "
                                      f"{list(shape)} for a {cfg.arch} SAE with d_in={cfg.d_in}, "
                                      f"d_sae={cfg.n_features})")
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise CheckpointError(f"{weights_file}: tensor '{name}' has shape {list(t.shape)}, expected "
                                      f"{list(shape)} (cfg.json: d_in={cfg.d_in}, d_sae={cfg.n_features})")
            target = getattr(sae, attr)
            t = t.T if name == "W_enc" else (t[0] if name == "threshold" else t)
            target.data = t.clone().contiguous()
    return sae.to(device).eval()
