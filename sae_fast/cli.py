"""`sae-fast`: the command line. One subcommand per job; each lives in sae_fast/commands/<name>.py and
provides HELP (one line), DESCRIPTION (the --help text), add_arguments(parser) and run(args) -> exit code."""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from sae_fast import __version__, utils
from sae_fast.errors import UserError

COMMANDS = ["demo", "run", "extract", "train", "interpret", "report", "debatch", "layers", "steer", "bench"]

EPILOG = """\
Start with `sae-fast demo`: the whole story (model -> SAE -> GO interpretation) on the embedded mini model and
bundled PBMC cells, in minutes on a laptop CPU. Then copy examples/demo.toml, point it at your checkpoint and
data, and `sae-fast run my.toml`. Each subcommand has its own --help.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-fast", description="Sparse autoencoders for single-cell foundation models: "
        "train them on the residual stream, interpret their features with GO enrichment.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sae-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = import_module(f"sae_fast.commands.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-q", "--quiet", action="store_true", help="print only errors and the final summary")
        p.add_argument("-v", "--verbose", action="store_true", help="print more, and full tracebacks on errors")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    utils.VERBOSITY = 0 if args.quiet else (2 if args.verbose else 1)
    try:
        return args._run(args) or 0
    except (UserError, FileNotFoundError) as e:
        if args.verbose:
            raise
        msg = str(e) if isinstance(e, UserError) else f"{e.filename}: file not found"
        for line in msg.splitlines():  # one line per problem (a config can have several)
            print(f"sae-fast {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sae-fast {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
