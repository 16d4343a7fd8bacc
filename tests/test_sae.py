"""The SAE family: formulas against dense float64 references, and recovery of a planted dictionary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from scipy.optimize import minimize

import sae_fast
from sae_fast.sae import evaluate, train_sae
from sae_fast.sae.modules import geometric_median

ARCHS = ["topk", "batchtopk", "relu", "gated", "matryoshka"]


def _randomise(sae, seed=0):
    """Move every parameter off its initial value, so tests do not pass by symmetry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        sae.normalize_decoder()
    return sae


def _dense_topk_reference(sae, x, k, relu=True):
    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    v, i = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, i, v.relu() if relu else v)
    return z, z @ sae.W_dec + sae.b_pre


@pytest.mark.parametrize("relu", [True, False])
def test_topk_forward_and_gradients_match_dense_float64(relu):
    torch.manual_seed(1)
    sae = _randomise(sae_fast.TopKSAE(13, 37, 5, relu=relu).double())
    x = torch.randn(29, 13, dtype=torch.float64) * 2 + 0.5
    x_hat, code = sae(x)
    assert code.indices.shape == code.values.shape == (29, 5)
    z_ref, xhat_ref = _dense_topk_reference(sae, x, 5, relu)
    torch.testing.assert_close(code.to_dense(37), z_ref)
    torch.testing.assert_close(x_hat, xhat_ref)

    sae.loss(x).loss.backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    (xhat_ref - x).pow(2).sum(1).mean().backward()  # recompute graph for the reference
    for n, p in sae.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, msg=f"gradient of {n}")


def test_dense_arches_code_is_padded_exact_dense_code():
    torch.manual_seed(2)
    x = torch.randn(40, 11, dtype=torch.float64)
    relu = _randomise(sae_fast.ReLUSAE(11, 23).double())
    z = torch.relu((x - relu.b_pre) @ relu.W_enc.T + relu.b_enc)
    code = relu.encode(x)
    assert code.indices.shape[1] == int((z > 0).sum(1).max())
    torch.testing.assert_close(code.to_dense(23), z)
    torch.testing.assert_close(relu(x)[0], z @ relu.W_dec + relu.b_pre)

    gated = _randomise(sae_fast.GatedSAE(11, 23).double(), seed=3)
    W_mag = gated.r_mag.exp()[:, None] * gated.W_enc
    pi_gate = (x - gated.b_pre) @ gated.W_enc.T + gated.b_enc
    f = (pi_gate > 0) * torch.relu((x - gated.b_pre) @ W_mag.T + gated.b_mag)
    torch.testing.assert_close(gated.encode(x).to_dense(23), f)
    out = gated.loss(x)
    ref = ((f @ gated.W_dec + gated.b_pre - x).pow(2).sum(1).mean()
           + gated.cfg.l1_coeff * torch.relu(pi_gate).sum(1).mean()
           + (torch.relu(pi_gate) @ gated.W_dec + gated.b_pre - x).pow(2).sum(1).mean())
    torch.testing.assert_close(out.loss, ref)


def test_batchtopk_keeps_k_per_token_on_average_and_learns_threshold():
    torch.manual_seed(4)
    sae = _randomise(sae_fast.BatchTopKSAE(12, 40, 3).double())
    x = torch.randn(50, 12, dtype=torch.float64)
    pre = torch.relu((x - sae.b_pre) @ sae.W_enc.T + sae.b_enc)
    kth = pre.detach().flatten().topk(150).values.min()
    code = sae.encode(x)
    torch.testing.assert_close(code.to_dense(40), pre * (pre >= kth))
    assert float(sae.threshold_weight) == 0  # not learned: eval would still use the batch rule
    sae.loss(x)
    assert float(sae.threshold) == pytest.approx(float(kth))
    sae.loss(x * 1.5)
    pre2 = torch.relu((1.5 * x - sae.b_pre) @ sae.W_enc.T + sae.b_enc).detach()
    kth2 = pre2.flatten().topk(150).values.min()
    # the bias-corrected average: weights beta and 1 for the two batches, whatever beta (the first batch's value
    # is not privileged)
    beta = sae.cfg.threshold_beta
    assert float(sae.threshold) == pytest.approx((beta * float(kth) + float(kth2)) / (beta + 1))
    assert float(sae.threshold_weight) == pytest.approx(1 - beta**2)
    sae.eval()
    code = sae.encode(x)
    torch.testing.assert_close(code.to_dense(40), pre * (pre > sae.threshold))


