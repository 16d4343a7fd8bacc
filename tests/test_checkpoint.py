"""SAE checkpoints: SAELens-style safetensors + cfg.json, bitwise round trip, one-line errors, no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_fast
from sae_fast.errors import UserError
from sae_fast.sae.checkpoint import CFG, WEIGHTS

ARCHS = {"topk": sae_fast.TopKSAE, "batchtopk": sae_fast.BatchTopKSAE, "relu": sae_fast.ReLUSAE,
         "gated": sae_fast.GatedSAE, "matryoshka": sae_fast.MatryoshkaSAE}


def _trained_like(arch):
    torch.manual_seed(0)
    kw = {} if arch in ("relu", "gated") else {"k": 3}
    sae = ARCHS[arch](12, 40, **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p))
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.37)
    return sae


@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_is_bitwise(arch, tmp_path):
    sae = _trained_like(arch)
    sae.save(tmp_path)
    back = sae_fast.load_sae(tmp_path)
    assert type(back) is type(sae) and back.cfg == sae.cfg
    ours, theirs = sae.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    x = torch.randn(7, 12)
    sae.eval()
    assert torch.equal(sae(x)[0], back(x)[0])


def test_saelens_names_shapes_and_config(tmp_path):
    sae = _trained_like("topk")
    sae.save(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "W_enc": (12, 40), "b_enc": (40,), "W_dec": (40, 12), "b_dec": (12,)}
    assert torch.equal(tensors["W_enc"], sae.W_enc.detach().T)
    assert torch.equal(tensors["b_dec"], sae.b_pre.detach())
    cfg = json.loads((tmp_path / CFG).read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == ("topk", 12, 40, 3)
    assert cfg["dtype"] == "float32"
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["sae_fast"]["arch"] == "topk"
    # SAELens' inference rule on our files gives our reconstruction
    x = torch.randn(9, 12)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    v, i = pre.topk(3, dim=1)
    z = torch.zeros_like(pre).scatter(1, i, v.relu())
    torch.testing.assert_close(z @ tensors["W_dec"] + tensors["b_dec"], sae(x)[0].detach())


def test_gated_and_batchtopk_use_saelens_names(tmp_path):
    _trained_like("gated").save(tmp_path / "g")
    names = set(load_file(str(tmp_path / "g" / WEIGHTS)))
    assert names == {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}
    _trained_like("batchtopk").save(tmp_path / "b")
    t = load_file(str(tmp_path / "b" / WEIGHTS))
    assert json.loads((tmp_path / "b" / CFG).read_text())["architecture"] == "jumprelu"
    assert torch.equal(t["threshold"], torch.full((40,), 0.37))


def test_missing_or_misshapen_tensor_is_a_one_line_error(tmp_path):
    _trained_like("topk").save(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS))
    save_file({k: v for k, v in tensors.items() if k != "W_dec"}, str(tmp_path / WEIGHTS))
    with pytest.raises(UserError, match=r"sae_weights\.safetensors: missing tensor 'W_dec'") as e:
        sae_fast.load_sae(tmp_path)
    assert "\n" not in str(e.value)
    save_file({**tensors, "b_enc": torch.zeros(41)}, str(tmp_path / WEIGHTS))
    with pytest.raises(UserError, match=r"sae_weights\.safetensors: tensor 'b_enc' has shape \[41\], "
                                         r"expected \[40\]"):
        sae_fast.load_sae(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(UserError, match="sae_weights.safetensors: not found"):
        sae_fast.load_sae(tmp_path)
    with pytest.raises(UserError, match="cfg.json: not found"):
        sae_fast.load_sae(tmp_path / "nowhere")


def test_load_never_unpickles(tmp_path, monkeypatch):
    _trained_like("matryoshka").save(tmp_path)
    import pickle

    def refuse(*a, **k):
        raise AssertionError("load_sae must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert sae_fast.load_sae(tmp_path).cfg.matryoshka_prefixes == [2, 5, 10, 20, 40]
