"""Steering: interventions against float64 references, bitwise no-op edits on every model of the zoo, the
streamed paired t-test against scipy, token selection, recipes, resume and bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats as st
import torch

from sae_fast import TopKSAE
from sae_fast.errors import UserError
from sae_fast.models.aido_cell import AIDOCellConfig, random_aido_cell
from sae_fast.steer import Ablate, Add, Clamp, Scale, alpha_sweep, deg, from_recipe, steer
from sae_fast.steer.runner import STATE, run_pass

N_GENES = 40


def _counts(n_cells, genes, seed=0, ensembl=False):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(0.8, 3.0, size=(n_cells, len(genes)))).astype(np.float32)
    X[:, 0] += 1  # no empty cell
    obs = pd.DataFrame({"cell_type": pd.Categorical(["A", "B"] * (n_cells // 2) + ["A"] * (n_cells % 2))},
                       index=[f"c{i}" for i in range(n_cells)])
    a = ad.AnnData(sp.csr_matrix(X), obs=obs)
    a.var_names = list(genes)
    return a


def _aido(seed=0, layers=3):
    cfg = AIDOCellConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
                         max_position_embeddings=N_GENES)
    model = random_aido_cell(cfg, [f"G{i}" for i in range(N_GENES)], seed=seed, dtype=torch.float32,
                             device="cpu")
    with torch.no_grad():  # larger weights than N(0, 0.02), so that edits visibly change the output
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10)
    return model


def _sae(d, F=64, k=8, seed=0):
    torch.manual_seed(seed)
    return TopKSAE(d, F, k=k).eval()


def _active_feature(sae, model, adata, layer):
    batch = next(iter(model.prepare(adata, batch_size=4)))
    h = model.forward(batch, layer=layer, stop=True).hidden
    code = sae.encode(h.reshape(-1, h.shape[-1]))
    return int(torch.bincount(code.indices[code.values != 0].flatten(), minlength=64).argmax())


@pytest.fixture(scope="module")
def aido():
    model = _aido()
    adata = _counts(10, [f"G{i}" for i in range(N_GENES - 3)] + ["X1", "X2"])
    sae = _sae(model.d_model)
    return model, adata, sae


# ------------------------------------------------------------------------------------------- interventions


def _dense_code64(sae, x):
    W_enc, b_enc, b_pre = (t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.b_pre))
    pre = (x.double() - b_pre) @ W_enc.T + b_enc
    top = pre.topk(sae.cfg.k, dim=1)
    z = torch.zeros_like(pre).scatter_(1, top.indices, top.values.relu())
    return z


def test_scale_matches_float64_reference():
    torch.manual_seed(1)
    sae = _sae(16, 96, 6, seed=3)
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(200, 16) * 2
    alphas = {int(f): float(a) for f, a in zip(torch.randperm(96)[:40], torch.empty(40).uniform_(-5, 5))}
    got = Scale(alphas)._edit(x, sae)
    z = _dense_code64(sae, x)
    W_dec, b_pre = sae.W_dec.detach().double(), sae.b_pre.detach().double()
    alpha = torch.ones(96, dtype=torch.float64)
    alpha[list(alphas)] = torch.tensor(list(alphas.values()), dtype=torch.float64)
    e = x.double() - (z @ W_dec + b_pre)  # the error term
    ref = (alpha * z) @ W_dec + b_pre + e  # SPEC §3's formula
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # alpha = 0 everywhere leaves e(x) + b_pre
    zero = Scale(np.zeros(96))._edit(x, sae)
    torch.testing.assert_close(zero.double(), e + b_pre, rtol=1e-5, atol=1e-5)


def test_noop_edits_are_exact_through_the_delta_path():
    sae = _sae(16, 64, 8)
    x = torch.randn(50, 16)
    # Scale at alpha = 1 (computed, not short-cut): x + 0 is x, bit for bit
    assert torch.equal(Scale({3: 1.0})._edit(x, sae), x)
    assert Scale({3: 1.0}).is_noop() and Add({5: 0.0}).is_noop() and Clamp([]).is_noop()


def test_add_clamp_ablate_against_dense_references():
    sae = _sae(16, 64, 8, seed=2)
    with torch.no_grad():
        sae.b_pre.normal_()
    x = torch.randn(30, 16)
    W_dec, b_pre = sae.W_dec.detach().double(), sae.b_pre.detach().double()
    torch.testing.assert_close(Add({3: 1.5, 7: -2.0})._edit(x, sae).double(),
                               x.double() + 1.5 * W_dec[3] - 2.0 * W_dec[7], rtol=1e-6, atol=1e-6)
    z = _dense_code64(sae, x)
    feats = z.abs().sum(0).topk(3).indices.tolist()
    zc = z.clone()
    zc[:, feats] = torch.where(z[:, feats] != 0, -2.0, 0.0).double()
    # [P]'s choice: the reconstruction replaces x; with error_term: x + W^T (z' - z)
    torch.testing.assert_close(Clamp(feats)._edit(x, sae).double(), zc @ W_dec + b_pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Clamp(feats, error_term=True)._edit(x, sae).double(),
                               x.double() + (zc - z) @ W_dec, rtol=1e-5, atol=1e-5)
    za = z.clone()
    za[:, feats] = 0
    torch.testing.assert_close(Ablate(feats)._edit(x, sae).double(), za @ W_dec + b_pre, rtol=1e-5, atol=1e-5)


def test_token_selection(aido):
    model, adata, sae = aido
    batch = next(iter(model.prepare(adata, batch_size=4)))
    h = model.forward(batch, layer=1, stop=True).hidden
    f = _active_feature(sae, model, adata, 1)
    genes_only = Scale({f: 3.0}, tokens="genes")(h, batch, sae, model)
    assert torch.equal(genes_only[:, -2:], h[:, -2:])  # AIDO.Cell's 2 depth tokens untouched
    every = Scale({f: 3.0})(h, batch, sae, model)
    assert not torch.equal(every[:, -2:], h[:, -2:])  # [Y]'s code edits every position
    two = Scale({f: 3.0}, tokens=["G1", "G4"])(h, batch, sae, model)
    changed = (two != h).any(-1).any(0)
    assert set(torch.nonzero(changed).flatten().tolist()) <= {1, 4}
    expr = Scale({f: 3.0}, tokens="expressed")(h, batch, sae, model)
    assert torch.equal(expr[batch.expression == 0], h[batch.expression == 0])
    with pytest.raises(UserError, match="'NOPE'"):
        Scale({f: 2.0}, tokens=["NOPE"]).validate(sae, model)
    hooked = model.forward(batch, layer=1, hook=Scale({f: 3.0}).hook(sae, model))
    started = model.forward(batch, layer=1, start=every)
    assert torch.equal(hooked.embedding, started.embedding)


def test_threshold_encode_takes_a_per_feature_threshold():
    """encode='threshold' on a BatchTopK SAE whose threshold is one value per feature (as SAELens' files hold)
    keeps exactly the pre-activations above their feature's threshold."""
    from sae_fast import BatchTopKSAE
    from sae_fast.steer.interventions import encode

    torch.manual_seed(2)
    sae = BatchTopKSAE(12, 40, k=4).eval()
    theta = torch.rand(40) * 0.5
    sae.threshold = theta
    sae.threshold_weight.fill_(1.0)
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(9, 12)
    code = encode(sae, x, "threshold")
    z = torch.zeros(9, 40, dtype=torch.float64).scatter_add_(1, code.indices, code.values.double())
    W_enc, b_enc, b_pre = (t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.b_pre))
    pre = (x.double() - b_pre) @ W_enc.T + b_enc
    ref = torch.where(pre > theta.double(), pre, torch.zeros_like(pre))
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-6)


