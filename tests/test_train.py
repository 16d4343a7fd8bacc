"""The trainer: determinism, exact resume (in-process and after SIGKILL), re-batching, logs, evaluation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import sae_fast
from sae_fast.errors import UserError
from sae_fast.sae import evaluate, train_sae
from sae_fast.sae.train import STATE, _lr_lambda, _rebatch

sae_fast.utils.VERBOSITY = 0


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster on a busy machine and makes subprocess runs comparable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n=1500, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 1.0


class Chunks:
    """A re-iterable source of odd-sized chunks with a known token count; optionally dies after `fail_after`
    chunks (once), like a killed run. Shuffles with torch's global RNG, like a DataLoader."""

    def __init__(self, x, size=37, fail_after=None):
        self.x, self.size, self.fail_after, self.n_tokens = x, size, fail_after, len(x)

    def __iter__(self):
        order = torch.randperm(len(self.x))
        for chunk in self.x[order].split(self.size):
            if self.fail_after is not None:
                if self.fail_after == 0:
                    self.fail_after = None
                    raise RuntimeError("simulated crash")
                self.fail_after -= 1
            yield chunk


SETTINGS = dict(n_features=48, k=4, epochs=3, batch_size=100, lr=3e-3, warmup_steps=5, seed=3,
                dead_tokens=300)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_same_seed_same_weights_and_exact_resume(arch, tmp_path):
    x = _data()
    ref = train_sae(Chunks(x), arch=arch, **SETTINGS)
    _assert_same_weights(ref, train_sae(Chunks(x), arch=arch, **SETTINGS))
    assert not torch.equal(ref.W_dec, train_sae(Chunks(x), arch=arch, **{**SETTINGS, "seed": 4}).W_dec)

    # 1500 rows / 100 = 15 steps per epoch, 41 chunks. The trainer first peeks 3 chunks (one batch, to size
    # the SAE), then runs epoch 1 (41 chunks); the crash hits at chunk 30 of epoch 2, after 11 of its steps
    # (step 26). Checkpoints every 4 steps: the last is step 24 = epoch index 1, 9 batches consumed.
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sae(Chunks(x, fail_after=3 + 41 + 30), arch=arch, out_dir=tmp_path, checkpoint_every=4,
                  log_every=2, **SETTINGS)
    state = torch.load(tmp_path / STATE, weights_only=True)
    assert (state["step"], state["epoch"], state["consumed"]) == (24, 1, 9)
    resumed = train_sae(Chunks(x), arch=arch, out_dir=tmp_path, checkpoint_every=4, log_every=2, **SETTINGS)
    _assert_same_weights(ref, resumed)
    assert torch.equal(ref.tokens_since_fired, resumed.tokens_since_fired)
    _assert_same_weights(ref, sae_fast.load_sae(tmp_path))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 46, 2)) + [45]  # no step logged twice across the crash


KILLED_RUN = textwrap.dedent("""
    import sys, time, torch
    import sae_fast
    from sae_fast.sae import train_sae
    sys.path.insert(0, {tests!r})
    from test_train import Chunks, _data, SETTINGS
    torch.set_num_threads(1)
    sae_fast.utils.VERBOSITY = 0

    class Slow(Chunks):
        def __iter__(self):
            for c in super().__iter__():
                time.sleep(0.05)
                yield c

    train_sae(Slow(_data()), out_dir={out!r}, checkpoint_every=1, **SETTINGS)
""")


def test_resume_after_sigkill(tmp_path):
    out = tmp_path / "run"
    script = KILLED_RUN.format(tests=os.path.dirname(__file__), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / STATE).is_file() and torch.load(out / STATE, weights_only=True)["step"] >= 20:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    step = torch.load(out / STATE, weights_only=True)["step"]
    assert 20 <= step < 45, step  # killed mid-run
    resumed = train_sae(Chunks(_data()), out_dir=out, checkpoint_every=1, **SETTINGS)
    _assert_same_weights(train_sae(Chunks(_data()), **SETTINGS), resumed)


def test_resume_with_other_settings_is_refused(tmp_path):
    x = _data(300)
    train_sae(Chunks(x), out_dir=tmp_path, **{**SETTINGS, "epochs": 1})
    with pytest.raises(UserError, match=r"holds a run with other settings \(lr: 0.003 there vs 0.01 now\)"):
        train_sae(Chunks(x), out_dir=tmp_path, **{**SETTINGS, "epochs": 1, "lr": 1e-2})
    # a finished run with the same settings is simply returned
    done = train_sae(Chunks(x), out_dir=tmp_path, **{**SETTINGS, "epochs": 1})
    _assert_same_weights(done, sae_fast.load_sae(tmp_path))


def test_bad_sources_and_options_are_user_errors():
    with pytest.raises(UserError, match="one-shot iterator"):
        train_sae(iter([_data(10)]), n_features=8, k=2)
    with pytest.raises(UserError, match="unknown option"):
        train_sae([_data(10)], n_featurez=8)
    with pytest.raises(UserError, match=r"shape \[10, 5\]; expected \[n, 12\]"):
        train_sae([_data(10), torch.zeros(10, 5)], n_features=8, k=2, batch_size=4)
    with pytest.raises(UserError, match="choose one of"):
        train_sae([_data(10)], arch="dense")


def test_rebatch_keeps_rows_in_order_in_exact_batches():
    x = torch.arange(103 * 2, dtype=torch.float32).view(103, 2)
    batches = list(_rebatch(iter(x.split(7)), 10, 2))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert torch.equal(torch.cat(batches), x)


def test_defaults_infer_sizes_and_max_steps(tmp_path):
    x = _data(400, d=6)
    sae = train_sae(lambda: iter(x.split(50)), k=3, batch_size=64, max_steps=5, out_dir=tmp_path, log_every=1)
    assert (sae.cfg.d_in, sae.cfg.n_features, sae.cfg.aux_k) == (6, 48, 3)  # expansion 8, aux_k = d/2
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    assert {"mse", "fvu", "l0", "dead_fraction", "tokens_per_s", "lr"} <= set(lines[0])
    assert lines[0]["l0"] == 3.0 and not sae.training


def test_lr_schedule_warmup_then_cosine():
    f = _lr_lambda(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)


def test_evaluate_matches_direct_computation():
    torch.manual_seed(0)
    sae = sae_fast.TopKSAE(12, 30, 5)
    x = _data(500)
    r = evaluate(sae, list(x.split(77)), batch_size=128)
    with torch.no_grad():
        x_hat, code = sae(x)
        err = (x_hat - x).double().pow(2).sum()
        fired = torch.zeros(30, dtype=torch.bool)
        fired[code.indices[code.values != 0]] = True
    assert r.n_tokens == 500
    assert r.mse == pytest.approx(float(err) / 500, rel=1e-6)
    assert r.fvu == pytest.approx(float(err / (x.double() - x.double().mean(0)).pow(2).sum()), rel=1e-6)
    assert r.l0 == pytest.approx(float((code.values != 0).sum()) / 500)
    assert r.dead_fraction == pytest.approx(1 - float(fired.float().mean()))


def test_model_source_goes_through_fused_source(monkeypatch):
    import sae_fast.activations.fused as fused

    calls = []

    def fake(model, adata, layer, config):
        calls.append((model, adata, layer, config.k))
        return [_data(200)]

    monkeypatch.setattr(fused, "fused_source", fake)
    sae = train_sae(model="M", adata="A", layer=3, n_features=16, k=2, epochs=1, batch_size=50)
    assert calls == [("M", "A", 3, 2)] and sae.cfg.d_in == 12
