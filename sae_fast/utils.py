"""Small shared helpers: atomic writes, progress bars, the machine description."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

# Set by the CLI's -q / -v; library users get bars by default.
VERBOSITY = 1

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Nothing half-written ever carries the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the permissions open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def json_text(obj, **kwargs) -> str:
    """`obj` as JSON: a non-finite float (NaN or inf: a number that is undefined) is written as null, because
    NaN is not JSON (json.dumps would write it, and strict readers reject the file); numpy floats are numbers;
    other objects that JSON cannot hold are written as str()."""
    return json.dumps(finite(obj), allow_nan=False, default=str, **kwargs)


def finite(obj):
    """obj with every non-finite float (NaN, inf; numpy's too), also inside dicts, lists and tuples, replaced by
    None, and numpy floats made Python floats."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write `obj` as indented JSON (see json_text)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj, indent=2) + "\n")


def table_format() -> str:
    """How tables are stored: parquet when pyarrow is installed, else CSV."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return "csv"
    return "parquet"


def write_table(stem: str | os.PathLike, df) -> Path:
    """Atomically write a DataFrame to STEM.parquet (STEM.csv without pyarrow), without its index."""
    ext = table_format()
    path = Path(f"{stem}.{ext}")
    with atomic_path(path) as tmp:
        if ext == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def read_table(stem: str | os.PathLike):
    """The DataFrame `write_table(stem, ...)` wrote."""
    import pandas as pd

    path = Path(f"{stem}.{table_format()}")
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def say(msg: str) -> None:
    """A progress line on stdout, honouring the CLI's verbosity (silent under -q)."""
    if VERBOSITY >= 1:
        print(msg, flush=True)


def progress(total=None, desc: str = "", unit: str = "it", *, disable: bool = False, **kw):
    """A tqdm bar honouring the CLI's verbosity. Use `unit="tok"` and `unit_scale=True` for tokens/s.

    `disable=True` silences it regardless (e.g. on every rank but 0 of a distributed run)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=disable or VERBOSITY < 1, dynamic_ncols=True,
                leave=False, **kw)


def machine_description() -> dict:
    """What a benchmark ran on: CPU model, cores, memory, GPU (if any), library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    desc = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return desc
