"""`sae_fast.load_model(name, path=None)`: every supported single-cell foundation model by name.

    load_model("mini")                                  # the embedded demo model (bundled weights, CPU-sized)
    load_model("aido_cell_100m")                        # genbio-ai/AIDO.Cell-100M via the Hugging Face cache
    load_model("aido_cell_100m", path="AIDO.Cell-100M") # HF directory: config.json + model.safetensors/.bin
    load_model("aido_cell", path=dir)                   # any AIDO.Cell size: config.json sets it
    load_model("scgpt", path=dir)                       # best_model.pt + args.json + vocab.json
    load_model("geneformer", subfolder="gf-6L-30M-i2048", token_dictionary=..., gene_median=...)
                                                        # ctheodoris/Geneformer via the cache (needs transformers)
    load_model("geneformer", path=dir, ...)             # a local HF Geneformer directory
    load_model("scfoundation", path=dir)                # scFoundation's models.ckpt (gated: no Hub name)
    load_model("aido_cell_3m", random_init=True)        # random weights, for tests and benchmarks only

Hub names (sae_fast.models.hub.HUB_REPOS) resolve through huggingface_hub: the local cache first, a download
when the Hub is reachable, else a one-line error saying how to pass `path=`. `cache_dir=` overrides the cache.
"""

from __future__ import annotations

from pathlib import Path

from sae_fast.errors import UserError
from sae_fast.models.base import ScFM

AIDO_SIZES = ("3m", "10m", "100m", "650m")
MODEL_NAMES = (*(f"aido_cell_{s}" for s in AIDO_SIZES), "aido_cell", "scgpt", "geneformer", "scfoundation",
               "mini")
_WHERE = {
    "aido_cell": "https://huggingface.co/genbio-ai (e.g. genbio-ai/AIDO.Cell-100M), or use a sized name such as "
                 "'aido_cell_100m' to resolve it through the Hugging Face cache",
    "scgpt": "the scGPT model zoo (github.com/bowang-lab/scGPT: best_model.pt, args.json, vocab.json)",
    "scfoundation": "the scFoundation authors (github.com/biomap-research/scFoundation: models.ckpt, gated)",
}
AIDO_FILES = ["*.json", "*.safetensors", "*.bin", "*.tsv"]


def mini_path() -> Path:
    """The bundled mini model's directory (config.json, model.safetensors, genes.tsv, training_log.json)."""
    return Path(__file__).parent / "mini"


def load_model(name: str, path: str | Path | None = None, *, random_init: bool = False, device=None,
               dtype=None, cache_dir: str | Path | None = None, **kw) -> ScFM:
    """A model of the zoo by name; see the module docstring. Extra keywords go to the model's loader."""
    from sae_fast.models import aido_cell
    from sae_fast.models.hub import HUB_REPOS, snapshot

    name = name.lower().replace("-", "_").replace(".", "_")
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name == "mini":
        if path is not None or random_init:
            raise UserError("model 'mini' is the bundled demo model: it takes no path= or random_init=")
        model = aido_cell.load_aido_cell(mini_path(), device=device, dtype=dtype, **kw)
        model.name = "mini"
        return model
    if name.startswith("aido_cell"):
        size = name.removeprefix("aido_cell").lstrip("_") or None
        if random_init:
            if path is not None or size is None:
                raise UserError(f"{name}: random_init=True takes a sized name ({', '.join(MODEL_NAMES[:4])}) "
                                "and no path")
            cfg = aido_cell.AIDO_CELL_CONFIGS[size]
            return aido_cell.random_aido_cell(cfg, device=device, dtype=dtype, **kw)
        if path is None and size is None:
            raise UserError(f"{name}: no path= given; download an AIDO.Cell checkpoint from "
                            f"{_WHERE['aido_cell']} and pass path=DIR")
        if path is None:
            path = snapshot(HUB_REPOS[name], name, AIDO_FILES, cache_dir=cache_dir)
        model = aido_cell.load_aido_cell(path, device=device, dtype=dtype, **kw)
        if size is not None:
            _check_size(model.config, aido_cell.AIDO_CELL_CONFIGS[size], name, path)
        return model
    if random_init:
        raise UserError(f"{name}: random_init=True is only offered for the AIDO.Cell sizes")
    kw.update({k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
    if name == "geneformer":
        from sae_fast.models.geneformer import load_geneformer

        if path is None:
            return load_geneformer(**_geneformer_from_hub(kw, cache_dir))
        return load_geneformer(path, **kw)
    if path is None:
        raise UserError(f"{name}: no weights here and no Hub name for them; get them from {_WHERE[name]} and "
                        "pass path=DIR")
    if name == "scgpt":
        from sae_fast.models.scgpt import load_scgpt

        return load_scgpt(path, **kw)
    from sae_fast.models.scfoundation import load_scfoundation

    return load_scfoundation(path, **kw)


def _geneformer_from_hub(kw: dict, cache_dir) -> dict:
    """ctheodoris/Geneformer from the cache (or the Hub): the model in `subfolder` (default: the repository's
    root) and the token dictionary / gene medians given by name inside the snapshot. The dictionaries are
    pickles, so they are never picked for the user: without them the error lists the candidates found."""
    from sae_fast.models.hub import HUB_REPOS, snapshot

    sub = str(kw.pop("subfolder", "") or "").strip("/")
    # fnmatch's * crosses folders: the root model is named file by file, not by pattern
    model_files = [f"{sub}/*"] if sub else ["config.json", "model.safetensors", "pytorch_model.bin"]
    root = snapshot(HUB_REPOS["geneformer"], "geneformer", [*model_files, "*.pkl"],
                    cache_dir=cache_dir)
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*.pkl"))
    for key, stem in (("token_dictionary", "token_dictionary"), ("gene_median", "gene_median")):
        value = kw.get(key)
        if value is None:
            options = [f for f in found if stem in Path(f).name] or found
            raise UserError(f"geneformer: pass {key}= (a path, or a file of the {HUB_REPOS['geneformer']} snapshot: "
                            f"{', '.join(options[:6]) or 'none found'}) matching the model version")
        if isinstance(value, (str, Path)) and not Path(value).is_file() and (root / value).is_file():
            kw[key] = root / value
    return {"path": root / sub if sub else root, **kw}


def _check_size(cfg, preset, name: str, path) -> None:
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    diff = [f"{f}={getattr(cfg, f)} (expected {getattr(preset, f)})" for f in fields
            if getattr(cfg, f) != getattr(preset, f)]
    if diff:
        raise UserError(f"{path}/config.json does not describe {name}: {', '.join(diff)}; "
                        "load it as 'aido_cell' to take the sizes from config.json")