def test_matryoshka_loss_is_mean_of_prefix_reconstructions():
    torch.manual_seed(5)
    sae = _randomise(sae_fast.MatryoshkaSAE(10, 32, 4, matryoshka_prefixes=[4, 12]).double())
    assert sae.cfg.matryoshka_prefixes == [4, 12, 32]
    x = torch.randn(30, 10, dtype=torch.float64)
    out = sae.loss(x)
    z = out.code.to_dense(32)
    losses = [((z[:, :m] @ sae.W_dec[:m] + sae.b_pre - x).pow(2).sum(1).mean()) for m in (4, 12, 32)]
    torch.testing.assert_close(out.loss, torch.stack(losses).mean())
    torch.testing.assert_close(out.mse, losses[-1])


def test_auxk_trains_dead_latents_only_and_matches_reference():
    torch.manual_seed(6)
    sae = _randomise(sae_fast.TopKSAE(8, 30, 3, dead_tokens=10, aux_k=4).double())
    x = torch.randn(20, 8, dtype=torch.float64)
    dead = torch.zeros(30, dtype=torch.bool)
    dead[[1, 5, 7, 11, 20, 29]] = True
    sae.mark_fired(~dead, 10)  # live latents just fired; the dead ones have waited 10 tokens
    assert torch.equal(sae.dead_mask, dead)
    out = sae.loss(x)
    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    v, i = pre.masked_fill(~dead, float("-inf")).topk(4, dim=1)
    e_hat = torch.zeros_like(pre).scatter(1, i, v.relu()) @ sae.W_dec
    ref = min(6 / 4, 1.0) * (e_hat - (x - sae(x)[0]).detach()).pow(2).sum(1).mean()
    torch.testing.assert_close(out.aux, ref)
    assert out.aux > 0
    sae.eval()
    assert float(sae.loss(x).aux) == 0.0  # no AuxK outside training


def test_decoder_constraint_projects_gradient_and_renormalises():
    torch.manual_seed(7)
    sae = _randomise(sae_fast.TopKSAE(9, 21, 4))
    sae.loss(torch.randn(64, 9)).loss.backward()
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(21))


def test_geometric_median_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)) + np.array([3, 0, -2, 1, 0])
    x[:10] += 50  # outliers the mean would follow
    ref = minimize(lambda y: np.linalg.norm(x - y, axis=1).sum(), x.mean(0), method="Nelder-Mead",
                   options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 20000}).x
    ours = geometric_median(torch.from_numpy(x), iters=200).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_init_ties_encoder_to_decoder_with_unit_rows():
    sae = sae_fast.TopKSAE(16, 48, 4)
    assert sae.W_dec.shape == sae.W_enc.shape == (48, 16)
    assert torch.equal(sae.W_enc, sae.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))


def test_bad_sizes_raise_user_errors():
    with pytest.raises(sae_fast.errors.UserError, match="k = 99"):
        sae_fast.TopKSAE(8, 16, 99)
    with pytest.raises(sae_fast.errors.UserError, match="matryoshka_prefixes"):
        sae_fast.MatryoshkaSAE(8, 16, 2, matryoshka_prefixes=[40])


# --- planted dictionary -------------------------------------------------------------------------------------

D_IN, N_ATOMS, N_TOKENS, K_TRUE = 32, 64, 30_000, 4
L1 = 0.05


