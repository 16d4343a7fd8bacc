"""AIDO.Cell: official-layout checkpoints load strictly and match SPEC's equations, written out here.

The reference, modelgenerator's modeling_cellfoundation.py, cannot be installed here with its dependencies (it
pulls in lightning, flash-attn and the rest of modelgenerator's stack), so unlike scGPT and Geneformer the parity
test compares against a float64 transcription of SPEC §4, whose equations were read off that file; the two cell
embedding rules ([Y]'s and modelgenerator's) are transcribed from their code the same way."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import save_file

from sae_fast import load_model
from sae_fast.errors import CheckpointError, UserError

H, N_LAYERS, N_HEADS, FFN, N_GENES, BINS = 24, 3, 4, 40, 37, 100
GENES = [f"G{i}" for i in range(N_GENES)]


def official_state_dict(norm: str, bias: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the HF key names that SPEC §4 lists (written by hand, not read off our module)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    sd = {"bert.gene_embedding.linear1.weight": r(BINS, 1, scale=1.0),
          "bert.gene_embedding.linear1.bias": r(BINS),
          "bert.gene_embedding.linear2.weight": r(BINS, BINS, scale=0.1),
          "bert.gene_embedding.linear2.bias": r(BINS),
          "bert.gene_embedding.lookup_table.weight": r(BINS, H, scale=1.0),
          "bert.gene_embedding.mask_embedding.weight": r(1, H, scale=1.0),
          "bert.gene_embedding.pad_embedding.weight": r(1, H, scale=1.0),
          "bert.position_embedding.weight": r(N_GENES + 2, H, scale=1.0)}

    def add_norm(prefix):
        sd[prefix + ".weight"] = 1 + r(H, scale=0.1)
        if norm == "LayerNorm":
            sd[prefix + ".bias"] = r(H, scale=0.1)

    def add_linear(prefix, n_out, n_in):
        sd[prefix + ".weight"] = r(n_out, n_in, scale=n_in ** -0.5)
        if bias:
            sd[prefix + ".bias"] = r(n_out, scale=0.1)

    for i in range(N_LAYERS):
        p = f"bert.encoder.layer.{i}"
        add_norm(f"{p}.attention.ln")
        for name in ("query", "key", "value"):
            add_linear(f"{p}.attention.self.{name}", H, H)
        add_linear(f"{p}.attention.output.dense", H, H)
        add_norm(f"{p}.ln")
        add_linear(f"{p}.mlp.up_proj", FFN, H)
        add_linear(f"{p}.mlp.gate_proj", FFN, H)
        add_linear(f"{p}.mlp.down_proj", H, FFN)
    add_norm("bert.encoder.ln")
    sd["cls.predictions.transform.dense.weight"] = r(H, H, scale=H ** -0.5)
    sd["cls.predictions.transform.dense.bias"] = r(H, scale=0.1)
    add_norm("cls.predictions.transform.LayerNorm")
    sd["cls.predictions.decoder.weight"] = r(1, H)
    sd["cls.predictions.bias"] = r(1)
    sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"].clone()  # tied in the reference
    return sd


def write_checkpoint(path, sd, norm: str, bias: bool, fmt: str = "safetensors", genes=GENES,
                     n_positions=N_GENES):
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "cellfoundation", "architectures": ["CellFoundationForMaskedLM"],
              "hidden_size": H, "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS,
              "intermediate_size": FFN, "layer_norm_eps": 1e-5, "max_position_embeddings": n_positions,
              "bin_num": BINS, "bin_alpha": 1.0,
              "pad_token_id": -2, "mask_token_id": -1, "add_linear_bias": bias, "normalization_type": norm,
              "hidden_act": "swiglu", "vocab_size": 16, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "genes.tsv").write_text("\n".join(genes) + "\n")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    else:
        torch.save(sd, path / "pytorch_model.bin")
    return path


def reference_forward(sd, norm: str, values: torch.Tensor):
    """SPEC §4 in float64, attention with the full T x T matrix. Returns (block outputs, expr, final hidden)."""
    w = {k: v.double() for k, v in sd.items()}

    def lin(x, p):
        y = x @ w[p + ".weight"].T
        return y + w[p + ".bias"] if p + ".bias" in w else y

    def nrm(x, p):
        if norm == "LayerNorm":
            mu = x.mean(-1, keepdim=True)
            var = ((x - mu) ** 2).mean(-1, keepdim=True)
            return (x - mu) / torch.sqrt(var + 1e-5) * w[p + ".weight"] + w[p + ".bias"]
        return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * w[p + ".weight"]

    x = values.double().unsqueeze(-1)
    u = lin(x, "bert.gene_embedding.linear1")
    u = torch.where(u > 0, u, 0.1 * u)
    z = 1.0 * u + lin(u, "bert.gene_embedding.linear2")
    soft = torch.exp(z - z.max(-1, keepdim=True).values)
    soft = soft / soft.sum(-1, keepdim=True)
    e = soft @ w["bert.gene_embedding.lookup_table.weight"]
    e[values == -1] = w["bert.gene_embedding.mask_embedding.weight"][0]
    e[values == -2] = w["bert.gene_embedding.pad_embedding.weight"][0]
    B, T = values.shape
    h = e + w["bert.position_embedding.weight"][:T]
    outs, hd = [], H // N_HEADS
    for i in range(N_LAYERS):
        p = f"bert.encoder.layer.{i}"
        a = nrm(h, f"{p}.attention.ln")
        q, k, v = (lin(a, f"{p}.attention.self.{n}").view(B, T, N_HEADS, hd).transpose(1, 2)
                   for n in ("query", "key", "value"))
        scores = q @ k.transpose(-1, -2) / hd ** 0.5
        att = torch.softmax(scores, -1) @ v
        h = h + lin(att.transpose(1, 2).reshape(B, T, H), f"{p}.attention.output.dense")
        m = nrm(h, f"{p}.ln")
        g = lin(m, f"{p}.mlp.gate_proj")
        h = h + lin(g / (1 + torch.exp(-g)) * lin(m, f"{p}.mlp.up_proj"), f"{p}.mlp.down_proj")
        outs.append(h)
    last = nrm(h, "bert.encoder.ln")
    t = lin(last, "cls.predictions.transform.dense")
    t = 0.5 * t * (1 + torch.erf(t / 2 ** 0.5))
    t = nrm(t, "cls.predictions.transform.LayerNorm")
    expr = (t @ w["cls.predictions.decoder.weight"].T)[..., 0] + w["cls.predictions.bias"]
    return outs, expr[:, :N_GENES], last


def random_counts(n_cells=5, genes=GENES, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(0.6, 3.0, size=(n_cells, len(genes)))).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(X))
    adata.var_names = list(genes)
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    return adata


@pytest.mark.parametrize("norm,bias,fmt", [("LayerNorm", False, "safetensors"), ("LayerNorm", True, "bin"),
                                           ("RMSNorm", True, "safetensors"), ("RMSNorm", False, "bin")])
def test_parity_with_spec_equations(tmp_path, norm, bias, fmt):
    sd = official_state_dict(norm, bias)
    path = write_checkpoint(tmp_path / "ckpt", sd, norm, bias, fmt)
    model = load_model("aido_cell", path=path, dtype=torch.float64)
    assert (model.n_layers, model.d_model, model.genes) == (N_LAYERS, H, GENES)
    data_genes = GENES[5:30] + ["NOT_A_GENE"]  # genes 0-4 and 30-36 are absent from the AnnData
    batch = next(iter(model.prepare(random_counts(genes=data_genes), batch_size=5)))
    values = batch.inputs["values"].clone()
    values[0, 7], values[1, 5], values[2, 9] = -1.0, -2.0, -1.0  # masked and padded positions
    batch = batch._replace(inputs={**batch.inputs, "values": values})
    ref_outs, ref_expr, last = reference_forward(sd, norm, values)
    for layer in range(N_LAYERS):
        hidden = model(batch, layer=layer, stop=True).hidden
        torch.testing.assert_close(hidden, ref_outs[layer], rtol=1e-9, atol=1e-9)
    out = model(batch)
    torch.testing.assert_close(out.expression, ref_expr, rtol=1e-9, atol=1e-9)
    # [Y]'s rule (default): mean over the vocabulary genes present in the AnnData, no depth tokens
    torch.testing.assert_close(out.embedding, last[:, 5:30].mean(1), rtol=1e-9, atol=1e-9)
    # modelgenerator's rule: drop the 2 depth tokens, average every other position
    model.embedding_rule = "all_genes"
    torch.testing.assert_close(model(batch).embedding, last[:, :N_GENES].mean(1), rtol=1e-9, atol=1e-9)
    model32 = load_model("aido_cell", path=path)  # fp32 on the CPU by default
    assert model32.bert.position_embedding.weight.dtype == torch.float32
    torch.testing.assert_close(model32(batch).expression.double(), ref_expr, rtol=1e-4, atol=1e-4)


def _error(tmp_path, mutate, genes=GENES):
    sd = official_state_dict("LayerNorm", False)
    mutate(sd)
    path = write_checkpoint(tmp_path / "bad", sd, "LayerNorm", False, genes=genes)
    with pytest.raises(CheckpointError) as e:
        load_model("aido_cell", path=path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_checkpoints_name_the_key(tmp_path):
    key = "bert.encoder.layer.1.mlp.up_proj.weight"
    msg = _error(tmp_path, lambda sd: sd.__setitem__(key, sd[key].T.contiguous()))
    # the one shared check (models/checkpoint.py): the same wording as scGPT's and scFoundation's
    assert f"key {key!r} has shape ({H}, {FFN}), expected ({FFN}, {H})" in msg
    msg = _error(tmp_path, lambda sd: sd.pop("bert.encoder.layer.2.attention.self.key.weight"))
    assert "missing key 'bert.encoder.layer.2.attention.self.key.weight'" in msg
    extra = "bert.encoder.layer.0.attention.self.query.bias"
    msg = _error(tmp_path, lambda sd: sd.__setitem__(extra, torch.zeros(H)))
    assert f"unexpected key {extra!r}" in msg
    msg = _error(tmp_path, lambda sd: None, genes=GENES[:-1])  # vocabulary one gene short of the weights
    assert "bert.position_embedding.weight" in msg and "vocabulary" in msg


def test_bad_directory(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_model("aido_cell", path=tmp_path)
    write_checkpoint(tmp_path / "x", official_state_dict("LayerNorm", False), "LayerNorm", False)
    (tmp_path / "x" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors or pytorch_model.bin"):
        load_model("aido_cell", path=tmp_path / "x")


@pytest.fixture(scope="module")
def model_and_batch(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("m") / "ckpt", official_state_dict("LayerNorm", True),
                            "LayerNorm", True)
    model = load_model("aido_cell", path=path)
    model._path = path
    return model, next(iter(model.prepare(random_counts(4), batch_size=4)))


def test_hooks_identity_stop_start(model_and_batch):
    model, batch = model_and_batch
    full = model(batch, layer=1)
    seen = []
    ident = model(batch, layer=1, hook=lambda h, b: seen.append(h.clone()))
    ident2 = model(batch, layer=1, hook=lambda h, b: h)
    for out in (ident, ident2):
        assert torch.equal(out.hidden, full.hidden) and torch.equal(out.expression, full.expression)
        assert torch.equal(out.embedding, full.embedding)
    stopped = model(batch, layer=1, stop=True)
    assert torch.equal(stopped.hidden, full.hidden) and torch.equal(seen[0], full.hidden)
    assert stopped.expression is None and stopped.embedding is None
    resumed = model(batch, layer=1, start=full.hidden)
    torch.testing.assert_close(resumed.expression, full.expression, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.embedding, full.embedding, rtol=0, atol=1e-6)


def test_stop_computes_nothing_downstream(model_and_batch):
    model, batch = model_and_batch
    calls = []
    handles = [blk.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
               for k, blk in enumerate(model.bert.encoder.layer)]
    handles.append(model.cls.register_forward_hook(lambda m, i, o: calls.append("head")))
    try:
        model(batch, layer=0, stop=True)
        assert calls == [0]
        calls.clear()
        model(batch, layer=0, start=torch.zeros(4, N_GENES + 2, H))
        assert calls == [1, 2]  # the head is called through cls.predictions, not cls
    finally:
        for h in handles:
            h.remove()


def test_edit_changes_only_downstream(model_and_batch):
    model, batch = model_and_batch
    full = model(batch, layer=1)
    before = model(batch, layer=0, stop=True).hidden
    delta = torch.zeros_like(full.hidden)
    delta[:, 5] = torch.randn(H)  # not a constant shift, which the next LayerNorm would erase
    edited = model(batch, layer=1, hook=lambda h, b: h + delta)
    assert torch.equal(edited.hidden, full.hidden + delta)
    assert torch.equal(model(batch, layer=0, stop=True).hidden, before)  # upstream untouched
    assert not torch.allclose(edited.expression, full.expression)
    assert not torch.allclose(edited.embedding, full.embedding)
    torch.testing.assert_close(model(batch, layer=1, start=full.hidden + delta).expression, edited.expression)


def test_prepare_normalisation_and_alignment(model_and_batch):
    model, _ = model_and_batch
    data_genes = ["G3", "EXTRA1", "G0", "G5", "G3", "EXTRA2", "G9"]  # G3 twice: the first column is used
    X = np.array([[4, 100, 1, 0, 7, 5, 2], [0, 3, 0, 2, 0, 0, 0], [1e21, 0, 1, 0, 0, 0, 0]], np.float32)
    adata = ad.AnnData(sp.csr_matrix(X))
    adata.var_names = data_genes
    prepared = model.prepare(adata, batch_size=2)
    assert len(prepared) == 2
    al = prepared.alignment
    assert al.matched == ["G0", "G3", "G5", "G9"]
    assert al.dropped_from_data == ["EXTRA1", "G3", "EXTRA2"]
    assert len(al.missing_from_data) == N_GENES - 4 and "G1" in al.missing_from_data
    batches = list(prepared)
    values = torch.cat([b.inputs["values"] for b in batches]).double().numpy()
    expected = np.zeros((3, N_GENES + 2))
    for c in range(3):
        counts = {"G3": X[c, 0], "G0": X[c, 2], "G5": X[c, 3], "G9": X[c, 6]}
        total = float(sum(counts.values()))
        for g, x in counts.items():
            expected[c, GENES.index(g)] = min(np.log1p(x / total * 1e4) if total else 0.0, 20)
        expected[c, N_GENES:] = min(max(np.log10(total), 5.0), 20.0) if total else 5.0
    np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-6)
    assert values[2, -1] == 20.0  # depth log10(1e21) = 21 is clamped
    b = batches[0]
    assert b.gene_ids[0].tolist() == list(range(N_GENES)) + [-1, -1]
    assert b.cell_ids.tolist() == [0, 1] and batches[1].cell_ids.tolist() == [2] and b.mask.all()
    assert torch.equal(b.expression[:, :N_GENES], b.inputs["values"][:, :N_GENES])
    assert (b.expression[:, -2:] == 0).all()
    dense = ad.AnnData(X)
    dense.var_names = data_genes
    from_dense = model.prepare(dense, 2)
    assert all(torch.equal(p.inputs["values"], q.inputs["values"]) for p, q in zip(from_dense, batches))


def test_prepare_masking_is_seeded(model_and_batch):
    model, _ = model_and_batch
    adata = random_counts(6)
    a = torch.cat([b.inputs["values"] for b in model.prepare(adata, 4, mask_fraction=0.3, seed=3)])
    b = torch.cat([b.inputs["values"] for b in model.prepare(adata, 4, mask_fraction=0.3, seed=3)])
    plain = torch.cat([b.inputs["values"] for b in model.prepare(adata, 4)])
    assert torch.equal(a, b)
    hidden = a == -1
    assert 0.15 < hidden[:, :N_GENES].float().mean() < 0.45 and not hidden[:, N_GENES:].any()
    assert torch.equal(a[~hidden], plain[~hidden])


@pytest.mark.parametrize("value,what", [(0.37, "non-integer"), (-1.0, "negative"), (np.nan, "non-finite")])
def test_prepare_rejects_non_counts(model_and_batch, value, what):
    model, _ = model_and_batch
    adata = random_counts(3)
    X = adata.X.toarray()
    X[1, 4] = value
    adata.X = sp.csr_matrix(X)
    with pytest.raises(UserError, match=what) as e:
        model.prepare(adata)
    assert "'cell1'" in str(e.value) and "'G4'" in str(e.value) and "raw counts" in str(e.value)


def test_prepare_no_overlap_and_missing_layer(model_and_batch):
    model, _ = model_and_batch
    adata = random_counts(2, genes=["ENSG1", "ENSG2"])
    with pytest.raises(UserError, match="vocabulary"):
        model.prepare(adata)
    with pytest.raises(UserError, match="no layer 'counts'"):
        model.prepare(random_counts(2), layer="counts")


def test_layer_range_and_argument_errors(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(UserError, match="out of range"):
        model(batch, layer=N_LAYERS)
    with pytest.raises(UserError, match="layer=L"):
        model(batch, stop=True)


def test_explicit_positions_select_genes(model_and_batch):
    """inputs["positions"] places each token at its gene's position (gene-subset training)."""
    model, batch = model_and_batch
    values = batch.inputs["values"]
    T = values.shape[1]
    full = model(batch, layer=0, stop=True).hidden
    same = batch._replace(inputs={"values": values, "positions": torch.arange(T).expand(4, -1)})
    assert torch.equal(model(same, layer=0, stop=True).hidden, full)
    keep = torch.tensor([2, 5, 11, T - 2, T - 1])
    sub = batch._replace(inputs={"values": values[:, keep], "positions": keep.expand(4, -1)},
                         mask=batch.mask[:, keep], gene_ids=batch.gene_ids[:, keep])
    expected = model.embed(values)[:, keep]
    torch.testing.assert_close(model.embed(values[:, keep], keep.expand(4, -1)), expected)
    assert model(sub).expression.shape == (4, 5)


