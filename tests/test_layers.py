"""`sae-fast layers`: one SAE per layer, FVU / ERS / label-feature counts per layer on held-out cells."""

import numpy as np
import pandas as pd


def test_layers_command_table_and_figure(tmp_path):
    from sae_fast.cli import main

    cfg = tmp_path / "layers.toml"
    cfg.write_text('[model]\nname = "mini"\n[data]\npath = "kang2018"\n'
                   '[sae]\narch = "topk"\nk = 4\nn_features = 64\nepochs = 1\nbatch_size = 256\n')
    out = tmp_path / "out"
    assert main(["layers", str(cfg), "--out", str(out), "-q", "--layers", "0", "2", "--max-cells", "24",
                 "--heldout", "0.25", "--tokens", "sample:16", "--label-keys", "cell_type", "batch"]) == 0
    table = pd.read_csv(out / "tables" / "layers.csv")
    assert table.layer.tolist() == [0, 2]
    assert {"fvu", "l0", "dead_fraction", "ers_ratio", "ers_fraction", "n_cell_type_features",
            "n_batch_features"} <= set(table.columns)
    assert np.isfinite(table.fvu).all() and (table.fvu > 0).all()
    np.testing.assert_allclose(table.ers_fraction, 1 - 1 / table.ers_ratio, rtol=1e-9)  # the same two sums
    assert (table.l0 <= 4 + 1e-9).all()
    assert (out / "figures" / "layers.png").stat().st_size > 1000
