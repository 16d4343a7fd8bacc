"""`sae-fast bench NAME`: time ours against a reference in the same process and report the ratio."""

import pkgutil
from importlib import import_module

HELP = "benchmark a kernel or stage against its reference (speedup = reference time / ours)"
DESCRIPTION = """\
Time one of sae-fast's stages against a reference implementation in the same run, and report the ratio
reference time / our time. Each benchmark also prints the machine it ran on; --json writes one object per
measurement (keys: bench, config, device, ours_s, reference_s, speedup) for bench/results/.

Benchmarks: encode, decode, train (SAE kernels and a full training step vs dense PyTorch and EleutherAI
sparsify), forward (model tokens/s and peak memory vs context length), enrich (ORA vs gseapy.enrich),
loader (shuffled shard streaming, 1 and 2 gather threads, vs a single-threaded contiguous copy of the same bytes
in its own process), extract (extraction vs a plain forward), scib (our scIB wrapper vs scib-metrics called
directly with the same kNN; exact vs pynndescent kNN), steer (the shared-prefix steering runner vs two full
hooked forwards per batch), contrast (a contrastive-steering epoch on the cached prefix vs full forwards), fused
([Y]'s GPU setting: AIDO.Cell-100M config at 8 x 19,266 tokens with a fused SAE step; for a GPU, tiny on a CPU).

Example:  sae-fast bench train --json bench/results/train.json
"""


def available() -> list[str]:
    import sae_fast.benchmarks as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != "common")


def add_arguments(parser):
    parser.add_argument("name", help="which benchmark: " + ", ".join(available()))
    parser.add_argument("--json", metavar="FILE", help="write the measurements to FILE as a JSON list")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test (seconds)")


def run(args):
    from sae_fast.benchmarks.common import format_table
    from sae_fast.errors import UserError
    from sae_fast.utils import machine_description, write_json

    if args.name not in available():
        raise UserError(f"unknown benchmark {args.name!r}; choose one of {', '.join(available())}")
    machine = machine_description()
    print(f"machine: {machine}")
    rows = import_module(f"sae_fast.benchmarks.{args.name}").run(quick=args.quick)
    for r in rows:
        r.setdefault("machine", machine)
    print(format_table(rows))
    if args.json:
        write_json(args.json, rows)
        print(f"wrote {len(rows)} measurements to {args.json}")
    return 0
