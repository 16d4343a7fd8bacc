"""Model weights by Hugging Face Hub name: the local cache first, a download when online, a clear error offline.

    snapshot("genbio-ai/AIDO.Cell-100M", "aido_cell_100m", ["*.json", "*.safetensors"])  # -> local folder

The cache is huggingface_hub's own (HF_HUB_CACHE / HF_HOME, or `cache_dir=`), so a model fetched once by any
tool (`huggingface-cli download`, transformers) is found again without the network.
"""

from __future__ import annotations

from pathlib import Path

from sae_fast.errors import UserError

# Registry name -> Hub repository (no revision: the cache's refs/main, or the Hub's main branch).
HUB_REPOS = {
    "aido_cell_3m": "genbio-ai/AIDO.Cell-3M",
    "aido_cell_10m": "genbio-ai/AIDO.Cell-10M",
    "aido_cell_100m": "genbio-ai/AIDO.Cell-100M",
    "aido_cell_650m": "genbio-ai/AIDO.Cell-650M",
    "geneformer": "ctheodoris/Geneformer",
}


def snapshot(repo_id: str, name: str, allow_patterns: list[str] | None = None, *,
             cache_dir: str | Path | None = None) -> Path:
    """The local folder of `repo_id`'s snapshot: from the cache if it is there, else downloaded (the files
    matching `allow_patterns`). Offline and not cached: a one-line UserError saying how to pass path=."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise UserError(f"{name}: resolving {repo_id} needs huggingface_hub (pip install huggingface_hub), or "
                        "pass path=DIR to a local copy of the model") from None
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=allow_patterns,
                                                      cache_dir=cache_dir, local_files_only=True))
    except Exception as cached_error:  # noqa: BLE001 - not (fully) in the cache; try the Hub below
        reason = type(cached_error).__name__
    how = (f"run `hf download {repo_id}` (or huggingface-cli download) where the Hub is reachable and copy "
           f"the cache, or pass path=DIR to a local copy of the model")
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{name}: {repo_id} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set "
                        f"({reason}); {how}")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=allow_patterns,
                                                      cache_dir=cache_dir))
    except Exception as e:  # noqa: BLE001 - network, authentication or missing repository: one line
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise UserError(f"{name}: {repo_id} is not in the Hugging Face cache {cache} and cannot be downloaded "
                        f"({type(e).__name__}: {first}); {how}") from None


__all__ = ["HUB_REPOS", "snapshot"]
