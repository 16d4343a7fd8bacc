"""scFoundation: strict loading from the official checkpoint layout, and parity with a transcription of the
reference code at every encoder layer.

scFoundation's code cannot run here (its model files need einops / flash-attn stacks, its weights are gated), so
the reference is transcribed below, in float64, from these files (read through the project's code search):
- biomap-research/scFoundation, model/get_embedding.py @ 69b0710660aded7e071d4f67e9f3ac03b096e587 (the cell
  path: `x = token_emb(x); x += pos_emb(position_gene_ids); geneemb = encoder(x, x_padding)`, depth tokens
  `[float(tgthighres[1:]), log10(totalcount)]`);
- biomap-research/scFoundation, model/load.py @ 948a8ccb950d096148cf03418d870acdcadebd7b (`load_model_frommmf`:
  models.ckpt[key], `convertconfig`: config = model_config[model] + dataset_config['rnaseq'], key = what follows
  'model.'; `gatherData`: the positions with a value > 0, padded with pad_token_id in value and position);
- biomap-research/scFoundation, model/pretrainmodels/select_model.py @ 948a8ccb950d096148cf03418d870acdcadebd7b
  (encoder = pytorchTransformerModule(max_seq_len=seq_len, dim, depth, heads); pos_emb rows = seq_len + 1);
- model/pretrainmodels/mae_autobin.py (AutoDiscretizationEmbedding2, MaeAutobin.pos_emb): the official file is
  not in the index; transcribed from the copy in xbbq/scf @ fed0997bfe836ed115e87939ef6bbb570c25b807 (same path,
  "Copyright 2023 BioMap");
- model/pretrainmodels/transformer.py (pytorchTransformerModule: nn.TransformerEncoderLayer(dim, heads,
  dim * 4, batch_first=True, norm_first=False) per layer, then LayerNorm): likewise, from
  bio-info-guy/scFoundationFlash @ 0ec822e075e6641956a0cf3476c739d056856ba1 (its fast_transformers=False branch);
- [P]'s adapter, BoevaLab/sae-for-scFMs, sae4scfm/scfm/scfoundation/adapter.py and utils.py @
  817f91e4dea10f975c05859cfc260853fda5d074 (T = 4, S = log10(vocabulary total + 1e-10), pad 103; hook at
  encoder.transformer_encoder[L].norm2; embedding = concat(last real, second-to-last real, max, mean)).
"""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sae_fast import load_model
from sae_fast.errors import CheckpointError, UserError
from sae_fast.models.scfoundation import load_scfoundation

G, DIM, HEADS, DEPTH, BINS = 20, 16, 2, 3, 10
SEQ_LEN, PAD, MASK = G + 2, 15, 14  # pad_token_id is a gene position, as 103 is in the released model
GENES = [f"G{i}" for i in range(G)]
pytestmark = pytest.mark.filterwarnings("ignore:Variable names are not unique")


