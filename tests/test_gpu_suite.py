"""bench/gpu_suite.sh --dry-run: the GPU suite's every step on the CPU at tiny sizes, so that the first call on
a lent GPU cannot fail on a typo."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def strict(path: Path):
    return json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{path}: {c}")))


def test_dry_run_walks_every_step(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                                "HOME": str(Path.home())}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = strict(out / "gpu-suite.json")
    assert suite["dry_run"] is True and suite["device"]["machine"]["cores"] >= 1
    steps = {s["step"]: s for s in suite["steps"]}
    from sae_fast.commands.bench import available

    assert {"device", "kernel-tests"} | {f"bench-{n}" for n in available()} <= set(steps)
    assert all(s["status"] == "ok" for s in steps.values()), steps
    for s in steps.values():
        if s["file"] and s["file"].endswith(".json"):
            strict(out / s["file"])
    fused = strict(out / "gpu-fused.json")
    train_row = next(r for r in fused if r["bench"] == "fused")
    assert train_row["tokens_per_s"] > 0 and train_row["config"]["layer"] == 2
    steer_row = next(r for r in fused if r["bench"] == "fused-steer")
    try:
        import sae_fast.steer  # noqa: F401
        assert steer_row["tokens_per_s"] > 0
    except ImportError:
        assert "not installed" in steer_row["skipped"]
    kernel = (out / "gpu-kernel-tests.xml").read_text()
    assert 'failures="0"' in kernel and 'errors="0"' in kernel and 'tests="0"' not in kernel


def test_unknown_argument_is_refused():
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr
