"""Activation shards on disk: a directory of memory-mappable arrays described by one manifest.json.

    out/manifest.json                  model, layer, d, dtype, token selection, gene filter, shards, checksums
    out/shard_00000.acts.npy           [n, d] activations: float16 / float32, or bfloat16 stored as uint16
    out/shard_00000.cells.npy          [n] int64: each token's cell (row of the AnnData given to extract)
    out/shard_00000.genes.npy          [n] int32: each token's gene (index into manifest["genes"], -1: none)

Writing: `ShardWriter(dir, d, dtype=...)`, `.add(acts, cell_ids, gene_ids)` any number of times, `.close()`.
A shard is flushed when at least `shard_tokens` tokens are pending after an `add` (a shard never splits an
`add` call, so extraction's shards end on cell-batch boundaries). Every file is written under a temporary name
and renamed; the manifest is rewritten (atomically) after each shard, so it only ever lists complete shards,
and `"complete": true` is set by `close()`.

Reading: `open_shards(dir)` checks the manifest and every file's size at open (cheap: a truncated or missing
file is a one-line error naming it) and memory-maps the arrays: nothing is loaded until read. `verify()`
recomputes the CRC-32 checksums (zlib; detects corruption such as flipped bytes, not tampering) and names the
first shard that does not match; `open_shards(dir, verify=True)` does it at open. Reads do not re-check
checksums (that would cost a full pass per read).
"""

from __future__ import annotations

import ctypes
import io
import json
import mmap
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from sae_fast.errors import UserError
from sae_fast.utils import atomic_path, write_json

FORMAT = "sae-fast-shards/1"
DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}  # bf16: raw bits as uint16
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
ARRAYS = ("acts", "cells", "genes")
_ID_DTYPES = {"cells": np.dtype(np.int64), "genes": np.dtype(np.int32)}


def dtype_name(dtype) -> str:
    """'float16' | 'bfloat16' | 'float32' from a string or a torch dtype, or a UserError."""
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
               "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise UserError(f"shard dtype {dtype!r} is not supported; choose float16, bfloat16 or float32")
    return name


def _crc32(path: Path, block: int = 1 << 24) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _save_npy(path: Path, pieces: list[np.ndarray]) -> dict:
    """Write the concatenation of `pieces` as one .npy file, atomically and without concatenating in memory;
    return its manifest entry (file name, bytes, CRC-32 of the bytes written)."""
    header = io.BytesIO()
    shape = (sum(len(p) for p in pieces), *pieces[0].shape[1:])
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(pieces[0].dtype),
                                                  "fortran_order": False, "shape": shape})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.getvalue())
            crc = zlib.crc32(header.getvalue())
            for p in pieces:
                p = np.ascontiguousarray(p)
                f.write(memoryview(p).cast("B"))
                crc = zlib.crc32(memoryview(p).cast("B"), crc)
    return {"file": path.name, "bytes": path.stat().st_size, "crc32": f"{crc:08x}"}


