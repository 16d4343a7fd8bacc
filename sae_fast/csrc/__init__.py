"""C++/OpenMP CPU kernels (sparse.cpp), compiled on first use with torch.utils.cpp_extension and cached.

The build is optimised for the CPU it runs on (-march=native), so the cached extension's name carries a hash
of the source, the flags, the CPU model and the torch version: a cache shared between machines never loads a
binary built for another CPU. The first build takes about a minute; later processes load the cached .so.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from importlib.resources import files

CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _cpu_model() -> str:
    """The CPU's model name and instruction-set flags (what -march=native compiles for)."""
    found = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags") and key not in found:
                    found[key] = line
    except OSError:
        pass
    return "".join(found.values()) or platform.processor() or platform.machine()


@functools.cache
def load_extension():
    """Build (once per process, lazily) and import the extension; raises if no compiler is available."""
    import torch
    from torch.utils.cpp_extension import load

    source = files("sae_fast.csrc").joinpath("sparse.cpp")
    key = "|".join([source.read_text(), " ".join(CFLAGS + LDFLAGS), _cpu_model(), torch.__version__])
    name = "sae_fast_cpu_" + hashlib.sha1(key.encode()).hexdigest()[:12]
    return load(name=name, sources=[str(source)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=False)