@pytest.fixture(scope="module")
def planted():
    """x = sum of 4 atoms of a random unit-norm dictionary with positive weights, plus an offset and noise."""
    g = torch.Generator().manual_seed(0)
    atoms = nnf.normalize(torch.randn(N_ATOMS, D_IN, generator=g), dim=1)
    idx = torch.rand(N_TOKENS, N_ATOMS, generator=g).argsort(1)[:, :K_TRUE]
    coef = torch.zeros(N_TOKENS, N_ATOMS).scatter_(1, idx, 0.5 + 2 * torch.rand(N_TOKENS, K_TRUE, generator=g))
    x = coef @ atoms + 0.02 * torch.randn(N_TOKENS, D_IN, generator=g) + 0.3
    return atoms, x


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread avoids thread contention on a busy CI machine (10x faster there)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _objective(sae, x) -> float:
    """The training objective on all of x in float64 (train mode: BatchTopK's batch rule), without AuxK (no
    latent counts as dead here)."""
    sae = sae.double().train()
    sae.tokens_since_fired.zero_()
    with torch.no_grad():
        return float(sae.loss(x.double()).loss)


def _planted_truth_objective(arch, atoms, x) -> float:
    """The objective of the generating dictionary itself as an SAE of this architecture (W_enc = W_dec = atoms,
    b_pre = the offset), for ReLU/Gated with the float64-best common encoder bias on a grid: a feasible point
    of the training problem, so training must end at least as low."""
    kw = {"l1_coeff": L1} if arch in ("relu", "gated") else {"k": K_TRUE}
    best = float("inf")
    for bias in ([0.0] if "k" in kw else [-0.1 * i for i in range(16)]):
        truth = sae_fast.sae.modules.ARCH_CLASSES[arch](D_IN, N_ATOMS, **kw)
        with torch.no_grad():
            truth.W_dec.copy_(atoms)
            truth.W_enc.copy_(atoms)
            truth.b_enc.fill_(bias)
            truth.b_pre.fill_(0.3)
        best = min(best, _objective(truth, x))
    return best


def _least_squares_fvu(sae, x) -> float:
    """FVU of the float64 least-squares decoder (and bias) for the SAE's own codes: the optimum its decoder
    approaches for a pure-MSE objective."""
    with torch.no_grad():
        z = sae.encode(x).to_dense(sae.cfg.n_features).double()
    Z = torch.cat([z, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    x64 = x.double()
    fit = Z @ torch.linalg.lstsq(Z, x64).solution
    return float((fit - x64).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_dictionary(arch, planted, one_thread):
    """Default settings (no per-test threshold tuning). Bounds with a reason: the training objective ends below
    the planted truth's (a feasible point); TopK/BatchTopK decode within 5% of the float64 least-squares
    optimum for their own codes, recover every atom (mean best cosine >= 0.95) and keep k features per token
    at inference (BatchTopK's learned threshold: at c3e3240 it stayed near its random-init value and kept ~2)."""
    atoms, x = planted
    sae_fast.utils.VERBOSITY = 0
    sae = train_sae(list(x.split(1000)), arch=arch, n_features=2 * N_ATOMS, k=K_TRUE, epochs=5, batch_size=512,
                    lr=3e-3, l1_coeff=L1, seed=0)
    result = evaluate(sae, x)
    assert result.n_tokens == len(x)
    if arch in ("topk", "batchtopk"):
        assert result.fvu <= 1.05 * _least_squares_fvu(sae, x), result
        best_cos = (nnf.normalize(sae.W_dec.detach(), dim=1) @ atoms.T).max(0).values
        assert best_cos.mean() >= 0.95, float(best_cos.mean())
        assert result.l0 == pytest.approx(K_TRUE, rel=0.1), result
    assert _objective(sae, x) <= _planted_truth_objective(arch, atoms, x)
