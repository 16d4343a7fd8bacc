"""Shared benchmark plumbing: timing, peak memory in a fresh process, and the JSON record format.

Every benchmark module in this package exposes `run(quick: bool = False) -> list[dict]`, each dict made by
`record(...)`: keys bench, config, device, ours_s, reference_s, speedup (= reference_s / ours_s), plus extras.
A measurement that did not happen is null (never NaN: the files are strict JSON).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from sae_fast.utils import finite


def time_fn(fn, *, repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median wall time of fn() in seconds, after `warmup` calls (CUDA-synchronised where relevant)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_time:
        gc.collect()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: dict, *, repeat: int, warmup: int = 1, clock=time.perf_counter) -> dict[str, list[float]]:
    """Times (s, by `clock`: wall by default) of every fn in `fns`, called in turn once per round for `repeat`
    rounds.

    On a shared machine the load changes from second to second; interleaving exposes every contender to the
    same load, so ratios of minima (or medians of per-round ratios) compare like with like. With one torch
    thread, clock=time.process_time counts only this process's own CPU time: what the other processes of a
    loaded machine take is left out (what they do to the shared caches is not)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            gc.collect()
            t0 = clock()
            fn()
            sync()
            times[name].append(clock() - t0)
    return times


def machine_load() -> dict:
    """The 1/5/15-minute load averages next to the core count: how shared the machine was during a run."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return {"cores": os.cpu_count()}
    return {"loadavg_1m": round(one, 2), "loadavg_5m": round(five, 2), "loadavg_15m": round(fifteen, 2),
            "cores": os.cpu_count()}


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from sae_fast.utils import machine_description

    m = machine_description()
    return f"cpu: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads)"


def record(bench: str, config: dict, device: str, ours_s: float | None, reference_s: float | None,
           **extra) -> dict:
    """One measurement; `reference_s` None (or NaN) = the reference did not run, and speedup is then None."""
    ok = ours_s is not None and reference_s is not None and ours_s > 0
    return finite({"bench": bench, "config": config, "device": device, "ours_s": ours_s,
                   "reference_s": reference_s, "speedup": reference_s / ours_s if ok else None, **extra})


def peak_rss_of(code: str, *, baseline: bool = True) -> int:
    """Run `code` in a fresh Python process and return its peak RSS in bytes.

    With `baseline`, the process's peak after `import torch` is subtracted; without, it is the whole process.
    Used to compare peak memory of ours vs a reference without one polluting the other's high-water mark."""
    # VmHWM is this process's own high-water mark; ru_maxrss would inherit the parent's across fork+exec.
    prog = (
        "import torch, sys\n"
        f"from {__name__} import self_peak_rss\n"
        f"base = self_peak_rss() if {baseline} else 0\n"
        f"{code}\n"
        "print(self_peak_rss() - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmHWM, VmRSS, ...) in bytes; None where /proc is absent."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def anon_rss_reader():
    """A cheap reader of this process's anonymous resident bytes (RssAnon = resident - shared pages of
    /proc/self/statm, ~2 us per call against ~60 us for parsing /proc/self/status): for sampling once per batch
    without slowing what is timed. Returns a zero reader where /proc is absent."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        return lambda: 0
    page = os.sysconf("SC_PAGE_SIZE")

    def read() -> int:
        fields = os.pread(fd, 128, 0).split()
        return (int(fields[1]) - int(fields[2])) * page

    return read


def self_peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM from /proc/self/status; ru_maxrss where /proc is absent)."""
    peak = proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def format_table(rows: list[dict]) -> str:
    lines = [f"{'bench':<12} {'config':<48} {'ours (s)':>10} {'ref (s)':>10} {'speedup':>8}"]
    def num(v, width, fmt=".4g"):
        return f"{v:>{width}{fmt}}" if isinstance(v, (int, float)) else f"{'-':>{width}}"

    for r in rows:
        cfg = json.dumps(r["config"], separators=(",", ":"))[:48]
        speedup = f"{num(r.get('speedup'), 7, '.2f')}x" if r.get("speedup") is not None else f"{'-':>8}"
        lines.append(f"{r['bench']:<12} {cfg:<48} {num(r.get('ours_s'), 10)} {num(r.get('reference_s'), 10)} "
                     f"{speedup}")
    return "\n".join(lines)