class ShardWriter:
    """Append token activations to a shard directory; see the module docstring for the format.

    `meta` is stored in the manifest (model, layer, token selection, gene filter, ...). With `resume=True` an
    existing incomplete directory is continued after its last complete shard (its `meta` must match)."""

    def __init__(self, dir: str | os.PathLike, d: int, dtype="float16", *, shard_tokens: int = 1 << 18,
                 meta: dict | None = None, prefix: str = "shard", resume: bool = False):
        self.dir = Path(dir)
        self.d, self.dtype = int(d), dtype_name(dtype)
        self.shard_tokens = int(shard_tokens)
        self.prefix = prefix
        self.manifest = {"format": FORMAT, "d": self.d, "dtype": self.dtype,
                         "shard_tokens": self.shard_tokens, **(meta or {}), "complete": False, "n_tokens": 0,
                         "shards": [], "state": {}}
        self.manifest_path = self.dir / (f"manifest.{prefix}.json" if prefix != "shard" else "manifest.json")
        if self.manifest_path.exists():
            old = _read_manifest(self.manifest_path)
            if not resume:
                raise UserError(f"{self.dir}: already holds activation shards; pass resume=True (--resume) "
                                "to continue them, or choose another output directory")
            changed = [k for k in self.manifest if k not in ("complete", "n_tokens", "shards", "state")
                       and old.get(k) != self.manifest[k]]
            if changed:
                k = changed[0]
                raise UserError(f"{self.dir}: cannot resume: its manifest has {k} = {old.get(k)!r} but "
                                f"this run has {k} = {self.manifest[k]!r}; rerun with the original settings "
                                "or use a new directory")
            self.manifest = old
            _check_files(self.dir, old)
            for tmp in self.dir.glob(f".{prefix}_*.tmp"):  # a shard that was being written when killed
                tmp.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n_pending = 0

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def state(self) -> dict:
        """Caller state saved with the last complete shard (extraction stores how many cells are done)."""
        return self.manifest["state"]

    def add(self, acts, cell_ids, gene_ids, *, state: dict | None = None) -> None:
        """Queue tokens: acts [n, d] (tensor or array), cell_ids [n], gene_ids [n]. If this makes a full
        shard, it is written together with `state` (what the caller needs to resume after it)."""
        if self.complete:
            raise UserError(f"{self.dir}: shards are complete (closed); open a new directory to add tokens")
        acts = _to_numpy(acts, self.dtype)
        if acts.ndim != 2 or acts.shape[1] != self.d:
            raise UserError(f"ShardWriter({self.dir}): activations of shape {tuple(acts.shape)}, expected "
                            f"[n, {self.d}]")
        cells = np.asarray(_as_numpy(cell_ids), dtype=np.int64).reshape(-1)
        genes = np.asarray(_as_numpy(gene_ids), dtype=np.int32).reshape(-1)
        if not len(cells) == len(genes) == len(acts):
            raise UserError(f"ShardWriter({self.dir}): {len(acts)} activations but {len(cells)} cell ids and "
                            f"{len(genes)} gene ids")
        if len(acts):
            self._pending.append((acts, cells, genes))
            self._n_pending += len(acts)
        if self._n_pending >= self.shard_tokens:
            self._flush(state)

    def _flush(self, state: dict | None) -> None:
        if self._n_pending:
            i = len(self.manifest["shards"])
            stem = f"{self.prefix}_{i:05d}"
            entry = {"name": stem, "n_tokens": self._n_pending}
            for name, arrays in zip(ARRAYS, zip(*self._pending)):
                entry[name] = _save_npy(self.dir / f"{stem}.{name}.npy", list(arrays))
            self.manifest["shards"].append(entry)
            self.manifest["n_tokens"] += self._n_pending
            self._pending, self._n_pending = [], 0
        if state is not None:
            self.manifest["state"] = state
        write_json(self.manifest_path, self.manifest)

    def close(self, *, state: dict | None = None) -> None:
        """Write the last (partial) shard and mark the directory complete."""
        if self.complete:
            return
        self._flush(state)
        self.manifest["complete"] = True
        write_json(self.manifest_path, self.manifest)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _to_numpy(acts, dtype: str) -> np.ndarray:
    """Activations as the on-disk numpy array (bf16 -> its raw uint16 bits)."""
    if isinstance(acts, torch.Tensor):
        t = acts.detach().to("cpu", TORCH_DTYPES[dtype])
        return t.view(torch.uint16).numpy() if dtype == "bfloat16" else t.numpy()
    if dtype == "bfloat16":
        return _to_numpy(torch.from_numpy(np.asarray(acts, np.float32)), dtype)
    return np.asarray(acts, DTYPES[dtype])


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent}: no manifest.json; not an activation shard directory (make one with "
                        "`sae-fast extract`)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); the shard directory is damaged") from None
    missing = [k for k in ("format", "d", "dtype", "shards", "n_tokens") if k not in m]
    if missing or m.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} manifest (missing {', '.join(missing) or 'format'})")
    return m


def _check_files(dir: Path, m: dict) -> None:
    """Every shard file present with the byte size its manifest entry says (cheap: no reading)."""
    for s in m["shards"]:
        for name in ARRAYS:
            f = dir / s[name]["file"]
            if not f.is_file():
                raise UserError(f"{f}: shard file missing (shard {s['name']} of {dir})")
            size = f.stat().st_size
            if size != s[name]["bytes"]:
                raise UserError(f"{f}: shard {s['name']} is {size} bytes, the manifest says "
                                f"{s[name]['bytes']} (truncated or overwritten); extract the data again")


_SYS_PROCESS_MADVISE = 440  # the same number on x86-64 and arm64 (the generic syscall table)
_madvise_target: tuple = (None, None)  # (pid, (syscall, pidfd of pid) or None): a forked child opens its own


