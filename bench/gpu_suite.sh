#!/usr/bin/env bash
# The GPU check in one command: <= 8 minutes on one GPU, safe to run on a fresh machine.
#
#   bench/gpu_suite.sh             on a CUDA machine:
#     1. the kernel tests with real Triton (tests/test_ops.py -k triton, TRITON_INTERPRET unset);
#     2. every `sae-fast bench` on CUDA (sparsify's own Triton decoder is the peer in `bench train`); the
#        CPU-only ones (loader, enrich) at --quick sizes;
#        `bench fused` is [Y]'s setting: AIDO.Cell-100M (random weights), 8 cells x 19,266 tokens in bf16, a
#        fused TopK SAE step at block 12 (tokens/s, torch.cuda.max_memory_allocated; goal <= 24 GB), and a
#        steered forward at the same size when sae_fast.steer is installed;
#     3. bench/results/gpu-<name>.json per step, gpu-device.json (the device), gpu-suite.json (every step:
#        status, seconds, file). Exit status 1 if any step failed; the others still run.
#   bench/gpu_suite.sh --dry-run   walks the same steps on the CPU at tiny sizes (--quick, CUDA hidden), writes
#        to a temporary directory (or --out), collects the Triton kernel tests and runs one under the
#        interpreter. tests/test_gpu_suite.py runs it, so a first GPU call cannot fail on a typo.
#   --out DIR                      where the JSON files go.
#   --budget SECONDS               total time budget (default 480); each step gets what is left, at most 150 s.
set -uo pipefail

cd "$(dirname "$0")/.."
DRY=0
OUT=""
BUDGET=480
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (use --dry-run, --out DIR, --budget SECONDS)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
START=$(date +%s)
STEPS=$(mktemp)
trap 'rm -f "$STEPS"' EXIT

if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  [ -n "$OUT" ] || OUT=$(mktemp -d -t sae_fast_gpu_suite_XXXX)
else
  [ -n "$OUT" ] || OUT=bench/results
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: no CUDA device visible to torch; use --dry-run on a CPU machine" >&2
    exit 2
  fi
fi
mkdir -p "$OUT"
echo "gpu_suite: out=$OUT dry_run=$DRY budget=${BUDGET}s python=$PY"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME FILE CMD...: run CMD under what is left of the budget (<= 150 s); log status and time to $STEPS.
step() {
  local name="$1" file="$2"; shift 2
  local t0 limit rc
  limit=$(left)
  [ "$limit" -gt 150 ] && limit=150
  if [ "$limit" -le 5 ]; then
    echo "{\"step\": \"$name\", \"status\": \"skipped: out of time\", \"seconds\": 0, \"file\": null}" >> "$STEPS"
    echo "gpu_suite: $name skipped (budget spent)"
    return
  fi
  echo "gpu_suite: $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  local status=ok
  [ "$rc" = 0 ] || status="failed (exit $rc$([ "$rc" = 124 ] && echo ', timed out'))"
  [ -z "$file" ] || [ -f "$file" ] || { [ "$status" = ok ] && status="failed: $file not written"; }
  echo "{\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $(( $(date +%s) - t0 )), \"file\": $([ -n "$file" ] && echo "\"$(basename "$file")\"" || echo null)}" >> "$STEPS"
}

# 0. The device.
step device "$OUT/gpu-device.json" "$PY" - "$OUT/gpu-device.json" "$DRY" <<'EOF'
import subprocess, sys, torch
from sae_fast.utils import machine_description, write_json
desc = {"dry_run": sys.argv[2] == "1", "machine": machine_description()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    desc["cuda"] = {"name": p.name, "total_memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}",
                    "multiprocessors": p.multi_processor_count, "torch_cuda": torch.version.cuda}
    try:
        desc["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        desc["nvidia_smi"] = f"unavailable: {e}"
try:
    import triton
    desc["triton"] = triton.__version__
except ImportError:
    desc["triton"] = None
write_json(sys.argv[1], desc)
print(desc)
EOF

# 1. Kernel tests with real Triton (the dry run collects them and runs one under the interpreter).
KT="$OUT/gpu-kernel-tests.xml"
if [ "$DRY" = 1 ]; then
  step kernel-tests-collect "" "$PY" -m pytest -q --collect-only -p no:cacheprovider tests/test_ops.py -k triton
  step kernel-tests "$KT" env TRITON_INTERPRET=1 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_ops.py \
    -k "triton and relu_false" --junitxml "$KT"
else
  step kernel-tests "$KT" env -u TRITON_INTERPRET "$PY" -m pytest -q -x -p no:cacheprovider tests/test_ops.py \
    -k triton --junitxml "$KT"
fi

# 2. Every benchmark (fused first: it is the one the GPU is lent for).
BENCHES=$("$PY" -c "from sae_fast.commands.bench import available; print(' '.join(available()))") || BENCHES=""
ORDERED="$(echo "$BENCHES" | tr ' ' '\n' | grep -x fused) $(echo "$BENCHES" | tr ' ' '\n' | grep -vx fused | tr '\n' ' ')"
if [ "$DRY" = 1 ]; then
  # One process for all of them (the same `sae-fast bench` entry point, main(), without paying the interpreter
  # and torch start-up a dozen times on the CPU); every bench still gets its own status line.
  "$PY" - "$OUT" "$STEPS" $ORDERED <<'EOF'
import json, sys, time, traceback
from sae_fast.cli import main
out, steps = sys.argv[1], sys.argv[2]
for name in sys.argv[3:]:
    t0, status = time.time(), "ok"
    try:
        rc = main(["bench", name, "--quick", "--json", f"{out}/gpu-{name}.json"])
        status = "ok" if rc in (0, None) else f"failed (exit {rc})"
    except BaseException as e:  # noqa: BLE001 - report and go on to the next bench
        traceback.print_exc()
        status = f"failed: {type(e).__name__}: {e}".replace('"', "'")[:200]
    with open(steps, "a") as fh:
        fh.write(json.dumps({"step": f"bench-{name}", "status": status, "seconds": round(time.time() - t0),
                             "file": f"gpu-{name}.json"}) + "\n")
EOF
else
  for name in $ORDERED; do
    size=""
    case "$name" in loader|enrich) size="--quick" ;; esac  # CPU-only: no GPU in them
    step "bench-$name" "$OUT/gpu-$name.json" "$PY" -m sae_fast bench "$name" $size --json "$OUT/gpu-$name.json"
  done
fi

# 3. The summary.
"$PY" - "$OUT" "$STEPS" "$DRY" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
from pathlib import Path
from sae_fast.utils import write_json
out, steps = Path(sys.argv[1]), [json.loads(line) for line in open(sys.argv[2])]
device = json.loads((out / "gpu-device.json").read_text()) if (out / "gpu-device.json").is_file() else None
write_json(out / "gpu-suite.json", {"dry_run": sys.argv[3] == "1", "seconds": int(sys.argv[4]), "device": device,
                                    "steps": steps})
for s in steps:
    print(f"  {s['step']:<24} {s['status']:<32} {s['seconds']:>4} s  {s['file'] or ''}")
bad = [s["step"] for s in steps if s["status"] != "ok"]
print(f"gpu_suite: {len(steps) - len(bad)}/{len(steps)} steps ok in {sys.argv[4]} s -> {out}/gpu-suite.json")
sys.exit(1 if bad else 0)
EOF
