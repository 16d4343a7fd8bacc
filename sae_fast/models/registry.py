"""`sae_fast.load_model(name, path=None)`: every supported single-cell foundation model by name.

    load_model("mini")                                  # the embedded demo model (bundled weights, CPU-sized)
    load_model("aido_cell_100m", path="AIDO.Cell-100M") # HF directory: config.json + model.safetensors/.bin
    load_model("aido_cell", path=dir)                   # any AIDO.Cell size: config.json sets it
    load_model("scgpt", path=dir)                       # best_model.pt + args.json + vocab.json
    load_model("geneformer", path=dir)                  # an HF Geneformer directory (needs `transformers`)
    load_model("aido_cell_3m", random_init=True)        # random weights, for tests and benchmarks only

Real weights are never downloaded (this project runs offline): fetch the checkpoint yourself and pass `path=`.
"""

from __future__ import annotations

from pathlib import Path

from sae_fast.errors import UserError
from sae_fast.models.base import ScFM

AIDO_SIZES = ("3m", "10m", "100m", "650m")
MODEL_NAMES = (*(f"aido_cell_{s}" for s in AIDO_SIZES), "aido_cell", "scgpt", "geneformer", "mini")
_WHERE = {
    "aido_cell": "https://huggingface.co/genbio-ai (e.g. genbio-ai/AIDO.Cell-100M)",
    "scgpt": "the scGPT model zoo (github.com/bowang-lab/scGPT: best_model.pt, args.json, vocab.json)",
    "geneformer": "https://huggingface.co/ctheodoris/Geneformer (+ its token dictionary and gene medians)",
}


def mini_path() -> Path:
    """The bundled mini model's directory (config.json, model.safetensors, genes.tsv, training_log.json)."""
    return Path(__file__).parent / "mini"


def load_model(name: str, path: str | Path | None = None, *, random_init: bool = False, device=None,
               dtype=None, **kw) -> ScFM:
    """A model of the zoo by name; see the module docstring. Extra keywords go to the model's loader."""
    from sae_fast.models import aido_cell

    name = name.lower().replace("-", "_").replace(".", "_")
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name == "mini":
        if path is not None or random_init:
            raise UserError("model 'mini' is the bundled demo model: it takes no path= or random_init=")
        model = aido_cell.load_aido_cell(mini_path(), device=device, dtype=dtype)
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
        if path is None:
            raise UserError(f"{name}: no weights here and none can be downloaded; download an AIDO.Cell "
                            f"checkpoint from {_WHERE['aido_cell']} and pass path=DIR (or random_init=True "
                            "for random weights in tests)")
        model = aido_cell.load_aido_cell(path, device=device, dtype=dtype, **kw)
        if size is not None:
            _check_size(model.config, aido_cell.AIDO_CELL_CONFIGS[size], name, path)
        return model
    if random_init:
        raise UserError(f"{name}: random_init=True is only offered for the AIDO.Cell sizes")
    if path is None:
        raise UserError(f"{name}: no weights here and none can be downloaded; get them from {_WHERE[name]} "
                        "and pass path=DIR")
    kw.update({k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
    if name == "scgpt":
        from sae_fast.models.scgpt import load_scgpt

        return load_scgpt(path, **kw)
    from sae_fast.models.geneformer import load_geneformer

    return load_geneformer(path, **kw)


def _check_size(cfg, preset, name: str, path) -> None:
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    diff = [f"{f}={getattr(cfg, f)} (expected {getattr(preset, f)})" for f in fields
            if getattr(cfg, f) != getattr(preset, f)]
    if diff:
        raise UserError(f"{path}/config.json does not describe {name}: {', '.join(diff)}; "
                        "load it as 'aido_cell' to take the sizes from config.json")
