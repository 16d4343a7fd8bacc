"""The model registry: names, the no-download rule, random-init presets and size checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sae_fast import load_model
from sae_fast.errors import UserError
from sae_fast.models.aido_cell import AIDO_CELL_CONFIGS, random_aido_cell, save_aido_cell
from sae_fast.models.registry import MODEL_NAMES


def test_names():
    assert set(MODEL_NAMES) >= {"aido_cell_3m", "aido_cell_10m", "aido_cell_100m", "aido_cell_650m",
                                "aido_cell", "scgpt", "geneformer", "mini"}
    with pytest.raises(UserError, match="unknown model 'bert'.*mini"):
        load_model("bert")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, with the Hub unreachable (HF_HUB_OFFLINE), as on this machine."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("name", ["aido_cell_100m", "aido_cell", "scgpt", "geneformer", "scfoundation"])
def test_models_not_here_say_how_to_pass_a_path(name, offline_cache):
    with pytest.raises(UserError, match="path=") as e:
        load_model(name, token_dictionary={}, gene_median={}) if name == "geneformer" else load_model(name)
    assert "\n" not in str(e.value)
    if name in ("aido_cell_100m", "geneformer"):  # Hub names: the cache was looked at, the Hub was not
        repo = {"aido_cell_100m": "genbio-ai/AIDO.Cell-100M", "geneformer": "ctheodoris/Geneformer"}[name]
        assert f"{repo} is not in the Hugging Face cache {offline_cache}" in str(e.value)
        assert "HF_HUB_OFFLINE" in str(e.value)


def write_hub_cache(cache, repo_id: str, files: dict, commit: str = "a" * 40):
    """Put `files` (name in the repository -> local file) into a Hugging Face cache, in the hub's own layout
    (models--org--name/{blobs,snapshots/COMMIT,refs/main}), written by huggingface_hub's own helpers."""
    import hashlib

    from huggingface_hub.file_download import (
        _cache_commit_hash_for_specific_revision,
        _create_symlink,
        _get_pointer_path,
        repo_folder_name,
    )

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    for rel, src in files.items():
        data = src.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = _get_pointer_path(str(storage), commit, rel)
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        _create_symlink(str(blob), pointer, new_blob=True)
    _cache_commit_hash_for_specific_revision(str(storage), "main", commit)
    return storage


def _check_cache(cache, repo_id, files):
    """The layout is the hub's: its own scanner and lookup find every file."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    info = scan_cache_dir(cache)
    (repo,) = [r for r in info.repos if r.repo_id == repo_id]
    (rev,) = repo.revisions
    assert rev.refs == {"main"} and {f.file_name for f in rev.files} == {Path(f).name for f in files}
    for rel in files:
        assert Path(try_to_load_from_cache(repo_id, rel, cache_dir=cache)).read_bytes() == files[rel].read_bytes()


def test_aido_cell_hub_name_resolves_from_the_cache(tmp_path, offline_cache):
    model = random_aido_cell(AIDO_CELL_CONFIGS["3m"], seed=3)
    save_aido_cell(model, tmp_path / "local")
    files = {f: tmp_path / "local" / f for f in ("config.json", "model.safetensors")}
    write_hub_cache(offline_cache, "genbio-ai/AIDO.Cell-3M", files)
    _check_cache(offline_cache, "genbio-ai/AIDO.Cell-3M", files)
    loaded = load_model("aido_cell_3m")  # no path: the cache, without the network
    assert loaded.genes == model.genes  # the repository has no genes.tsv: the bundled 19,264 genes
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    other = tmp_path / "other_cache"
    write_hub_cache(other, "genbio-ai/AIDO.Cell-3M", files)
    assert load_model("aido_cell_3m", cache_dir=other).n_layers == 6
    with pytest.raises(UserError, match="AIDO.Cell-10M is not in the Hugging Face cache"):
        load_model("aido_cell_10m")


def test_geneformer_hub_name_resolves_from_the_cache(tmp_path, offline_cache):
    import pickle

    transformers = pytest.importorskip("transformers")
    genes = [f"ENSG{i:011d}" for i in range(10)]
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
    cfg = transformers.BertConfig(vocab_size=12, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "gf")
    (tmp_path / "tok.pkl").write_bytes(pickle.dumps(tokens))
    (tmp_path / "med.pkl").write_bytes(pickle.dumps({g: 1.0 for g in genes}))
    files = {"gf-tiny/config.json": tmp_path / "gf" / "config.json",
             "gf-tiny/model.safetensors": tmp_path / "gf" / "model.safetensors",
             "geneformer/token_dictionary_tiny.pkl": tmp_path / "tok.pkl",
             "geneformer/gene_median_dictionary_tiny.pkl": tmp_path / "med.pkl"}
    write_hub_cache(offline_cache, "ctheodoris/Geneformer", files)
    _check_cache(offline_cache, "ctheodoris/Geneformer", files)
    model = load_model("geneformer", subfolder="gf-tiny", token_dictionary="geneformer/token_dictionary_tiny.pkl",
                       gene_median="geneformer/gene_median_dictionary_tiny.pkl", device="cpu")
    assert model.genes == genes and model.n_layers == 2
    with pytest.raises(UserError, match="pass token_dictionary=.*geneformer/token_dictionary_tiny.pkl"):
        load_model("geneformer", subfolder="gf-tiny")


def test_preset_sizes():
    sizes = {k: (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size)
             for k, c in AIDO_CELL_CONFIGS.items()}
    assert sizes == {"3m": (6, 128, 4, 320), "10m": (8, 256, 8, 640), "100m": (18, 640, 20, 1664),
                     "650m": (32, 1280, 20, 3392)}
    model = load_model("aido_cell_3m", random_init=True)
    assert (model.n_layers, model.d_model, len(model.genes)) == (6, 128, 19264)
    assert model.bert.position_embedding.weight.shape == (19266, 128)
    assert model.genes[:2] == ["A1BG", "A1CF"]
    with pytest.raises(UserError, match="random_init"):
        load_model("aido_cell", random_init=True)


def test_path_config_sets_the_size(tmp_path):
    cfg = AIDO_CELL_CONFIGS["3m"]
    small = type(cfg)(**{**cfg.__dict__, "num_hidden_layers": 2, "max_position_embeddings": 30})
    model = random_aido_cell(small, [f"g{i}" for i in range(30)], seed=1)
    save_aido_cell(model, tmp_path / "m")
    loaded = load_model("aido_cell", path=tmp_path / "m")
    assert loaded.n_layers == 2 and loaded.genes == model.genes
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "cellfoundation"
    with pytest.raises(UserError, match="num_hidden_layers=2 \\(expected 6\\)"):
        load_model("aido_cell_3m", path=tmp_path / "m")