def official_state_dict(seed=0, decoder=True):
    """Random weights under the official key names ('model.' + module path of MaeAutobin), written by hand."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    sd = {"token_emb.mlp.weight": r(BINS, 1, scale=1.0), "token_emb.mlp.bias": r(BINS),
          "token_emb.mlp2.weight": r(BINS, BINS), "token_emb.mlp2.bias": r(BINS),
          "token_emb.emb.weight": r(BINS, DIM, scale=1.0), "token_emb.emb_mask.weight": r(1, DIM),
          "token_emb.emb_pad.weight": r(1, DIM), "pos_emb.weight": r(SEQ_LEN + 1, DIM, scale=1.0)}
    for i in range(DEPTH):
        p = f"encoder.transformer_encoder.{i}."
        sd.update({p + "self_attn.in_proj_weight": r(3 * DIM, DIM, scale=DIM ** -0.5),
                   p + "self_attn.in_proj_bias": r(3 * DIM, scale=0.1),
                   p + "self_attn.out_proj.weight": r(DIM, DIM, scale=DIM ** -0.5),
                   p + "self_attn.out_proj.bias": r(DIM, scale=0.1),
                   p + "linear1.weight": r(4 * DIM, DIM, scale=DIM ** -0.5), p + "linear1.bias": r(4 * DIM),
                   p + "linear2.weight": r(DIM, 4 * DIM, scale=(4 * DIM) ** -0.5), p + "linear2.bias": r(DIM),
                   p + "norm1.weight": 1 + r(DIM, scale=0.1), p + "norm1.bias": r(DIM, scale=0.1),
                   p + "norm2.weight": 1 + r(DIM, scale=0.1), p + "norm2.bias": r(DIM, scale=0.1)})
    sd["encoder.norm.weight"], sd["encoder.norm.bias"] = 1 + r(DIM, scale=0.1), r(DIM, scale=0.1)
    if decoder:  # the Performer decoder and its head: skipped by the loader
        sd.update({"decoder_embed.weight": r(8, DIM), "decoder_embed.bias": r(8),
                   "decoder.net.layers.0.0.fn.to_q.weight": r(8, 8), "norm.weight": r(8), "norm.bias": r(8),
                   "to_final.weight": r(1, 8), "to_final.bias": r(1)})
    return sd


def official_config(module_type="transformer"):
    enc = {"hidden_dim": DIM, "depth": DEPTH, "heads": HEADS, "dim_head": DIM // HEADS, "module_type": module_type}
    dec = {"hidden_dim": 8, "depth": 1, "heads": 2, "dim_head": 4, "module_type": "performer"}
    return {"model": "mae_autobin",
            "model_config": {"mae_autobin": {"encoder": enc, "decoder": dec, "n_class": 104, "bin_alpha": 1.0,
                                             "bin_num": BINS, "pad_token_id": PAD, "mask_token_id": MASK}},
            "dataset_config": {"rnaseq": {"seq_len": SEQ_LEN}}}


def write_ckpt(path, sd=None, config=None, extra=None):
    sub = {"config": official_config() if config is None else config,
           "state_dict": {"model." + k: v for k, v in (official_state_dict() if sd is None else sd).items()}}
    torch.save({"gene": sub, "cell": sub, "rde": sub, **(extra or {})}, path)
    return path


def counts_adata(n=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(0.5, 3.0, size=(n, G + 2))).astype(np.float32)
    X[1] = 0
    X[1, [3, 20]] = [1, 5]  # one vocabulary count: S = log10(1 + 1e-10) > 0 with [P]'s epsilon
    X[2] = rng.integers(1, 30, G + 2)  # every gene: the longest cell
    names = GENES + ["OUTSIDE", "G7"]  # G7 twice: summed
    return ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
                      var=pd.DataFrame(index=names))


def reference_tokens(adata):
    """[P]'s preprocess_data + gatherData (max_len larger than any cell: no sampling): values and positions."""
    X = adata.X.toarray().astype(np.float64)
    vocab = np.zeros((X.shape[0], G))
    for j, g in enumerate(adata.var_names):
        if g in GENES:
            vocab[:, GENES.index(g)] += X[:, j]
    row_sums = vocab.sum(1, keepdims=True)
    final = np.concatenate([np.log1p(vocab / row_sums * 1e4), np.full((len(X), 1), 4.0),
                            np.log10(row_sums + 1e-10)], axis=1)
    out = []
    for row in final:
        idx = np.nonzero(row > 0)[0]
        out.append((idx, row[idx]))
    return out


