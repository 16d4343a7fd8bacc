"""SAE checkpoints: `sae_weights.safetensors` + `cfg.json` in SAELens' layout, both directions. Never pickle.

SAELens (v6) names and shapes: W_enc [d_in, d_sae] (our W_enc transposed), b_enc [d_sae], W_dec [d_sae, d_in],
b_dec [d_in] (our b_pre). Architectures map to SAELens ones that compute the same function at inference:

    topk        -> "topk"      (SAELens applies ReLU after TopK: exact for relu=True only, noted in cfg.json)
    batchtopk   -> "jumprelu"  with threshold [d_sae] = our learned theta (inference rule: keep pre > theta)
    matryoshka  -> "jumprelu"  likewise
    relu        -> "standard"
    gated       -> "gated"     b_gate = our b_enc, plus r_mag and b_mag

Our own settings (arch, k, relu, l1_coeff, ...) live under the "sae_fast" key of cfg.json; `load_sae` rebuilds
exactly the saved module (bitwise weights) from these two files alone.

`load_sae` also reads checkpoints written by SAELens itself (no "sae_fast" key), with SAELens' inference rules:
standard -> relu, topk -> topk (k from cfg.json), jumprelu -> batchtopk with a per-feature threshold (or
log_threshold), gated -> gated. Their options are folded into our one layout, exactly in real arithmetic:
apply_b_dec_to_input = false moves W_enc b_dec into the encoder biases; topk's rescale_acts_by_decoder_norm =
true scales encoder rows by, and divides decoder rows by, the decoder norms. Settings that change the input
(normalize_activations other than "none", reshape_activations, a scaling_factor other than 1) are refused by
name. tests/fixtures/saelens holds files written and read by SAELens' own code (see make_fixture.py there).
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
# The SAELens release whose layout save_sae writes and whose loader tests/fixtures/saelens was checked with.
SAELENS_LAYOUT = "6.54.12"
FROM_SAELENS = {"topk": "topk", "jumprelu": "batchtopk", "standard": "relu", "gated": "gated"}


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
    # SAELens reads the layout of its version in metadata (without one it assumes a pre-6.0 file)
    meta = {"sae_lens_version": SAELENS_LAYOUT, "model_name": model_name, "hook_name": hook_name,
            "hook_layer": hook_layer}
    cfg_json = {
        "architecture": SAELENS_ARCH[cfg.arch], "d_in": cfg.d_in, "d_sae": F, "dtype": dtype, "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        **({"k": cfg.k, "rescale_acts_by_decoder_norm": False} if cfg.arch == "topk" else {}),
        "metadata": meta,
        "sae_fast": {**dataclasses.asdict(cfg), "saelens_exact": not (cfg.arch == "topk" and not cfg.relu)},
    }
    if hasattr(sae, "threshold_weight"):  # how much training theta has seen (0: none; SAELens has no such field)
        cfg_json["sae_fast"]["threshold_weight"] = float(sae.threshold_weight)
    with atomic_path(path / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(path / CFG, cfg_json)
    return path


def load_sae(path, device: str | torch.device = "cpu"):
    """Load an SAE written by `save_sae` / `sae.save` / `train_sae(out_dir=...)`, or by SAELens' `save_model`
    (see the module docstring): safetensors + JSON only.

    Returns the module in eval mode. A missing file, a missing tensor or a wrong shape raises a one-line
    CheckpointError (a UserError) naming the file and the tensor."""
    from sae_fast.sae.modules import SAEConfig, SparseAutoencoder

    path = Path(path)
    cfg_file, weights_file = path / CFG, path / WEIGHTS
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise CheckpointError(f"{f}: not found; point load_sae at a directory written by sae.save(), "
                                  f"train_sae(out_dir=...) or SAELens' save_model")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_file}: not a readable safetensors file ({e})") from None
    threshold_weight = 1.0  # a threshold in a SAELens file is a learned one
    if "sae_fast" in raw:
        known = {f.name for f in dataclasses.fields(SAEConfig)}
        settings = {k: v for k, v in raw["sae_fast"].items() if k in known}
        threshold_weight = raw["sae_fast"].get("threshold_weight", threshold_weight)
    else:
        settings = _saelens_settings(raw, cfg_file)
        tensors = _from_saelens_tensors(raw, tensors, weights_file)
    try:
        sae = SparseAutoencoder.from_config(SAEConfig(**settings))
    except (TypeError, UserError) as e:
        raise CheckpointError(f"{cfg_file}: bad settings ({e})") from None
    cfg = sae.cfg
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
            if name == "W_enc":
                t = t.T
            elif name == "threshold" and bool((t == t[0]).all()):
                t = t[0]  # one learned theta (ours); SAELens' jumprelu keeps one per feature
            getattr(sae, attr).data = t.clone().contiguous()
        if hasattr(sae, "threshold_weight"):
            sae.threshold_weight.fill_(threshold_weight)
    return sae.to(device).eval()


def _saelens_settings(raw: dict, cfg_file: Path) -> dict:
    """Our SAEConfig fields for a cfg.json written by SAELens."""
    arch = raw.get("architecture", "standard")
    if arch not in FROM_SAELENS:
        raise CheckpointError(f"{cfg_file}: SAELens architecture {arch!r} is not supported; load_sae reads "
                              f"{', '.join(FROM_SAELENS)} (and checkpoints written by sae-fast)")
    for key, ok in (("normalize_activations", ("none", None)), ("reshape_activations", ("none", None))):
        if raw.get(key) not in ok:
            raise CheckpointError(f"{cfg_file}: {key} = {raw.get(key)!r} is not supported (it changes the input "
                                  f"before the encoder); only 'none' maps onto an sae-fast SAE")
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{cfg_file}: needs integer 'd_in' and 'd_sae' (a SAELens cfg.json)") from None
    ours = FROM_SAELENS[arch]
    # k only matters to topk here (jumprelu's inference rule is the threshold): SAELens' own default is 100
    k = int(raw.get("k", 100)) if ours == "topk" else min(32, d_sae)
    return {"arch": ours, "d_in": d_in, "n_features": d_sae, "k": k}


def _from_saelens_tensors(raw: dict, tensors: dict, weights_file: Path) -> dict:
    """SAELens' tensors rewritten so that our forward (encode x - b_dec, unit activations) computes theirs."""
    tensors = dict(tensors)
    if "scaling_factor" in tensors:  # SAELens drops an all-ones scaling factor the same way
        if not bool((tensors.pop("scaling_factor") == 1).all()):
            raise CheckpointError(f"{weights_file}: a 'scaling_factor' other than 1 (finetuned activation "
                                  "scaling) is not supported")
    if "log_threshold" in tensors:  # older SAELens jumprelu checkpoints
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    need = ("W_enc", "W_dec", "b_dec")
    for name in need:
        if name not in tensors:
            raise CheckpointError(f"{weights_file}: missing tensor '{name}' (a SAELens checkpoint has "
                                  f"{', '.join(need)})")
    W_enc, W_dec, b_dec = tensors["W_enc"], tensors["W_dec"], tensors["b_dec"]
    if raw.get("rescale_acts_by_decoder_norm") and raw.get("architecture") == "topk":
        norm = W_dec.norm(dim=1)  # z_f * |W_dec,f| selects and decodes with W_dec,f / |W_dec,f|
        W_enc, W_dec = W_enc * norm, W_dec / norm[:, None]
        tensors["b_enc"] = tensors["b_enc"] * norm
    if raw.get("apply_b_dec_to_input") is False:
        shift = b_dec @ W_enc  # W_enc (x - b_dec) + (b_enc + W_enc b_dec) = W_enc x + b_enc
        bias = "b_gate" if raw.get("architecture") == "gated" else "b_enc"
        tensors[bias] = tensors[bias] + shift
        if "b_mag" in tensors:
            tensors["b_mag"] = tensors["b_mag"] + tensors["r_mag"].exp() * shift
    tensors.update(W_enc=W_enc, W_dec=W_dec)
    return tensors
