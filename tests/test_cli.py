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


def test_gene_filter_has_one_meaning(tmp_path):
    """--gene-filter is interpret's background rule only; extract's list of genes to keep is --genes FILE."""
    import sae_fast
    from sae_fast.cli import main

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    flags = {name: {s: a for a in p._actions for s in a.option_strings} for name, p in sub.items()}
    assert [n for n in flags if "--gene-filter" in flags[n]] == ["interpret"]
    assert flags["interpret"]["--gene-filter"].choices == ("paper", "code", "none")
    adata = sae_fast.datasets.pbmc3k()[:3].copy()
    adata.write_h5ad(tmp_path / "cells.h5ad")
    keep = sae_fast.load_model("mini").genes[:3]
    (tmp_path / "genes.txt").write_text("\n".join(keep) + "\n")
    assert main(["extract", "--model", "mini", "--data", str(tmp_path / "cells.h5ad"), "--layer", "1",
                 "--out", str(tmp_path / "acts"), "--genes", str(tmp_path / "genes.txt"), "-q"]) == 0
    shards = sae_fast.open_shards(tmp_path / "acts")
    assert len(shards) == 3 * 3 and sorted(shards.manifest["gene_filter"]) == sorted(keep)