def test_embedding_rules_and_the_present_mask(model_and_batch):
    model, _ = model_and_batch
    batch = next(iter(model.prepare(random_counts(3, genes=GENES[10:20] + ["X1"]), batch_size=3)))
    present = batch.inputs["present"]
    assert present.shape == (3, N_GENES + 2) and present[:, 10:20].all() and present.sum() == 30
    last = model.bert.encoder.ln(model(batch, layer=N_LAYERS - 1, stop=True).hidden)
    torch.testing.assert_close(model(batch).embedding, last[:, 10:20].mean(1))
    other = load_model("aido_cell", path=model_and_batch[0]._path, embedding="all_genes")
    torch.testing.assert_close(other(batch).embedding, last[:, :N_GENES].mean(1))
    with pytest.raises(UserError, match="embedding = 'mean'.*present_genes.*all_genes"):
        load_model("aido_cell", path=model_and_batch[0]._path, embedding="mean")


def test_cells_without_counts_are_refused_or_dropped(model_and_batch):
    """The reference gives NaN for a cell with no counts over the vocabulary: never zeros in silence."""
    model, _ = model_and_batch
    adata = random_counts(5, genes=GENES[:6] + ["OUTSIDE"])
    X = adata.X.toarray()
    X[1, :6] = 0
    X[1, 6] = 9  # counts, but none on a vocabulary gene
    X[3] = 0
    adata.X = sp.csr_matrix(X)
    with pytest.raises(UserError, match="cell 'cell1' \\(and 1 more\\) has no counts over aido_cell's vocabulary"):
        model.prepare(adata)
    with pytest.warns(UserWarning, match="dropped 2 of 5 cells"):
        prepared = model.prepare(adata, batch_size=2, empty="drop")
    assert len(prepared) == 2 and prepared.n_cells == 3 and prepared.alignment.dropped_cells == 2
    assert "2 cells without counts" in prepared.alignment.summary()
    batches = list(prepared)
    assert torch.cat([b.cell_ids for b in batches]).tolist() == [0, 2, 4]
    for b in batches:
        out = model(b)
        assert torch.isfinite(out.embedding).all() and torch.isfinite(out.expression).all()
    with pytest.raises(UserError, match="empty = 'skip'"):
        model.prepare(adata, empty="skip")

