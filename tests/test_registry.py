"""The model registry: names, the no-download rule, random-init presets and size checks."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("name", ["aido_cell_100m", "aido_cell", "scgpt", "geneformer"])
def test_real_models_need_a_path(name):
    with pytest.raises(UserError, match="path=") as e:
        load_model(name)
    assert "download" in str(e.value) and "\n" not in str(e.value)


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