def _dontneed_batched(spans: np.ndarray) -> bool:
    """MADV_DONTNEED over [n, 2] (start, stop) address ranges of this process with one process_madvise(2) call
    per 1,024 ranges, so that the kernel flushes the TLBs once per call, not once per range (the loader releases
    ~32 ranges per window while its gather threads run). Linux >= 6.13 accepts any advice for the calling
    process. False where the call is missing or refused: the caller then madvises range by range."""
    global _madvise_target
    pid = os.getpid()
    if _madvise_target[0] != pid:
        try:
            syscall = ctypes.CDLL(None, use_errno=True).syscall
            syscall.restype = ctypes.c_long
            _madvise_target = (pid, (syscall, os.pidfd_open(pid)))
        except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
            _madvise_target = (pid, None)
    if _madvise_target[1] is None:
        return False
    syscall, pidfd = _madvise_target[1]
    iov = np.ascontiguousarray(np.stack([spans[:, 0], spans[:, 1] - spans[:, 0]], 1).astype(np.uint64))
    for j in range(0, len(iov), 1024):
        part = iov[j:j + 1024]
        done = syscall(*map(ctypes.c_long, (_SYS_PROCESS_MADVISE, pidfd, part.ctypes.data, len(part),
                                            mmap.MADV_DONTNEED, 0)))
        if done != int(part[:, 1].sum()):
            return False
    return True


