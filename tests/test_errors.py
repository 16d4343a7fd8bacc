"""Bad input to `sae-fast run`: one line on stderr naming the culprit, exit status 2, no traceback, and no
output that claims success (no stage marked done, no summary, no tables)."""

from __future__ import annotations

import numpy as np
import pytest

from sae_fast.cli import main

CONFIG = """
[model]
name = "{model}"
{model_path}

[data]
path = "{data}"

[extract]
layer = {layer}
mode = "shards"

[sae]
expansion = 2
k = 8
epochs = 1

[interpret]
baselines = ["raw"]
features = {features}
{run}
"""


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """A small valid AnnData of the bundled demo cells (raw counts, CSR)."""
    from sae_fast import datasets

    return datasets.pbmc3k()[:10].copy()


def write_h5ad(tmp_path, adata, name="cells.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def run_cli(tmp_path, capsys, *, model="mini", model_path="", data=None, layer=1, features="[]", run="",
            config_name="job.toml", write=True, sets=()):
    config = tmp_path / config_name
    if write:
        config.write_text(CONFIG.format(model=model, model_path=model_path, data=data, layer=layer,
                                        features=features, run=run))
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["run", str(config), "--out", str(out), "-q", *[a for v in sets for a in ("--set", v)]])
    captured = capsys.readouterr()
    return rc, captured.err, out


def assert_clean_failure(rc, err, out, *culprits, n_lines=1):
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == n_lines, f"expected {n_lines} line(s) on stderr, got:\n{err}"
    assert all(line.startswith("sae-fast run: error: ") for line in lines) and "Traceback" not in err
    for c in culprits:
        assert c in err, f"{c!r} not named in: {err}"
    # nothing that claims success: no run folder at all (all checks run before it is created)
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_missing_data_file(tmp_path, capsys):
    rc, err, out = run_cli(tmp_path, capsys, data=tmp_path / "nowhere.h5ad")
    assert_clean_failure(rc, err, out, "nowhere.h5ad")


def test_missing_config_file(tmp_path, capsys):
    rc, err, out = run_cli(tmp_path, capsys, config_name="absent.toml", write=False)
    assert_clean_failure(rc, err, out, "absent.toml", "not found")


def test_missing_checkpoint_folder(tmp_path, capsys, cells):
    rc, err, out = run_cli(tmp_path, capsys, model="aido_cell", model_path=f'path = "{tmp_path / "no_ckpt"}"',
                           data=write_h5ad(tmp_path, cells))
    assert_clean_failure(rc, err, out, "no_ckpt")


@pytest.mark.parametrize("bad,word", [(-1.0, "negative"), (np.nan, "NaN|non-finite"),
                                      (0.5, "non-integer|not integer")])
def test_bad_counts(tmp_path, capsys, cells, bad, word):
    adata = cells.copy()
    adata.X = adata.X.tocsr().astype(np.float32)
    adata.X.data[3] = bad
    rc, err, out = run_cli(tmp_path, capsys, data=write_h5ad(tmp_path, adata))
    assert_clean_failure(rc, err, out, "cells.h5ad")
    import re

    assert re.search(word, err), err


def test_no_overlap_with_the_vocabulary(tmp_path, capsys, cells):
    adata = cells.copy()
    adata.var_names = [f"NOT_A_GENE_{i}" for i in range(adata.n_vars)]
    adata.var = adata.var[[]]  # PBMC3K's gene_ids column (Ensembl) would still match the vocabulary
    rc, err, out = run_cli(tmp_path, capsys, data=write_h5ad(tmp_path, adata))
    assert_clean_failure(rc, err, out, "cells.h5ad", "vocabulary")


def test_layer_out_of_range(tmp_path, capsys, cells):
    rc, err, out = run_cli(tmp_path, capsys, data=write_h5ad(tmp_path, cells), layer=99)
    assert_clean_failure(rc, err, out, "layer 99")


