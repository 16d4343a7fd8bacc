"""Geneformer adapter: parity with transformers' BertForMaskedLM, rank-value encoding, errors, hooks.

The network is compared with transformers' BertForMaskedLM itself (every hidden state and the MLM head). The
geneformer package (tokeniser, EmbExtractor) is not installable here, so the rank-value encoding and the mean
pooling are checked against their documented rules, applied to the reference model's own hidden states."""

from __future__ import annotations

import json
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sae_fast.errors import CheckpointError, UserError

transformers = pytest.importorskip("transformers", reason="Geneformer needs the optional transformers")
from sae_fast.models.geneformer import load_geneformer  # noqa: E402

N_GENES, LAYERS, D = 30, 3, 32


def _dictionaries(version):
    genes = [f"ENSG{i:011d}" for i in range(N_GENES)]
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if version == 2 else [])
    tokens = {t: i for i, t in enumerate(specials)}
    tokens.update({g: len(specials) + i for i, g in enumerate(genes)})
    rng = np.random.default_rng(version)
    medians = {g: float(m) for g, m in zip(genes[:-1], rng.uniform(0.5, 3.0, N_GENES - 1))}  # last: no median
    return tokens, medians


def _hf_dir(path, version, max_pos=24):
    tokens, _ = _dictionaries(version)
    cfg = transformers.BertConfig(vocab_size=len(tokens), hidden_size=D, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, intermediate_size=48, hidden_act="relu",
                                  max_position_embeddings=max_pos, pad_token_id=0)
    torch.manual_seed(version)
    ref = transformers.BertForMaskedLM(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(path)
    return ref.eval()


def _adata(n_cells=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(0.5, 3.0, size=(n_cells, N_GENES + 2))).astype(np.float32)
    X[1] = 0
    X[1, 4] = 2  # a cell with a single gene
    X[2, :] = rng.integers(1, 50, N_GENES + 2)  # every gene: truncated to the input size
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)] + ["ENSG_UNKNOWN", "ENSG00000000003"]  # 1 id twice
    var = pd.DataFrame({"ensembl_id": ids}, index=[f"gene{i}" for i in range(N_GENES + 2)])
    return ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]), var=var)


@pytest.fixture(scope="module", params=[1, 2])
def setup(request, tmp_path_factory):
    version = request.param
    path = tmp_path_factory.mktemp(f"gf{version}")
    ref = _hf_dir(path, version)
    tokens, medians = _dictionaries(version)
    model = load_geneformer(path, token_dictionary=tokens, gene_median=medians, version=version, device="cpu")
    return version, ref, model, path


def test_parity_with_bert_for_masked_lm(setup):
    version, ref, model, _ = setup
    batch = next(iter(model.prepare(_adata(), batch_size=6)))
    ids, mask = batch.inputs["input_ids"], batch.mask
    assert (~mask).any() and ids.shape[1] == 24  # padding, and the full cell truncated to the input size
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        for L in range(LAYERS):
            out = model.forward(batch, layer=L)
            want = expected.hidden_states[L + 1]
            torch.testing.assert_close(out.hidden[mask], want[mask], rtol=0, atol=1e-5)
    logp = expected.logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    genes = batch.gene_ids >= 0
    torch.testing.assert_close(out.expression[genes], logp[genes], rtol=0, atol=1e-5)
    assert (out.expression[~genes] == 0).all()
    # Geneformer's EmbExtractor: mean of hidden_states[n_layers - 1] over positions 1..n-2 (V2), 0..n-1 (V1)
    pen = expected.hidden_states[LAYERS - 1]
    for b, n in enumerate(mask.sum(1).tolist()):
        lo, hi = (1, n - 1) if version == 2 else (0, n)
        want = pen[b, lo:hi].mean(0) if hi > lo else torch.zeros(D)
        torch.testing.assert_close(out.embedding[b], want, rtol=0, atol=1e-5)


