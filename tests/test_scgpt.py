"""scGPT adapter: parity with the scgpt wheel's TransformerModel and binning, checkpoint errors, hooks.

Every model number is compared with the reference code itself, run on the CPU: scgpt/model/model.py and
scgpt/preprocess.py from the scgpt wheel, loaded by path (SPEC §4). What the wheel cannot run here is checked
against its documented rule: the tokeniser (its gene_tokenizer needs torchtext) and [P]'s mean pooling."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sae_fast.errors import CheckpointError, UserError
from sae_fast.models.scgpt import ScGPTConfig, bin_values, load_scgpt

N_GENES, D, HEADS, FF, LAYERS = 40, 32, 4, 48, 3


def _scgpt_dir() -> Path | None:
    spec = importlib.util.find_spec("scgpt")  # finds the package without running its __init__ (torchtext)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _load_by_path(name: str, file: Path, package_dir: Path | None = None):
    """Import one scgpt source file by path, under a private package name so `from .x import y` works."""
    if package_dir is not None:
        pkg = types.ModuleType("_scgpt_ref")
        pkg.__path__ = [str(package_dir)]
        sys.modules["_scgpt_ref"] = pkg
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def scgpt_ref():
    root = _scgpt_dir()
    if root is None:
        pytest.skip("the scgpt wheel is not installed (pip install --no-deps scgpt): no reference to compare")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flash_attn is not installed"
        model_mod = _load_by_path("_scgpt_ref.model", root / "model" / "model.py", root / "model")
    # preprocess.py does `from scgpt import logger`: give it a stub package holding just a logger
    stub = types.ModuleType("scgpt")
    stub.logger = __import__("logging").getLogger("scgpt-stub")
    saved = sys.modules.get("scgpt")
    sys.modules["scgpt"] = stub
    try:
        pre_mod = _load_by_path("_scgpt_ref_preprocess", root / "preprocess.py")
    finally:
        if saved is None:
            sys.modules.pop("scgpt", None)
        else:
            sys.modules["scgpt"] = saved
    return types.SimpleNamespace(model=model_mod, preprocess=pre_mod)


def _vocab():
    genes = [f"G{i}" for i in range(N_GENES)]
    return genes, {g: i for i, g in enumerate(genes + ["<pad>", "<cls>", "<eoc>"])}


def _write_checkpoint(path: Path, state: dict, vocab: dict, **args) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "best_model.pt")
    base = dict(embsize=D, nheads=HEADS, d_hid=FF, nlayers=LAYERS, n_bins=51, pad_token="<pad>", pad_value=-2,
                max_seq_len=16, input_emb_style="continuous", dropout=0.2)
    (path / "args.json").write_text(json.dumps({**base, **args}))
    (path / "vocab.json").write_text(json.dumps(vocab))
    return path


def _reference_model(scgpt_ref, vocab):
    torch.manual_seed(1)
    ref = scgpt_ref.model.TransformerModel(
        ntoken=len(vocab), d_model=D, nhead=HEADS, d_hid=FF, nlayers=LAYERS, vocab=vocab, dropout=0.2,
        pad_token="<pad>", pad_value=-2, do_mvc=True, input_emb_style="continuous", cell_emb_style="cls",
        use_fast_transformer=False)
    with torch.no_grad():  # make every weight non-trivial (LayerNorms start at 1/0)
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref.eval()


def _adata(n_cells=7, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(0.6, 2.0, size=(n_cells, N_GENES + 3))).astype(np.float32)
    X[2] = 0
    X[2, 7] = 3  # a cell with a single gene: <cls> and one token
    X[3, :30] = rng.integers(1, 9, 30)  # a cell longer than max_seq_len - 1 = 15 -> sampled
    names = [f"G{i}" for i in range(N_GENES)] + ["NOT_IN_VOCAB1", "NOT_IN_VOCAB2", "G5"]  # G5 twice: summed
    return ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                      var={"sym": names}).copy()


@pytest.fixture(scope="module")
def parity(scgpt_ref, tmp_path_factory):
    genes, vocab = _vocab()
    ref = _reference_model(scgpt_ref, vocab)
    state = ref.state_dict()
    assert any(k.startswith("mvc_decoder.") for k in state)  # a head we must skip, and report
    path = _write_checkpoint(tmp_path_factory.mktemp("scgpt"), state, vocab)
    return ref, load_scgpt(path, device="cpu"), vocab


def test_binning_matches_scgpt(scgpt_ref):
    rng = np.random.default_rng(3)
    for n, n_bins in [(1, 51), (7, 51), (300, 51), (64, 11), (1000, 51)]:
        row = rng.poisson(2.0, size=n).astype(np.float64)  # integer counts: many ties with quantile edges
        row[0] = max(row[0], 1.0)
        nz = row[row > 0]
        np.random.seed(n)
        expected = scgpt_ref.preprocess.binning(row, n_bins)[row > 0]
        ours = bin_values(nz, n_bins, np.random.RandomState(n))
        np.testing.assert_array_equal(ours, expected)
        assert ours.min() >= 1 and ours.max() <= n_bins - 1


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_parity_with_scgpt_transformer_model(parity):
    ref, model, vocab = parity
    ignored = model.ignored_keys
    assert ignored and all(k.startswith(("mvc_decoder.", "cls_decoder.")) for k in ignored)
    batch = next(iter(model.prepare(_adata(), batch_size=7, gene_key="sym")))
    genes, values, mask = batch.inputs["genes"], batch.inputs["values"], batch.mask
    assert (~mask).any() and genes.shape[1] == 16  # padding present; the long cell sampled to max_seq_len
    layer_out = []
    def keep(module, args, out):  # torch's encoder runs padded batches as nested tensors in eval mode
        layer_out.append(out.to_padded_tensor(0.0, genes.shape + (D,)) if out.is_nested else out)

    hooks = [layer.register_forward_hook(keep) for layer in ref.transformer_encoder.layers]
    with torch.no_grad():
        expected = ref(genes, values, src_key_padding_mask=~mask)
    for h in hooks:
        h.remove()
    assert len(layer_out) == LAYERS
    with torch.no_grad():
        for L in range(LAYERS):
            out = model.forward(batch, layer=L)
            torch.testing.assert_close(out.hidden[mask], layer_out[L][mask], rtol=0, atol=1e-5)
        gene_tok = batch.gene_ids >= 0
        want = expected["mlm_output"]
        torch.testing.assert_close(out.expression[gene_tok], want[gene_tok], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.embedding, expected["cell_emb"], rtol=0, atol=1e-5)
        assert (out.expression[~gene_tok] == 0).all()


def test_tokens(parity):
    _, model, vocab = parity
    adata = _adata()
    X = adata.X.toarray()
    X[:, 5] += X[:, -1]  # the duplicated G5 column is summed onto G5
    prepared = model.prepare(adata, batch_size=3, gene_key="sym", seed=4)
    assert len(prepared) == 3
    assert sorted(prepared.alignment.dropped_from_data) == ["NOT_IN_VOCAB1", "NOT_IN_VOCAB2"]
    batches = list(prepared)
    again = next(iter(model.prepare(adata, batch_size=7, gene_key="sym", seed=4)))  # other batch size
    for b in batches:
        for j, row in enumerate(b.cell_ids.tolist()):
            n = int(b.mask[j].sum())
            k = (again.cell_ids == row).nonzero().item()
            assert torch.equal(b.inputs["genes"][j, :n], again.inputs["genes"][k, :n])
            assert torch.equal(b.inputs["values"][j, :n], again.inputs["values"][k, :n])
            assert b.inputs["genes"][j, 0] == vocab["<cls>"] and b.inputs["values"][j, 0] == -2
            assert (b.inputs["genes"][j, n:] == vocab["<pad>"]).all()
            assert (b.inputs["values"][j, n:] == -2).all()
            g = b.gene_ids[j, 1:n]
            assert (g >= 0).all() and (b.gene_ids[j, [0, *range(n, b.mask.shape[1])]] == -1).all()
            assert [model.genes[i] for i in g] == [f"G{int(t)}" for t in b.inputs["genes"][j, 1:n]]
            assert (X[row, g.numpy()] > 0).all()  # only expressed genes
            assert n - 1 == min((X[row, :N_GENES] > 0).sum(), 15)  # all expressed genes, or a sample of 15
            v = b.inputs["values"][j, 1:n]
            assert torch.equal(b.expression[j, 1:n], v) and ((v >= 1) & (v <= 50)).all()
    # binning is monotone: a larger count never gets a lower bin than a smaller one in the same cell
    j = (again.cell_ids == 0).nonzero().item()
    n = int(again.mask[j].sum())
    counts = X[0, again.gene_ids[j, 1:n].numpy()]
    bins = again.inputs["values"][j, 1:n].numpy()
    smaller = counts[:, None] < counts[None, :]
    assert smaller.any() and (bins[:, None] <= bins[None, :])[smaller].all()


def test_hooks(parity):
    _, model, _ = parity
    batch = next(iter(model.prepare(_adata(), batch_size=7, gene_key="sym")))
    with torch.no_grad():
        base = [model.forward(batch, layer=L) for L in range(LAYERS)]
        for L in range(LAYERS):
            ident = model.forward(batch, layer=L, hook=lambda h, b: h)
            none = model.forward(batch, layer=L, hook=lambda h, b: None)
            for o in (ident, none):
                assert torch.equal(o.hidden, base[L].hidden) and torch.equal(o.expression, base[L].expression)
                assert torch.equal(o.embedding, base[L].embedding)
            stopped = model.forward(batch, layer=L, stop=True)
            assert torch.equal(stopped.hidden, base[L].hidden)
            assert stopped.expression is None and stopped.embedding is None
            resumed = model.forward(batch, layer=L, start=base[L].hidden)
            assert torch.equal(resumed.expression, base[L].expression)
            assert torch.equal(resumed.embedding, base[L].embedding)
        # replacing layer 1 changes only what comes after it
        edit = lambda h, b: h + 1.0  # noqa: E731
        seen = []
        spy = lambda L: (lambda h, b: seen.append((L, h.clone())))  # noqa: E731
        model.forward(batch, layer=0, hook=spy(0))
        out = model.forward(batch, layer=1, hook=edit)
        assert torch.equal(seen[0][1], base[0].hidden)
        assert torch.equal(out.hidden, base[1].hidden + 1.0)
        assert not torch.allclose(out.expression, base[1].expression)
        after = model.forward(batch, layer=1, start=base[1].hidden + 1.0)
        assert torch.equal(after.expression, out.expression)


def test_bad_checkpoints(parity, tmp_path):
    ref, _, vocab = parity
    state = ref.state_dict()

    def err(state, vocab=vocab, **args):
        with pytest.raises(CheckpointError) as e:
            load_scgpt(_write_checkpoint(tmp_path / str(len(list(tmp_path.iterdir()))), state, vocab, **args),
                       device="cpu")
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    bad_vocab = {**vocab, "EXTRA": len(vocab)}
    assert "'encoder.embedding.weight'" in err(state, bad_vocab)
    missing = {k: v for k, v in state.items() if k != "transformer_encoder.layers.1.linear2.bias"}
    assert "missing key 'transformer_encoder.layers.1.linear2.bias'" in err(missing)
    wrong = {**state, "decoder.fc.2.weight": torch.zeros(D, D + 1)}
    assert "'decoder.fc.2.weight'" in err(wrong) and "shape" in err(wrong)
    extra = {**state, "batch_encoder.embedding.weight": torch.zeros(2, D)}
    assert "unexpected key 'batch_encoder.embedding.weight'" in err(extra)
    assert "'transformer_encoder.layers.2" in err(state, nlayers=LAYERS - 1)  # args.json that does not match
    path = _write_checkpoint(tmp_path / "noheads", state, vocab)
    args = json.loads((path / "args.json").read_text())
    del args["nheads"]
    (path / "args.json").write_text(json.dumps(args))
    with pytest.raises(UserError, match="missing key 'nheads'"):
        load_scgpt(path)


def test_flash_attn_keys_are_mapped(parity, tmp_path):
    ref, model, vocab = parity
    packed = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in ref.state_dict().items()}
    assert any("Wqkv" in k for k in packed)
    loaded = load_scgpt(_write_checkpoint(tmp_path / "flash", packed, vocab), device="cpu")
    for (k, v), (k2, v2) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_bad_input(parity):
    _, model, _ = parity
    adata = _adata()
    with pytest.raises(UserError, match="no gene of the AnnData"):
        model.prepare(adata)  # var_names are '0', '1', ...: no symbols
    adata.X = adata.X.toarray()
    adata.X[1, 4] = -1.0
    with pytest.raises(UserError, match="holds -1.0 at cell 'c1', gene '4'"):
        list(model.prepare(adata, gene_key="sym"))
    with pytest.raises(UserError, match="out of range"):
        model.forward(next(iter(model.prepare(_adata(), gene_key="sym"))), layer=LAYERS)


def test_random_init_and_config():
    cfg = ScGPTConfig.from_args({"embsize": 16, "nhead": 2, "d_hid": 8, "nlayers": 2, "max_seq_len": 9})
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.max_seq_len) == (16, 2, 8, 2, 9)
    with pytest.raises(UserError, match="input_emb_style"):
        ScGPTConfig.from_args({"embsize": 16, "nheads": 2, "d_hid": 8, "nlayers": 2,
                               "input_emb_style": "category"})
    model = load_scgpt(random_init_config=cfg, vocab=[f"G{i}" for i in range(N_GENES)], device="cpu")
    assert (model.n_layers, model.d_model, len(model.genes)) == (2, 16, N_GENES)
    out = model.forward(next(iter(model.prepare(_adata(), gene_key="sym"))), layer=1)
    assert out.hidden.shape[-1] == 16 and out.embedding.shape == (7, 16)
    # [P]'s mean pooling over gene tokens, and the fine-tuning tokenizer's <cls> value 0
    pooled = load_scgpt(random_init_config=cfg, vocab=model.genes, device="cpu", embedding="mean",
                        cls_value=0)
    batch = next(iter(pooled.prepare(_adata(), gene_key="sym")))
    assert (batch.inputs["values"][:, 0] == 0).all()
    out = pooled.forward(batch, layer=1)
    for b in range(7):
        genes = batch.gene_ids[b] >= 0
        want = out.hidden[b, genes].mean(0) if genes.any() else torch.zeros(16)
        torch.testing.assert_close(out.embedding[b], want)
    with pytest.raises(UserError, match="path="):
        load_scgpt()