class Shards:
    """A validated, memory-mapped shard directory: random access by global token index.

    Tokens are numbered 0..n_tokens-1 across shards in manifest order. `read(start, stop)` returns activations
    as a torch tensor of the stored dtype; `cell_ids` / `gene_ids` return the ids of a range. Iterating over
    the object yields shuffled float32 training batches (see `loader`)."""

    def __init__(self, dir: str | os.PathLike, *, verify: bool = False):
        self.dir = Path(dir)
        if not self.dir.is_dir():
            raise UserError(f"{self.dir}: no such shard directory")
        self.manifest = m = _read_manifest(self.dir / "manifest.json")
        if not m.get("complete", False):
            raise UserError(f"{self.dir}: extraction is incomplete ({len(m['shards'])} shards so far); "
                            "finish it with `sae-fast extract ... --resume`")
        _check_files(self.dir, m)
        self.d, self.dtype = int(m["d"]), m["dtype"]
        self.torch_dtype = TORCH_DTYPES[self.dtype]
        self.shard_names = [s["name"] for s in m["shards"]]
        counts = np.array([s["n_tokens"] for s in m["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.n_tokens = int(self.offsets[-1])
        if self.n_tokens != m["n_tokens"]:
            raise UserError(f"{self.dir}/manifest.json: shards hold {self.n_tokens} tokens, n_tokens says "
                            f"{m['n_tokens']}")
        self._maps: dict[tuple[int, str], tuple] = {}
        if verify:
            self.verify()
        self.batch_size, self.seed, self.epoch = 4096, 0, 0

    # ------------------------------------------------------------------ files
    def path(self, shard: int, array: str = "acts") -> Path:
        return self.dir / self.manifest["shards"][shard][array]["file"]

    def array(self, shard: int, array: str = "acts") -> np.ndarray:
        """The memory-mapped array of one shard (acts [n, d], cells [n] or genes [n])."""
        key = (shard, array)
        if key not in self._maps:
            f = self.path(shard, array)
            n = self.manifest["shards"][shard]["n_tokens"]
            want = ((n, self.d), DTYPES[self.dtype]) if array == "acts" else ((n,), _ID_DTYPES[array])
            try:
                with open(f, "rb") as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(fh)
                    offset = fh.tell()
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if f.stat().st_size else None
            except (ValueError, OSError) as e:
                raise UserError(f"{f}: shard {self.shard_names[shard]} cannot be read ({e})") from None
            if shape != want[0] or dtype != want[1] or fortran:
                raise UserError(f"{f}: shard {self.shard_names[shard]} holds {dtype}{list(shape)}, the "
                                f"manifest says {np.dtype(want[1])}{list(want[0])}")
            data = np.frombuffer(mm, dtype, int(np.prod(shape)), offset).reshape(shape) if n else \
                np.empty(shape, dtype)
            self._maps[key] = (mm, data, offset)
        return self._maps[key][1]

    def release(self, ranges) -> None:
        """Drop the pages this process has mapped for the tokens `ranges` ([n, 2] global token (start, stop)
        pairs, each within one shard; the pages stay in the page cache): bounds the resident set of a long
        streaming pass, at a cost that follows what was read, not the size of the shard set. Mappings are
        re-faulted on the next access. One process_madvise call for all the ranges where the kernel allows it
        (`_dontneed_batched`), else one madvise per range."""
        ranges = np.asarray(ranges, np.int64).reshape(-1, 2)
        ranges = ranges[ranges[:, 1] > ranges[:, 0]]
        shard = np.searchsorted(self.offsets, ranges[:, 0], "right") - 1
        spans = []  # (map, start address, byte ranges [n, 2] within the map)
        for (i, _), (mm, data, offset) in self._maps.items():
            mine = ranges[shard == i] - self.offsets[i]
            if mm is None or not hasattr(mm, "madvise") or not len(mine):
                continue
            row = data.strides[0]
            lo, hi = offset + mine[:, 0] * row, np.minimum(offset + mine[:, 1] * row, len(mm))
            spans.append((mm, data.ctypes.data - offset, np.stack([lo - lo % mmap.PAGESIZE, hi], 1)))
        if spans and not _dontneed_batched(np.concatenate([base + b for _, base, b in spans])):
            for mm, _, b in spans:
                for lo, hi in b.tolist():
                    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def verify(self) -> None:
        """Recompute every file's CRC-32; a UserError names the first shard whose bytes changed."""
        for s in self.manifest["shards"]:
            for name in ARRAYS:
                f = self.dir / s[name]["file"]
                if _crc32(f) != s[name]["crc32"]:
                    raise UserError(f"{f}: shard {s['name']} is corrupted (CRC-32 {_crc32(f)} != manifest "
                                    f"{s[name]['crc32']}); re-extract it")

    # ------------------------------------------------------------------ random access
    def _gather(self, start: int, stop: int, array: str) -> np.ndarray:
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens})")
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(max(first, 0), len(self.shard_names)):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            if lo >= stop:
                break
            parts.append(self.array(i, array)[max(start, lo) - lo: min(stop, hi) - lo])
        if not parts:
            shape = (0, self.d) if array == "acts" else (0,)
            return np.empty(shape, DTYPES[self.dtype] if array == "acts" else np.int64)
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    def as_tensor(self, acts: np.ndarray) -> torch.Tensor:
        """An on-disk activation array as a torch tensor of the stored dtype (bf16 from its uint16 bits)."""
        t = torch.from_numpy(acts)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Activations of tokens [start, stop) as a [stop - start, d] tensor of the stored dtype."""
        return self.as_tensor(self._gather(start, stop, "acts"))

    def cell_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Each token's cell (row of the AnnData given to extract), for tokens [start, stop)."""
        return self._gather(start, self.n_tokens if stop is None else stop, "cells")

    def gene_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Each token's gene as an index into `genes` (-1 = special token), for tokens [start, stop)."""
        return self._gather(start, self.n_tokens if stop is None else stop, "genes")

    @property
    def genes(self) -> list[str] | None:
        return self.manifest.get("genes")

    def __len__(self) -> int:
        return self.n_tokens

    # ------------------------------------------------------------------ streaming
    def iter_batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, *, epoch: int = 0,
                     with_ids: bool = False, dtype: torch.dtype | None = None, **kw):
        """Batches of `batch_size` tokens; shuffled across shards through a bounded mixing buffer.

        Yields tensors [n, d] (stored dtype unless `dtype`), or (acts, cell_ids, gene_ids) with `with_ids`.
        Deterministic for a given (seed, epoch); see `sae_fast.activations.loader.ShardLoader` for `**kw`
        (buffer_mb, chunk_tokens, rank, world_size, drop_last)."""
        from sae_fast.activations.loader import ShardLoader

        return iter(ShardLoader(self, batch_size, shuffle=shuffle, seed=seed, with_ids=with_ids, dtype=dtype,
                                epoch=epoch, **kw))

    def loader(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, dtype=torch.float32, **kw):
        """A re-iterable training source (`ShardLoader`): a new shuffle every pass, `set_epoch` for resume,
        and the rank's part of each global batch when torch.distributed is initialised."""
        from sae_fast.activations.loader import ShardLoader

        return ShardLoader(self, batch_size, shuffle=shuffle, seed=seed, dtype=dtype, **kw)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shuffle `iter(self)` yields (the trainer sets it before every pass)."""
        self.epoch = int(epoch)

    def __iter__(self):
        """Shuffled float32 batches of `self.batch_size` tokens (seed `self.seed`, epoch `self.epoch`), so
        that `train_sae(open_shards(dir))` works; prefer `loader(...)` to set batch size, seed and epochs."""
        return iter(self.loader(self.batch_size, seed=self.seed, epoch=self.epoch))

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Shards({str(self.dir)!r}: {self.n_tokens} tokens x {self.d} {self.dtype} in "
                f"{len(self.shard_names)} shards; {m.get('model')} layer {m.get('layer')})")


def open_shards(dir: str | os.PathLike, *, verify: bool = False) -> Shards:
    """Open a shard directory for random access (memory-mapped) and streaming; see `Shards`."""
    return Shards(dir, verify=verify)