def test_rank_value_encoding(setup):
    version, _, model, _ = setup
    adata = _adata()
    tokens, medians = _dictionaries(version)
    X = adata.X.toarray().astype(np.float64)
    ens = list(adata.var["ensembl_id"])
    prepared = model.prepare(adata, batch_size=4)
    # the last gene has a token but no median: outside the model's genes, like an unknown id
    assert prepared.alignment.dropped_from_data == [f"gene{N_GENES - 1}", f"gene{N_GENES}"]  # by var_names
    assert prepared.alignment.routes == {"var['ensembl_id']": N_GENES}  # gene31 is ENSG00000000003 again
    assert len(prepared.alignment.matched) == N_GENES - 1 and not prepared.alignment.missing_from_data
    cells = {int(c): (b, j) for b in prepared for j, c in enumerate(b.cell_ids)}
    assert sorted(cells) == list(range(adata.n_obs))
    for row in range(adata.n_obs):
        counts = {}
        for g, x in zip(ens, X[row]):
            counts[g] = counts.get(g, 0.0) + x
        total = X[row].sum()
        scaled = {g: c / total * 1e4 / medians[g] for g, c in counts.items() if c > 0 and g in medians}
        ranked = sorted(scaled, key=lambda g: -scaled[g])[: 22 if version == 2 else 24]
        want = [tokens[g] for g in ranked]
        if version == 2:
            want = [tokens["<cls>"], *want, tokens["<eos>"]]
        b, j = cells[row]
        n = int(b.mask[j].sum())
        assert b.inputs["input_ids"][j, :n].tolist() == want
        assert (b.inputs["input_ids"][j, n:] == tokens["<pad>"]).all()
        g = b.gene_ids[j, :n]
        assert [model.genes[i] for i in g[g >= 0]] == ranked
        vals = b.expression[j, :n][g >= 0].double().numpy()
        np.testing.assert_allclose(vals, [scaled[x] for x in ranked], rtol=1e-6)
    # n_counts from obs wins over the row sum
    adata.obs["n_counts"] = 2 * X.sum(1)
    b = next(iter(model.prepare(adata, batch_size=6)))
    base = next(iter(model.prepare(_adata(), batch_size=6)))
    assert torch.equal(b.inputs["input_ids"], base.inputs["input_ids"])
    np.testing.assert_allclose(b.expression.numpy(), base.expression.numpy() / 2, rtol=1e-6)


def test_hooks(setup):
    _, _, model, _ = setup
    batch = next(iter(model.prepare(_adata(), batch_size=6)))
    with torch.no_grad():
        base = [model.forward(batch, layer=L) for L in range(LAYERS)]
        for L in range(LAYERS):
            for hook in (lambda h, b: h, lambda h, b: None):
                o = model.forward(batch, layer=L, hook=hook)
                assert torch.equal(o.hidden, base[L].hidden) and torch.equal(o.expression, base[L].expression)
                assert torch.equal(o.embedding, base[L].embedding)
            stopped = model.forward(batch, layer=L, stop=True)
            assert torch.equal(stopped.hidden, base[L].hidden) and stopped.expression is None
            resumed = model.forward(batch, layer=L, start=base[L].hidden)
            assert torch.equal(resumed.expression, base[L].expression)
            if L <= LAYERS - 2:  # the embedding reads the penultimate layer
                assert torch.equal(resumed.embedding, base[L].embedding)
        edited = model.forward(batch, layer=2, hook=lambda h, b: h * 2.0)  # last layer: after the embedding
        assert torch.equal(edited.embedding, base[2].embedding)
        assert not torch.allclose(edited.expression, base[2].expression)
        edited = model.forward(batch, layer=0, hook=lambda h, b: h * 2.0)
        assert torch.equal(edited.hidden, base[0].hidden * 2.0)
        assert not torch.allclose(edited.embedding, base[0].embedding)


def test_dictionary_files_and_errors(setup, tmp_path):
    version, ref, model, path = setup
    tokens, medians = _dictionaries(version)
    (tmp_path / "tokens.pkl").write_bytes(pickle.dumps(tokens))
    (tmp_path / "medians.json").write_text(json.dumps(medians))
    loaded = load_geneformer(path, token_dictionary=tmp_path / "tokens.pkl",
                             gene_median=tmp_path / "medians.json", version=version, device="cpu")
    assert loaded.genes == model.genes
    with pytest.raises(UserError, match="token_dictionary="):
        load_geneformer(path, gene_median=medians, version=version)
    if version == 1:
        with pytest.raises(UserError, match="'<cls>'"):
            load_geneformer(path, token_dictionary=tokens, gene_median=medians, version=2)
    adata = _adata()
    del adata.var["ensembl_id"]
    with pytest.raises(UserError, match="Ensembl ids"):
        model.prepare(adata)  # var_names are symbols-like names, not Ensembl ids
    adata = _adata()
    adata.X = adata.X.toarray()
    adata.X[3, 5] = 0.5
    with pytest.raises(UserError, match="holds 0.5 at cell 'c3', gene 'gene5'.*raw counts"):
        list(model.prepare(adata))


def test_bad_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = _hf_dir(tmp_path, 1)
    tokens, medians = _dictionaries(1)
    state = load_file(tmp_path / "model.safetensors")

    def err(state):
        save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError) as e:
            load_geneformer(tmp_path, token_dictionary=tokens, gene_median=medians)
        assert "\n" not in str(e.value)
        return str(e.value)

    key = "bert.encoder.layer.1.output.dense.bias"
    assert f"missing key {key!r}" in err({k: v for k, v in state.items() if k != key})
    assert f"key {key!r} has the wrong shape" in err({**state, key: torch.zeros(D + 1)})
    big = {**tokens, "ENSG_EXTRA": ref.config.vocab_size}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'bert.embeddings.word_embeddings.weight'"):
        load_geneformer(tmp_path, token_dictionary=big, gene_median=medians)