def test_recipes_roundtrip():
    for iv in (Scale({3: 2.0, 5: -1.0}, tokens=["A", "B"]), Add({2: 0.5}), Clamp([1, 2], value=-3.0,
               error_term=True, encode="threshold"), Ablate([4])):
        assert from_recipe(iv.recipe()) == iv


@pytest.mark.parametrize("make,culprit", [
    (lambda: Scale({3: float("nan")}), "feature 3"), (lambda: Scale({3: float("inf")}), "inf"),
    (lambda: Add({1: float("nan")}), "feature 1"), (lambda: Clamp([1], value=float("inf")), "value"),
    (lambda: Scale({"x": 2.0}), "'x'"), (lambda: Ablate([1], value=2.0), "Ablate"),
    (lambda: Scale({1: 2.0}, tokens="some"), "tokens")])
def test_bad_interventions_one_line(make, culprit):
    with pytest.raises(UserError) as e:
        make()
    assert culprit in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- runner and DEG


def test_streamed_deg_equals_scipy_ttest_rel(aido, tmp_path):
    model, adata, sae = aido
    f = _active_feature(sae, model, adata, 1)
    res = steer(sae, model, adata, Scale({f: 4.0}), layer=1, predictions=True, batch_size=3, out=tmp_path)
    assert (tmp_path / "steered.h5ad").exists() and not (tmp_path / STATE).exists()
    assert res.n_obs == 10 and res.obsm["X_emb_steered"].shape == (10, model.d_model)
    assert list(res.var_names) == [f"G{i}" for i in range(N_GENES - 3)]  # vocabulary genes in the data
    table = deg(res, expressed_only=False)
    a = res.layers["pred_steered"].astype(np.float64)
    b = res.layers["pred_base"].astype(np.float64)
    t, p = st.ttest_rel(a, b, axis=0)
    t, p = np.where(np.isnan(t), 0, t), np.where(np.isnan(t), 1, p)
    assert np.abs(t).max() > 2  # the edit does something
    np.testing.assert_allclose(table["t"], t, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(table["p"], p, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(table["mean_diff"], (a - b).mean(0), rtol=1e-6, atol=1e-12)
    n_expr = int(res.var["expressed"].sum())
    sig = (p < 0.05 / n_expr) & (np.abs(t) > 0) & res.var["expressed"].to_numpy()
    np.testing.assert_array_equal(table["significant"], sig)
    # the recipe regenerates the run
    r = res.uns["steering"]
    assert r["layer"] == 1 and r["intervention"]["type"] == "Scale" and "torch" in r["versions"]
    again = steer(sae, model, adata, from_recipe(r["intervention"]), layer=int(r["layer"]))
    assert np.array_equal(again.obsm["X_emb_steered"], res.obsm["X_emb_steered"])


def test_resume_continues_from_the_saved_state(aido, tmp_path):
    model, adata, sae = aido
    f = _active_feature(sae, model, adata, 1)
    full = steer(sae, model, adata, Scale({f: 2.0}), layer=1, batch_size=2)

    class Killed(Exception):
        pass

    calls = {"n": 0}
    step = run_pass.__globals__["SteerPass"].step

    def dying(self, batch, prefix):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed
        return step(self, batch, prefix)

    mp = pytest.MonkeyPatch()
    mp.setattr(run_pass.__globals__["SteerPass"], "step", dying)
    with pytest.raises(Killed):
        steer(sae, model, adata, Scale({f: 2.0}), layer=1, batch_size=2, out=tmp_path, checkpoint_every=2)
    mp.undo()
    assert (tmp_path / STATE).exists() and not (tmp_path / "steered.h5ad").exists()
    with pytest.raises(UserError, match="another recipe"):
        steer(sae, model, adata, Scale({f: 3.0}), layer=1, batch_size=2, out=tmp_path)
    resumed = steer(sae, model, adata, Scale({f: 2.0}), layer=1, batch_size=2, out=tmp_path)
    for k in ("X_emb_base", "X_emb_steered"):
        assert np.array_equal(resumed.obsm[k], full.obsm[k])
    np.testing.assert_allclose(resumed.var["m2_diff"], full.var["m2_diff"], rtol=1e-12, atol=1e-15)


def test_rank_split_merges_to_the_full_run(aido):
    """Each rank steers its block of cells; rank 0's merge (what the torchrun gather does) is the full run."""
    model, adata, sae = aido
    f = _active_feature(sae, model, adata, 1)
    arms = {"steered": Scale({f: 3.0})}
    full = run_pass(sae, model, adata, arms, 1, compare=[("steered", "base")], batch_size=3)
    parts = [run_pass(sae, model, adata, arms, 1, compare=[("steered", "base")], batch_size=3, rank=r,
                      world_size=3) for r in range(3)]
    assert [(p.lo, p.hi) for p in parts] == [(0, 3), (3, 6), (6, 10)]
    for p in parts[1:]:
        parts[0].absorb(p)
    merged = parts[0]
    for k in ("base", "steered"):
        assert np.array_equal(merged.emb[k], full.emb[k])
    for a, b in ((merged.diffs[("steered", "base")], full.diffs[("steered", "base")]),
                 (merged.stats["base"], full.stats["base"])):
        assert np.array_equal(a.n, b.n)
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(a.m2, b.m2, rtol=1e-9, atol=1e-15)


def test_bad_input_one_line_nothing_written(aido, tmp_path):
    model, adata, sae = aido
    for iv, culprit in ((Scale({10_000: 2.0}), "feature 10000"), (Clamp([64]), "feature 64"),
                        (Add({-1: 1.0}), "feature -1")):
        with pytest.raises(UserError) as e:
            steer(sae, model, adata, iv, layer=1, out=tmp_path / "run")
        assert culprit in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="layer 7"):
        steer(sae, model, adata, Scale({1: 2.0}), layer=7, out=tmp_path / "run")
    with pytest.raises(UserError, match="alpha_sweep: feature 64"):
        alpha_sweep(sae, model, adata, 64, [2.0], layer=1)
    assert not (tmp_path / "run").exists()


def test_alpha_sweep_matches_single_runs(aido):
    model, adata, sae = aido
    f = _active_feature(sae, model, adata, 1)
    sweep = alpha_sweep(sae, model, adata, f, [-3.0, 3.0], layer=1, gene_sets={"S1": ["G1", "G2", "G3"]},
                        batch_size=4)
    assert list(sweep.table.columns[:6]) == ["feature", "alpha", "n_up", "n_down", "top_up_terms",
                                             "top_down_terms"]
    single = deg(steer(sae, model, adata, Scale({f: 3.0}), layer=1, batch_size=4))
    shared = sweep.degs[(3.0, "unsteered")]
    np.testing.assert_allclose(shared["t"], single["t"], rtol=1e-9)
    assert int(sweep.table.loc[1, "n_up"]) == int((single.direction == "up").sum())
    # versus alpha = 0: paired differences of the two steered outputs
    zero = steer(sae, model, adata, Scale({f: 0.0}), layer=1, predictions=True, batch_size=4)
    three = steer(sae, model, adata, Scale({f: 3.0}), layer=1, predictions=True, batch_size=4)
    t, _ = st.ttest_rel(three.layers["pred_steered"].astype(float), zero.layers["pred_steered"].astype(float))
    keep = three.var["expressed"].to_numpy()
    np.testing.assert_allclose(sweep.degs[(3.0, "alpha=0")]["t"], np.nan_to_num(t[keep]), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------- the zoo: no-op edits


def _scgpt():
    from sae_fast.models.scgpt import ScGPTConfig, load_scgpt

    cfg = ScGPTConfig.from_args({"embsize": 32, "nhead": 4, "d_hid": 48, "nlayers": 3, "max_seq_len": 24})
    genes = [f"G{i}" for i in range(N_GENES)]
    return load_scgpt(random_init_config=cfg, vocab=genes, device="cpu", embedding="mean"), \
        _counts(9, genes[:30] + ["OTHER"])


def _geneformer():
    pytest.importorskip("transformers")
    from sae_fast.models.geneformer import load_geneformer

    genes = [f"ENSG{i:011d}" for i in range(N_GENES)]
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
    medians = {g: 1.0 + (i % 5) for i, g in enumerate(genes)}
    cfg = {"vocab_size": len(tokens), "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
           "intermediate_size": 48, "max_position_embeddings": 32, "pad_token_id": 0}
    model = load_geneformer(token_dictionary=tokens, gene_median=medians, random_init_config=cfg, device="cpu",
                            dtype=torch.float32)
    adata = _counts(9, [f"g{i}" for i in range(N_GENES)])
    adata.var_names = genes
    return model, adata


def _mini():
    from sae_fast import datasets, load_model

    adata = datasets.pbmc3k()
    return load_model("mini"), adata[:6].copy()


ZOO = {"aido_cell": lambda: (_aido(), _counts(9, [f"G{i}" for i in range(N_GENES)])), "scgpt": _scgpt,
       "geneformer": _geneformer, "mini": _mini}


@pytest.mark.parametrize("name", list(ZOO))
def test_noop_edits_bitwise_on_every_model(name):
    model, adata = ZOO[name]()
    layer = 1
    sae = _sae(model.d_model, 64, 8)
    with torch.inference_mode():  # the unsteered run, under the same inference conditions (torch's
        # TransformerEncoderLayer takes another, numerically different, fast path in inference)
        plain = [model.forward(b) for b in model.prepare(adata, batch_size=4)]
    emb = torch.cat([o.embedding for o in plain]).detach().numpy()
    for iv in (Scale({3: 1.0, 9: 1.0}), Scale(np.ones(64)), Add({3: 0.0}), Clamp([]), Ablate([])):
        res = steer(sae, model, adata, iv, layer=layer, predictions=True, batch_size=4)
        assert np.array_equal(res.obsm["X_emb_steered"], emb), (name, iv)
        assert np.array_equal(res.obsm["X_emb_base"], emb), (name, iv)
        both = ~np.isnan(res.layers["pred_base"])
        assert both.any() and np.array_equal(res.layers["pred_steered"][both], res.layers["pred_base"][both])
        assert (res.var["m2_diff"] == 0).all() and (res.var["mean_diff"] == 0).all()
    # the predictions equal the plain forward's at each gene token
    lut = {g: j for j, g in enumerate(res.var_names)}
    genes = list(map(str, model.genes))
    for o, b in zip(plain, model.prepare(adata, batch_size=4)):
        E = o.expression.shape[1]
        for r, c in enumerate(b.cell_ids.tolist()):
            for t in range(E):
                g = int(b.gene_ids[r, t])
                if g >= 0 and b.mask[r, t] and genes[g] in lut:
                    assert res.layers["pred_base"][c, lut[genes[g]]] == o.expression[r, t].item()
    # and a real edit changes the output
    f = _active_feature(sae, model, adata, layer)
    moved = steer(sae, model, adata, Scale({f: 5.0}), layer=layer, batch_size=4)
    assert not np.array_equal(moved.obsm["X_emb_steered"], emb)


def test_noop_edits_bitwise_on_scfoundation(tmp_path):
    """scFoundation predicts no expression ([P] used its encoder only): the no-op edits leave its cell embedding
    bit for bit, and a real edit moves it."""
    from test_scfoundation import GENES, counts_adata, write_ckpt

    from sae_fast import load_model

    model = load_model("scfoundation", path=write_ckpt(tmp_path / "models.ckpt").parent, genes=GENES)
    adata = counts_adata(8, seed=3)
    sae = _sae(model.d_model, 64, 8)
    with torch.inference_mode():
        emb = torch.cat([model.forward(b).embedding for b in model.prepare(adata, batch_size=4)]).numpy()
    for iv in (Scale({3: 1.0, 9: 1.0}), Scale(np.ones(64)), Add({3: 0.0}), Clamp([]), Ablate([])):
        res = steer(sae, model, adata, iv, layer=1, batch_size=4)
        assert np.array_equal(res.obsm["X_emb_steered"], emb), iv
        assert np.array_equal(res.obsm["X_emb_base"], emb), iv
    moved = steer(sae, model, adata, Scale({_active_feature(sae, model, adata, 1): 5.0}), layer=1, batch_size=4)
    assert not np.array_equal(moved.obsm["X_emb_steered"], emb)