def reference_encoder(sd, values, positions, padding):
    """AutoDiscretizationEmbedding2 + pos_emb, then per layer nn.TransformerEncoderLayer (post-norm, ReLU) with
    the key padding mask, then encoder.norm; all in float64. Returns (layer outputs, final)."""
    w = {k: v.double() for k, v in sd.items()}

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * w[p + ".weight"] + w[p + ".bias"]

    x = lin(values.double().unsqueeze(-1), "token_emb.mlp")
    x = torch.where(x > 0, x, 0.1 * x)
    x = 1.0 * x + lin(x, "token_emb.mlp2")
    x = torch.softmax(x, -1) @ w["token_emb.emb.weight"]
    x[values == MASK] = w["token_emb.emb_mask.weight"][0]
    x[values == PAD] = w["token_emb.emb_pad.weight"][0]
    x = x + w["pos_emb.weight"][positions]
    B, T, _ = x.shape
    hd = DIM // HEADS
    outs = []
    for i in range(DEPTH):
        p = f"encoder.transformer_encoder.{i}."
        qkv = x @ w[p + "self_attn.in_proj_weight"].T + w[p + "self_attn.in_proj_bias"]
        q, k, v = (t.view(B, T, HEADS, hd).transpose(1, 2) for t in qkv.split(DIM, -1))
        scores = (q @ k.transpose(-1, -2)) / hd ** 0.5
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        att = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, DIM)
        x = ln(x + lin(att, p + "self_attn.out_proj"), p + "norm1")
        x = ln(x + lin(torch.relu(lin(x, p + "linear1")), p + "linear2"), p + "norm2")
        outs.append(x)
    return outs, ln(x, "encoder.norm")


@pytest.fixture(scope="module")
def model_and_batch(tmp_path_factory):
    path = write_ckpt(tmp_path_factory.mktemp("scf") / "models.ckpt")
    model = load_model("scfoundation", path=path.parent, genes=GENES)
    return model, next(iter(model.prepare(counts_adata(), batch_size=6)))


def test_tokens_match_the_adapter(model_and_batch):
    model, batch = model_and_batch
    for b, (idx, vals) in enumerate(reference_tokens(counts_adata())):
        n = int(batch.mask[b].sum())
        assert batch.inputs["positions"][b, :n].tolist() == idx.tolist()
        np.testing.assert_allclose(batch.inputs["values"][b, :n].numpy(), vals, rtol=1e-6)
        assert (batch.inputs["positions"][b, n:] == PAD).all() and (batch.inputs["values"][b, n:] == PAD).all()
        genes = idx[idx < G]
        assert batch.gene_ids[b, :len(genes)].tolist() == genes.tolist()
        assert (batch.gene_ids[b, len(genes):] == -1).all()
    assert (~batch.mask).any() and batch.mask.shape[1] == G + 2  # padding, and the full cell: every gene + T + S
    assert batch.inputs["positions"][1, :int(batch.mask[1].sum())].tolist() == [3, G, G + 1]


def test_parity_at_every_encoder_layer(model_and_batch):
    model, batch = model_and_batch
    sd = official_state_dict()
    padding = ~batch.mask
    ref_layers, ref_last = reference_encoder(sd, batch.inputs["values"], batch.inputs["positions"], padding)
    with torch.no_grad():
        for L in range(DEPTH):
            out = model(batch, layer=L, stop=True)
            torch.testing.assert_close(out.hidden[batch.mask].double(), ref_layers[L][batch.mask], rtol=0, atol=1e-5)
        out = model(batch)
    assert out.expression is None
    m = batch.mask
    for b in range(len(m)):
        n = int(m[b].sum())
        last = ref_last[b, :n]
        want = torch.cat([last[n - 1], last[n - 2], last.max(0).values, last.mean(0)])  # [P]'s rule
        torch.testing.assert_close(out.embedding[b].double(), want, rtol=0, atol=1e-5)
    model.embedding_rule = "genes"  # scFoundation's get_embedding.py: pools over geneemb[:, :-2]
    try:
        with torch.no_grad():
            genes_only = model(batch).embedding
    finally:
        model.embedding_rule = "all_tokens"
    b = 0
    n = int(m[b].sum())
    want = torch.cat([ref_last[b, n - 1], ref_last[b, n - 2], ref_last[b, :n - 2].max(0).values,
                      ref_last[b, :n - 2].mean(0)])
    torch.testing.assert_close(genes_only[b].double(), want, rtol=0, atol=1e-5)


