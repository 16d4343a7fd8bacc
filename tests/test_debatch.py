"""Feature ranking by label ([P]'s AMI rule) and the clamp sweep's feature sets (sae_fast.steer.debatch)."""

import numpy as np
import pytest
import torch

from sae_fast.errors import UserError


@pytest.fixture(scope="module")
def setup():
    from sae_fast import datasets, load_model
    from sae_fast.sae import TopKSAE

    model = load_model("mini")
    a = datasets.kang2018()
    b = a.obs["batch"].astype(str).to_numpy()
    keep = np.concatenate([np.flatnonzero(b == v)[:10] for v in sorted(set(b))])
    torch.manual_seed(0)
    sae = TopKSAE(model.d_model, 48, k=6).eval()
    return model, a[keep].copy(), sae


def test_rank_features_ami_equals_sklearn(setup):
    from sklearn.metrics import adjusted_mutual_info_score

    from sae_fast.steer import rank_features

    model, a, sae = setup
    layer = 1
    ranked = rank_features(sae, model, a, layer=layer, label="batch")
    assert list(ranked.columns[:2]) == ["feature", "ami"]
    assert (np.diff(ranked.ami.to_numpy()) <= 0).all()

    # independent: dense codes of every gene token, per-cell max, / max over all tokens, sklearn AMI
    F = sae.W_dec.shape[0]
    X = np.zeros((a.n_obs, F))
    with torch.no_grad():
        for batch in model.prepare(a, batch_size=5):
            h = model.forward(batch, layer=layer).hidden
            z = sae.encode(h.reshape(-1, h.shape[-1])).to_dense(F).reshape(*h.shape[:2], F).double()
            genes = (batch.mask & (batch.gene_ids >= 0)).unsqueeze(-1)
            X[batch.cell_ids.numpy()] = torch.where(genes, z, torch.zeros(())).amax(1).clamp_min(0).numpy()
    m = X.max(0)
    X = X / np.where(m > 0, m, 1)
    labels = a.obs["batch"].astype(str).to_numpy()
    ref = np.array([max(adjusted_mutual_info_score(labels == v, X[:, f] > t)
                        for v in set(labels) for t in (0, 0.2, 0.4, 0.6, 0.8)) for f in range(F)])
    got = ranked.set_index("feature").ami.reindex(range(F)).to_numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert ref.max() > 0.05  # some feature does separate the two chemistries


def test_rank_features_bad_label(setup):
    from sae_fast.steer import rank_features

    model, a, sae = setup
    with pytest.raises(UserError, match="no column 'donor'"):
        rank_features(sae, model, a, layer=1, label="donor")


def test_clamp_arms_follow_ranking_and_random_sets():
    import pandas as pd

    from sae_fast.steer import Clamp
    from sae_fast.steer.debatch import DebatchConfig, _arms

    ranking = pd.DataFrame({"feature": [7, 3, 9, 1, 0, 2, 4, 5, 6, 8], "ami": np.linspace(1, 0.1, 10)})
    cfg = DebatchConfig(n_features=[0, 3], clamp=[-2.0, 0.0], seeds=[42, 43])
    arms, rows = _arms(ranking, 10, cfg)
    assert arms["ami_n3_c-2"] == Clamp([7, 3, 9], value=-2.0)
    assert arms["ami_n3_c0"].value == 0.0
    for s in (42, 43):  # [P]'s RandomFeatureSelector: RandomState(seed).choice(F, n, replace=False)
        expect = np.random.RandomState(s).choice(10, 3, replace=False).tolist()
        assert list(arms[f"random_n3_c-2_seed{s}"].features) == expect
    assert {r["embedding"] for r in rows if r["n"] == 0} == {"unsteered"}  # no feature clamped = unsteered
    assert len(rows) == 2 * 2 * 3
    with pytest.raises(UserError, match="out of range"):
        _arms(ranking, 10, DebatchConfig(n_features=[11]))
