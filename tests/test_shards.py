"""Shard format: exact round trip per dtype, ids, atomic/incomplete states, clear errors naming the shard."""

import json
import platform
import sys

import numpy as np
import pytest
import torch

from sae_fast import open_shards
from sae_fast.activations import ShardWriter
from sae_fast.errors import UserError


def write(tmp_path, dtype, sizes=(37, 5, 80, 1, 64, 9), d=13, shard_tokens=40, seed=0):
    """Random activations (some extreme) written in adds of the given sizes; returns what was written."""
    g = torch.Generator().manual_seed(seed)
    w = ShardWriter(tmp_path / "s", d, dtype=dtype, shard_tokens=shard_tokens,
                    meta={"model": "fake", "layer": 2})
    xs, cells, genes = [], [], []
    for n in sizes:
        scale = 10.0 ** torch.randint(-3, 4, (n, 1), generator=g)
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
        if n > 3:
            x[0, 0], x[1, 1], x[2, 2] = 0.0, -0.0, 6e4  # zero, signed zero, near fp16 max
        c = torch.randint(0, 10**9, (n,), generator=g)
        ge = torch.randint(-1, 19264, (n,), generator=g, dtype=torch.int32)
        w.add(x, c, ge)
        xs.append(x)
        cells.append(c)
        genes.append(ge)
    w.close()
    return torch.cat(xs), torch.cat(cells), torch.cat(genes)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_is_exact_for_the_dtype(tmp_path, dtype):
    tdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    x, cells, genes = write(tmp_path, dtype)
    s = open_shards(tmp_path / "s")
    assert (s.n_tokens, s.d, s.dtype) == (len(x), 13, dtype)
    assert len(s.shard_names) > 2  # the ranges below cross shard boundaries
    expected = x.to(tdtype)
    got = s.read(0, s.n_tokens)
    assert got.dtype == tdtype
    bits = torch.int16 if tdtype != torch.float32 else torch.int32
    assert torch.equal(got.view(bits), expected.view(bits))  # bit-exact, signed zeros included
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = sorted(rng.integers(0, s.n_tokens + 1, 2))
        assert torch.equal(s.read(a, b).view(bits), expected[a:b].view(bits))
        assert np.array_equal(s.cell_ids(a, b), cells[a:b].numpy())
        assert np.array_equal(s.gene_ids(a, b), genes[a:b].numpy())
    assert s.read(5, 5).shape == (0, 13)
    with pytest.raises(IndexError):
        s.read(0, s.n_tokens + 1)


def test_manifest_records_shards_counts_and_checksums(tmp_path):
    x, _, _ = write(tmp_path, "float16")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["complete"] and m["model"] == "fake" and m["layer"] == 2 and m["d"] == 13
    assert sum(sh["n_tokens"] for sh in m["shards"]) == m["n_tokens"] == len(x)
    # a shard never splits an add(): it is flushed once >= 40 tokens are pending after an add
    assert [sh["n_tokens"] for sh in m["shards"]] == [42, 80, 65, 9]
    for sh in m["shards"]:
        for a in ("acts", "cells", "genes"):
            assert (tmp_path / "s" / sh[a]["file"]).stat().st_size == sh[a]["bytes"]
            assert len(sh[a]["crc32"]) == 8
    open_shards(tmp_path / "s", verify=True)  # intact shards verify
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_truncated_shard_is_a_clear_error_naming_it(tmp_path):
    write(tmp_path, "float16")
    f = tmp_path / "s" / "shard_00001.acts.npy"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(UserError, match="shard_00001.*truncated"):
        open_shards(tmp_path / "s")
    f.unlink()
    with pytest.raises(UserError, match="shard_00001.acts.npy: shard file missing"):
        open_shards(tmp_path / "s")


@pytest.mark.parametrize("array", ["acts", "cells", "genes"])
def test_corrupted_shard_is_caught_by_verify_naming_it(tmp_path, array):
    write(tmp_path, "bfloat16")
    f = tmp_path / "s" / f"shard_00000.{array}.npy"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # same size, one bit flipped
    f.write_bytes(bytes(data))
    s = open_shards(tmp_path / "s")  # sizes are fine: open is cheap and does not read
    with pytest.raises(UserError, match=f"shard_00000.{array}.npy: shard shard_00000 is corrupted"):
        s.verify()
    with pytest.raises(UserError, match="shard_00000 is corrupted"):
        open_shards(tmp_path / "s", verify=True)


