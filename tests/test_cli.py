import subprocess
import sys

from sae_fast.cli import COMMANDS, build_parser


def test_every_subcommand_has_help_for_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            if action.dest in ("help",):
                continue
            assert action.help and action.help.strip(), f"{name}: option {action.option_strings} has no help"


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "sae_fast", "--help"], capture_output=True, text=True,
                         check=True)
    assert "sae-fast" in out.stdout and "demo" in out.stdout


def test_every_subcommand_help_renders():
    """`sae-fast COMMAND --help` formats (argparse %-expands help strings: a bare % breaks it)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert f"sae-fast {name}" in text and "--quiet" in text, name
