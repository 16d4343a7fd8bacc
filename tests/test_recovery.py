"""Embedding Recovery Score (sae_fast.steer.recovery): both forms against a float64 computation from full hooked
forwards, and the held-out split of the layer curves."""

import numpy as np
import pytest
import torch

from sae_fast.errors import UserError


def test_both_ers_forms_equal_float64_reference():
    from sae_fast import datasets, load_model
    from sae_fast.sae import TopKSAE
    from sae_fast.steer import embedding_recovery

    model = load_model("mini")
    a = datasets.kang2018()[::1500].copy()  # 10 cells of both conditions (batches)
    torch.manual_seed(0)
    sae = TopKSAE(model.d_model, 64, k=8)
    layer = 1
    ers = embedding_recovery(sae, model, a, layer=layer, batch_size=4)

    def replace(h, batch):  # SAE(x) at every real token
        out = h.clone()
        out[batch.mask] = sae(h[batch.mask])[0]
        return out

    orig, rec, zero = [], [], []
    with torch.no_grad():
        for batch in model.prepare(a, batch_size=4):  # full forwards with a hook (not the shared prefix)
            orig.append(model.forward(batch).embedding.numpy().astype(np.float64))
            rec.append(model.forward(batch, layer=layer, hook=replace).embedding.numpy().astype(np.float64))
            zero.append(model.forward(batch, layer=layer, hook=lambda h, b: torch.zeros_like(h))
                        .embedding.numpy().astype(np.float64))
    orig, rec, zero = map(np.concatenate, (orig, rec, zero))
    mse_zero, mse_rec = np.mean((zero - orig) ** 2), np.mean((orig - rec) ** 2)
    assert ers.n_cells == a.n_obs
    assert ers.ratio == pytest.approx(mse_zero / mse_rec, rel=1e-5)  # paper
    assert ers.fraction == pytest.approx(1 - ((orig - rec) ** 2).sum() / ((zero - orig) ** 2).sum(), rel=1e-5)
    assert ers.fraction == pytest.approx(1 - 1 / ers.ratio, rel=1e-9)  # the two forms carry the same sums


def test_heldout_split():
    from sae_fast.steer.recovery import heldout_split

    tr, ho = heldout_split(50, 0.2, seed=3)
    assert len(ho) == 10 and len(tr) == 40 and not set(tr) & set(ho)
    assert sorted(np.concatenate([tr, ho])) == list(range(50))
    np.testing.assert_array_equal(heldout_split(50, 0.2, seed=3)[1], ho)
    with pytest.raises(UserError, match="heldout"):
        heldout_split(50, 1.5, seed=0)