def test_sae_of_another_width(tmp_path, capsys, cells):
    import sae_fast

    d = sae_fast.load_model("mini").d_model
    sae_dir = tmp_path / "wrong_sae"
    sae_fast.TopKSAE(d + 8, 32, 4).save(sae_dir)
    rc, err, out = run_cli(tmp_path, capsys, data=write_h5ad(tmp_path, cells),
                           run=f'[run]\nsae = "{sae_dir}"')
    assert_clean_failure(rc, err, out, "wrong_sae", f"d = {d + 8}", str(d))


def test_feature_index_out_of_range(tmp_path, capsys, cells):
    rc, err, out = run_cli(tmp_path, capsys, data=write_h5ad(tmp_path, cells), features="[100000]")
    assert_clean_failure(rc, err, out, "interpret.features", "100000")


def test_verbose_shows_the_traceback(tmp_path, cells):
    from sae_fast.errors import UserError

    config = tmp_path / "job.toml"
    config.write_text(CONFIG.format(model="mini", model_path="", data=write_h5ad(tmp_path, cells), layer=99,
                                    features="[]", run=""))
    with pytest.raises(UserError, match="layer 99"):
        main(["run", str(config), "--out", str(tmp_path / "out"), "-v"])


# -- config values: types and ranges, checked before anything is loaded or written (one line per problem)


@pytest.mark.parametrize("setting,culprit", [
    ('sae.k="32"', "sae.k = '32': expected an integer"),
    ('sae.expansion="8"', "sae.expansion = '8': expected an integer"),
    ("sae.lr=0", "sae.lr = 0.0: must be > 0"),
    ("sae.lr=-1e-3", "sae.lr = -0.001: must be > 0"),
    ("sae.epochs=0", "sae.epochs = 0: must be >= 1"),
    ('sae.arch="topkk"', "sae.arch = 'topkk'; choose one of"),
    ("sae.k=5000", "[sae] SAE k = 5000: must be between 1 and n_features = 256"),
    ("model.batch_size=2.5", "model.batch_size = 2.5: expected an integer"),
    ("data.max_cells=0", "data.max_cells = 0: must be >= 1"),
    ("extract.keep_shards=1", "extract.keep_shards = 1: expected true or false"),
    ('extract.tokens="sample:0"', "extract.tokens='sample:0'"),
    ("interpret.alpha=5", "interpret.alpha = 5.0: must be > 0 and <= 1"),
    ("interpret.baselines=['raw','pca']", "interpret.baselines = ['raw', 'pca']; choose one of"),
    ("interpret.features=['1']", "interpret.features = ['1']: expected a list of integers"),
    ('interpret.gene_sets="go_bpp"', "interpret.gene_sets = 'go_bpp': no such gene-set library"),
    ("interpret.clip_min=200", "interpret.clip_min = 200 is above interpret.clip_max = 100"),
])
def test_bad_config_values_stop_before_any_work(tmp_path, capsys, cells, setting, culprit):
    """Each bad value is named (SECTION.KEY) before extraction: no run folder appears."""
    rc, err, out = run_cli(tmp_path, capsys, data=write_h5ad(tmp_path, cells), sets=[setting])
    assert_clean_failure(rc, err, out, culprit)


def test_every_bad_value_is_reported_one_line_each(tmp_path, capsys, cells):
    rc, err, out = run_cli(tmp_path, capsys, data=write_h5ad(tmp_path, cells),
                           sets=['sae.k="32"', "sae.lr=0", "interpret.alpha=0", "model.batch_size=-1"])
    assert_clean_failure(rc, err, out, "sae.k", "sae.lr", "interpret.alpha", "model.batch_size", n_lines=4)


def test_train_and_interpret_commands_check_their_flags(tmp_path, capsys):
    """The same checks behind `sae-fast train` and `sae-fast interpret`, naming the --flag."""
    rc = main(["train", "--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--lr", "0", "--epochs", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--lr = 0.0: must be > 0" in err and "--epochs = 0: must be >= 1" in err, err
    rc = main(["interpret", "--sae", str(tmp_path), "--out", str(tmp_path / "o"), "--alpha", "1.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--alpha = 1.5: must be > 0 and <= 1" in err, err