def test_header_tampering_is_caught_at_read(tmp_path):
    write(tmp_path, "float16")
    f = tmp_path / "s" / "shard_00000.acts.npy"
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    np.save(f, np.zeros((m["shards"][0]["n_tokens"], 13), np.float32)[:, :6])  # other dtype and shape
    m["shards"][0]["acts"]["bytes"] = f.stat().st_size
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    s = open_shards(tmp_path / "s")
    with pytest.raises(UserError, match="shard_00000.*manifest says"):
        s.read(0, 3)


def test_incomplete_directory_and_resume_rules(tmp_path):
    w = ShardWriter(tmp_path / "s", 4, shard_tokens=10, meta={"layer": 1})
    w.add(np.ones((12, 4)), np.arange(12), np.arange(12), state={"cells_done": 3})
    w.add(np.ones((2, 4)), np.arange(2), np.arange(2), state={"cells_done": 4})  # pending, not on disk
    with pytest.raises(UserError, match="incomplete.*--resume"):
        open_shards(tmp_path / "s")
    with pytest.raises(UserError, match="already holds activation shards"):
        ShardWriter(tmp_path / "s", 4, shard_tokens=10, meta={"layer": 1})
    with pytest.raises(UserError, match="cannot resume.*layer = 1.*layer = 2"):
        ShardWriter(tmp_path / "s", 4, shard_tokens=10, meta={"layer": 2}, resume=True)
    (tmp_path / "s" / ".shard_00001.acts.npy.abc.tmp").write_bytes(b"partial")
    w2 = ShardWriter(tmp_path / "s", 4, shard_tokens=10, meta={"layer": 1}, resume=True)
    assert w2.state == {"cells_done": 3} and w2.manifest["n_tokens"] == 12  # the last complete shard
    assert not list((tmp_path / "s").glob("*.tmp"))
    w2.add(np.zeros((3, 4)), np.arange(3), np.arange(3))
    w2.close()
    s = open_shards(tmp_path / "s")
    assert s.n_tokens == 15 and torch.equal(s.read(12, 15), torch.zeros(3, 4, dtype=torch.float16))


def test_bad_input_errors(tmp_path):
    with pytest.raises(UserError, match="no such shard directory"):
        open_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        open_shards(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        open_shards(tmp_path / "empty")
    w = ShardWriter(tmp_path / "w", 8)
    with pytest.raises(UserError, match=r"expected \[n, 8\]"):
        w.add(np.ones((3, 7)), np.arange(3), np.arange(3))
    with pytest.raises(UserError, match="3 activations but 2 cell ids"):
        w.add(np.ones((3, 8)), np.arange(2), np.arange(3))
    with pytest.raises(UserError, match="float8"):
        ShardWriter(tmp_path / "x", 8, dtype="float8")


def _resident_file_mb() -> float:
    with open("/proc/self/statm") as f:  # field 3: resident file-backed (and shared) pages
        return int(f.read().split()[2]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("batched", [True, False])
def test_release_drops_the_mapped_pages_of_the_ranges_only(tmp_path, monkeypatch, batched):
    """Release of token ranges unmaps those pages (the resident set falls by about their size) and keeps the
    others mapped, through process_madvise and through the range-by-range fallback."""
    from sae_fast.activations import shards as shards_module

    d, per = 256, 2 ** 14  # 4 shards x 8 MB of float16
    w = ShardWriter(tmp_path / "s", d, shard_tokens=per)
    for _ in range(4):
        w.add(np.ones((per, d), np.float16), np.zeros(per), np.zeros(per))
    w.close()
    s = open_shards(tmp_path / "s")
    batched_ok = []
    real = shards_module._dontneed_batched
    monkeypatch.setattr(shards_module, "_dontneed_batched",
                        lambda spans: batched_ok.append(real(spans)) or batched_ok[-1] if batched else False)
    touch = [float(s.array(i)[:: 4096 // (2 * d)].sum()) for i in range(4)]  # fault in every page
    before = _resident_file_mb()
    s.release(np.array([[per, 2 * per], [2 * per, 2 * per + per // 2]]))  # shard 1 and half of shard 2
    dropped = before - _resident_file_mb()
    assert 11 < dropped <= 16, dropped  # 12 MB of the 32 MB mapped (+ up to a 2 MB huge page at either end)
    assert [float(s.array(i)[:: 4096 // (2 * d)].sum()) for i in range(4)] == touch  # re-faulted on access
    if batched and tuple(map(int, platform.release().split(".")[:2])) >= (6, 13):
        assert batched_ok == [True]  # Linux >= 6.13: one process_madvise call
