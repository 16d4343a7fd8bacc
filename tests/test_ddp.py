"""`sae-fast train` end to end: a SIGKILLed run resumes to the same weights, 2 gloo processes under
torchrun match one process with the same global batch, fused training with per-rank token counts that differ
stays in step, and extraction splits over ranks.

torchrun runs with --standalone: its rendezvous takes a free port, so another torchrun job on the machine (or a
second copy of this suite) cannot collide with it. The `busy_ports` fixture holds torchrun's default port and
the fixed ones this file used to take, as such a job would."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae_fast.activations import ShardWriter

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "sae_fast")


@pytest.fixture(scope="module", autouse=True)
def busy_ports():
    """Listen on the ports another distributed job would hold (torchrun's default 29500, and 29517/29518)."""
    held = []
    for port in (29500, 29517, 29518):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            held.append(s)
        except OSError:  # already taken by something else: busy all the same
            s.close()
    yield
    for s in held:
        s.close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """12,000 tokens of d = 16 with a planted sparse structure, in 4 shards."""
    d = tmp_path_factory.mktemp("train") / "s"
    g = np.random.default_rng(0)
    atoms = g.standard_normal((40, 16))
    w = ShardWriter(d, 16, dtype="float32", shard_tokens=3000)
    for i in range(4):
        z = g.random((3000, 40)) * (g.random((3000, 40)) < 0.08)
        w.add(z @ atoms + 0.01 * g.standard_normal((3000, 16)), np.arange(3000) + 3000 * i, np.zeros(3000))
    w.close()
    return d


def train_cmd(shards, out, *extra, launcher=(sys.executable, "-m", "sae_fast")):
    return [*launcher, "train", "-q", "--shards", str(shards), "--out", str(out), "--k", "4",
            "--expansion", "4", "--batch-size", "256", "--seed", "3", *extra]


def weights(out):
    return load_file(str(out / "sae_weights.safetensors"))


def test_killed_training_resumes_to_the_same_weights(tmp_path, shards):
    args = ("--epochs", "3", "--checkpoint-every", "10")
    subprocess.run(train_cmd(shards, tmp_path / "whole", *args), check=True, env=ENV, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(shards, killed, *args), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (killed / "trainer_state.pt").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / "trainer_state.pt", weights_only=True)
    assert state["step"] < state["total_steps"], "the run was not interrupted mid-way"
    out = subprocess.run(train_cmd(shards, killed, *args), env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    a, b = weights(tmp_path / "whole"), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, shards):
    args = ("--epochs", "2")
    one = subprocess.run(train_cmd(shards, tmp_path / "one", *args), env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(train_cmd(shards, tmp_path / "two", *args, launcher=TORCHRUN), env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_train_cli_errors(tmp_path, shards):
    from sae_fast.cli import main

    assert main(["train", "-q", "--out", str(tmp_path / "o")]) == 2
    assert main(["train", "-q", "--shards", str(shards), "--out", str(tmp_path / "o"), "--d-in", "32"]) == 2
    assert main(["train", "-q", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_train_cli_error_messages(tmp_path, shards, capsys):
    from sae_fast.cli import main

    main(["train", "-q", "--shards", str(shards), "--out", str(tmp_path / "o"), "--d-in", "32"])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has d = 16 but --d-in is 32" in err


def test_extraction_split_over_two_ranks_equals_one_process(tmp_path):
    from test_extract import _adata

    from sae_fast import open_shards
    from sae_fast.models.aido_cell import AIDOCellConfig, random_aido_cell, save_aido_cell

    cfg = AIDOCellConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                         max_position_embeddings=64)
    save_aido_cell(random_aido_cell(cfg, seed=1), tmp_path / "model")
    rng = np.random.default_rng(0)
    _adata(rng.poisson(0.5, (50, 64)).astype(np.float32), [f"GENE{i}" for i in range(64)]).write_h5ad(
        tmp_path / "cells.h5ad")
    args = ["extract", "-q", "--model", f"aido_cell:{tmp_path / 'model'}",
            "--data", str(tmp_path / "cells.h5ad"), "--layer", "1", "--tokens", "sample:16",
            "--shard-tokens", "100", "--out"]
    subprocess.run([sys.executable, "-m", "sae_fast", *args, str(tmp_path / "one")], env=ENV, check=True,
                   capture_output=True)
    two = subprocess.run([*TORCHRUN, *args, str(tmp_path / "two")], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = open_shards(tmp_path / "one"), open_shards(tmp_path / "two", verify=True)
    assert {p.name.split("_")[0] for p in (tmp_path / "two").glob("*.npy")} == {"rank00000", "rank00001"}
    assert np.array_equal(a.cell_ids(), b.cell_ids()) and np.array_equal(a.gene_ids(), b.gene_ids())
    torch.testing.assert_close(b.read(0, b.n_tokens), a.read(0, a.n_tokens), rtol=1e-3, atol=1e-3)


def test_fused_training_with_expressed_tokens_keeps_ranks_in_step(tmp_path):
    """tokens = expressed: each rank's forward batches hold different numbers of tokens, so its stream cuts
    into a different number of SAE steps (c3e3240: a gloo collective mismatch). The trainer agrees on every step
    across ranks; both ranks stop together and the run completes with the steps it logged."""
    from test_extract import G, _adata, tiny_model

    from sae_fast.activations.extract import select_tokens
    from sae_fast.models.aido_cell import save_aido_cell

    model = tiny_model(seed=1)
    save_aido_cell(model, tmp_path / "model")
    rng = np.random.default_rng(0)
    n_genes = G
    # cells 0..9 express few genes, cells 10..19 many: whichever cells a rank draws, the counts differ
    counts = rng.poisson(np.r_[np.full(10, 0.1), np.full(10, 3.0)][:, None], (20, n_genes)).astype(np.float32)
    counts[:, 0] += 1  # every cell has counts
    cells = _adata(counts, [f"GENE{i}" for i in range(n_genes)])
    cells.write_h5ad(tmp_path / "cells.h5ad")
    expressed = [int(select_tokens(b, "expressed", None).sum()) for b in model.prepare(cells, batch_size=1)]
    half = np.random.default_rng([3, 0]).permutation(20)  # the first epoch's cell order for seed 3
    per_rank = [sum(expressed[c] for c in half[:10]), sum(expressed[c] for c in half[10:])]
    assert per_rank[0] // 32 != per_rank[1] // 32, per_rank  # the ranks cut different numbers of 32-row steps
    args = ["train", "-q", "--model", f"aido_cell:{tmp_path / 'model'}", "--data", str(tmp_path / "cells.h5ad"),
            "--layer", "1", "--tokens", "expressed", "--cells-per-batch", "3", "--k", "4", "--expansion", "2",
            "--epochs", "2", "--batch-size", "64", "--seed", "3", "--log-every", "1", "--out", str(tmp_path / "sae")]
    two = subprocess.run([*TORCHRUN, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout
    state = torch.load(tmp_path / "sae" / "trainer_state.pt", weights_only=True)
    logged = [json.loads(line)["step"] for line in (tmp_path / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, state["step"] + 1)) and state["step"] >= 2 * (min(per_rank) // 32)
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "sae").values())