def test_hooks_stop_start_and_no_decoder(model_and_batch):
    model, batch = model_and_batch
    with torch.no_grad():
        base = [model(batch, layer=L) for L in range(DEPTH)]
        for L in range(DEPTH):
            ident = model(batch, layer=L, hook=lambda h, b: h)
            assert torch.equal(ident.embedding, base[L].embedding) and torch.equal(ident.hidden, base[L].hidden)
            resumed = model(batch, layer=L, start=base[L].hidden)
            torch.testing.assert_close(resumed.embedding, base[L].embedding, rtol=0, atol=1e-6)
        edited = model(batch, layer=1, hook=lambda h, b: h * 2.0)
        assert torch.equal(edited.hidden, base[1].hidden * 2.0)
        assert not torch.allclose(edited.embedding, base[1].embedding)
    with pytest.raises(UserError, match="scfoundation gives no predicted expression here: scFoundation's decoder"):
        model.require_expression(base[0])
    with pytest.raises(UserError, match="out of range"):
        model(batch, layer=DEPTH)


def test_strict_loading(tmp_path):
    def err(**kw):
        with pytest.raises(CheckpointError) as e:
            load_scfoundation(write_ckpt(tmp_path / f"m{len(list(tmp_path.iterdir()))}.ckpt", **kw), genes=GENES)
        assert "\n" not in str(e.value)
        return str(e.value)

    key = "encoder.transformer_encoder.1.linear2.bias"
    assert f"missing key {key!r}" in err(sd={k: v for k, v in official_state_dict().items() if k != key})
    assert "unexpected key 'encoder.extra.weight'" in err(sd={**official_state_dict(), "encoder.extra.weight":
                                                              torch.zeros(2)})
    msg = err(sd={**official_state_dict(), "token_emb.mlp2.weight": torch.zeros(BINS, BINS + 1)})
    assert "key 'token_emb.mlp2.weight' has shape (10, 11), expected (10, 10)" in msg
    assert "module_type = 'performer'" in err(config=official_config("performer"))
    # a pickle holding more than weights (here an argparse.Namespace) is refused without running it
    msg = err(extra={"args": argparse.Namespace(lr=1)})
    assert "weights-only" in msg
    ok = load_scfoundation(write_ckpt(tmp_path / "ok.ckpt"), genes=GENES)
    assert ok.ignored_keys and all(k.startswith(("decoder", "norm.", "to_final.")) for k in ok.ignored_keys)
    with pytest.raises(CheckpointError, match="no model 'celltype'"):
        load_scfoundation(tmp_path / "ok.ckpt", key="celltype", genes=GENES)
    with pytest.raises(CheckpointError, match="vocabulary mismatch"):
        load_scfoundation(tmp_path / "ok.ckpt")  # the bundled 19,264 genes do not fit seq_len 22
    with pytest.raises(UserError, match="models.ckpt"):
        load_scfoundation(tmp_path / "missing")


def test_empty_cells_and_gene_sampling(model_and_batch):
    model, _ = model_and_batch
    adata = counts_adata()
    X = adata.X.toarray()
    X[4, :G] = 0
    adata.X = sp.csr_matrix(X)
    with pytest.raises(UserError, match="cell 'c4' has no counts over scFoundation's vocabulary"):
        model.prepare(adata)
    with pytest.warns(UserWarning, match="dropped 1 of 6 cells"):
        prepared = model.prepare(adata, empty="drop")
    assert next(iter(prepared)).cell_ids.tolist() == [0, 1, 2, 3, 5]
    sampled = next(iter(model.prepare(counts_adata(), max_genes=5, seed=1)))
    full = next(iter(model.prepare(counts_adata())))
    for b in range(6):
        n_genes = int((full.gene_ids[b] >= 0).sum())
        pos = sampled.inputs["positions"][b, :int(sampled.mask[b].sum())].tolist()
        assert int((sampled.gene_ids[b] >= 0).sum()) == min(n_genes, 5) and pos == sorted(pos)
        assert pos[-2:] == [G, G + 1]  # T and S always kept, last
        assert set(pos) <= set(full.inputs["positions"][b, :int(full.mask[b].sum())].tolist())
