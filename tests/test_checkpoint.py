"""SAE checkpoints: SAELens' safetensors + cfg.json layout both ways (against files written and read by SAELens'
own code, tests/fixtures/saelens), bitwise round trip, one-line errors, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

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
            sae.threshold_weight.fill_(0.5)  # a learned theta (round-tripped through cfg.json)
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
    assert cfg["sae_fast"]["arch"] == "topk"


FIXTURE = Path(__file__).parent / "fixtures" / "saelens"


@pytest.mark.parametrize("arch,ours", [("standard", sae_fast.ReLUSAE), ("topk", sae_fast.TopKSAE),
                                       ("jumprelu", sae_fast.BatchTopKSAE), ("gated", sae_fast.GatedSAE)])
def test_load_sae_reads_checkpoints_written_by_saelens(arch, ours):
    """Files from SAELens' own save_model (options folded: topk rescale_acts_by_decoder_norm, jumprelu with
    apply_b_dec_to_input = false and per-feature thresholds): our forward reproduces SAELens' recorded one."""
    sae = sae_fast.load_sae(FIXTURE / "theirs" / arch)
    assert type(sae) is ours and not sae.training
    ref = load_file(str(FIXTURE / "theirs" / arch / "forward.safetensors"))
    with torch.no_grad():
        x_hat, code = sae(ref["x"])
    torch.testing.assert_close(code.to_dense(sae.cfg.n_features), ref["feature_acts"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, ref["sae_out"], rtol=1e-5, atol=1e-5)
    theirs = load_file(str(FIXTURE / "theirs" / arch / WEIGHTS))
    if arch == "standard":  # nothing to fold: the very tensors
        assert torch.equal(sae.W_enc, theirs["W_enc"].T) and torch.equal(sae.b_pre, theirs["b_dec"])


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "gated", "matryoshka"])
def test_save_sae_writes_what_saelens_loads(arch, tmp_path):
    """ours/ARCH holds files that SAELens' SAE.load_from_disk accepted, and SAELens' forward on them. save_sae
    must still write those files byte for byte, and our forward must equal SAELens' on them."""
    src = FIXTURE / "ours" / arch
    sae = sae_fast.load_sae(src)
    sae.save(tmp_path)
    for name in (WEIGHTS, CFG):
        assert (tmp_path / name).read_bytes() == (src / name).read_bytes(), name
    ref = load_file(str(src / "forward.safetensors"))
    with torch.no_grad():
        x_hat, code = sae(ref["x"])
    torch.testing.assert_close(code.to_dense(sae.cfg.n_features), ref["feature_acts"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, ref["sae_out"], rtol=1e-5, atol=1e-5)


def test_unsupported_saelens_settings_are_refused_by_name(tmp_path):
    import shutil

    shutil.copytree(FIXTURE / "theirs" / "standard", tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / CFG).read_text())
    (tmp_path / CFG).write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(UserError, match="normalize_activations = 'layer_norm' is not supported"):
        sae_fast.load_sae(tmp_path)
    (tmp_path / CFG).write_text(json.dumps({**cfg, "architecture": "transcoder"}))
    with pytest.raises(UserError, match="SAELens architecture 'transcoder' is not supported"):
        sae_fast.load_sae(tmp_path)


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
