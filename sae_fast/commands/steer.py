"""`sae-fast steer CONFIG.toml`: steering with a trained SAE (an alpha sweep and/or contrastive steering)."""

from __future__ import annotations

HELP = "steer cell identity with a trained SAE: alpha sweeps ([Y]'s Table 1) and contrastive steering"
DESCRIPTION = """\
Edit SAE features inside the model's forward pass ([Y], SPEC §3) and report what changes, with the model, data
and layer of a run config (the same TOML as `sae-fast run`; its [steer] section, or these flags):

  alpha sweep     scale one feature by each alpha; per alpha the DEGs of the predicted expression (paired
                  t-test over cells, Bonferroni over the expressed genes) against the unsteered model and
                  against alpha = 0, and the top GO terms of the up and the down genes ([Y]'s Table 1)
  contrastive     learn one alpha per annotated feature (>= 1 significant GO term) that moves --source cells
                  toward the mean embedding of --target cells; the closer fraction (all and held-out source
                  cells), the gap fraction per gene, and a control with as many random features

The SAE: --sae DIR, [run] sae, or the sae/ of --run DIR, a finished run folder (whose interpretation tables
then choose the annotated features and the sweep's default feature; without one they are computed).
Tables go to OUT/tables (alpha_sweep, deg_f<F>_a<alpha>, contrast_alphas, contrast_cells, contrast_gap,
contrast_history; steer_summary.json), and a summary is printed. Every [steer] key is also --set steer.KEY=V.

Examples:
  sae-fast steer examples/demo.toml --run runs/demo --feature 746 --alpha=-5,5
  sae-fast steer examples/demo.toml --run runs/demo --source "CD4 T" --target "CD8 T" --label cell_type
  sae-fast steer my.toml --sae runs/my/sae --feature 12 --alpha 0,0.5,2,5 --out runs/my-steer
"""


def add_arguments(parser):
    parser.add_argument("config", help="the run config (TOML) naming the model, data and layer")
    parser.add_argument("--run", metavar="DIR", help="a finished run folder: its sae/ and interpretation tables")
    parser.add_argument("--sae", metavar="DIR", help="the trained SAE (default: [run] sae, else --run's sae/)")
    parser.add_argument("--out", metavar="DIR", help="where the tables go (default: --run DIR, else "
                        "runs/<config name>-steer)")
    parser.add_argument("--feature", type=int, help="the feature of the alpha sweep")
    parser.add_argument("--alpha", metavar="A,B,...", help="alphas of the sweep, comma-separated (e.g. 0,0.5,2,5; "
                        "with a leading minus: --alpha=-5,5)")
    parser.add_argument("--source", help="contrastive steering from cells with this label value")
    parser.add_argument("--target", help="... toward cells with this label value")
    parser.add_argument("--label", help="the obs column of --source / --target (default cell_type)")
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override one config key, e.g. --set steer.epochs=20; repeatable")


def _flag_overrides(args) -> list[str]:
    import json
    import math

    from sae_fast.errors import UserError

    out = []
    if args.feature is not None:
        out.append(f"steer.feature={args.feature}")
    if args.alpha is not None:
        try:
            alphas = [float(a) for a in args.alpha.split(",") if a.strip()]
        except ValueError:
            raise UserError(f"--alpha {args.alpha!r}: give comma-separated numbers, e.g. 0,0.5,2,5") from None
        bad = [a for a in alphas if not math.isfinite(a)]
        if bad:
            raise UserError(f"--alpha {args.alpha!r}: alpha {bad[0]} is not finite")
        out.append(f"steer.alphas={json.dumps(alphas)}")
    for key in ("source", "target", "label"):
        if getattr(args, key) is not None:
            out.append(f"steer.{key}={json.dumps(getattr(args, key))}")
    if (args.source is not None or args.target is not None) and args.feature is None and args.alpha is None:
        out.append("steer.sweep=false")  # only contrastive steering was asked for
    return out


def run(args):
    from pathlib import Path

    from sae_fast import load_sae
    from sae_fast.errors import UserError
    from sae_fast.run import load_config
    from sae_fast.run.config import cells_and_model
    from sae_fast.run.context import Context
    from sae_fast.run.folder import RunFolder
    from sae_fast.run.steer import check, run_steering, summary_lines
    from sae_fast.utils import atomic_path

    config = load_config(args.config, [*args.overrides, *_flag_overrides(args)])
    if config.steer is None:
        raise UserError(f"{args.config}: nothing to steer: add a [steer] section, or give --feature/--alpha or "
                        "--source/--target")
    run_dir = Path(args.run) if args.run else None
    if run_dir is not None and not (run_dir / "state.json").exists():
        raise UserError(f"--run {run_dir}: not a sae-fast run folder (no state.json)")
    sae_dir = args.sae or config.run.sae or (run_dir / "sae" if run_dir else None)
    if sae_dir is None:
        raise UserError("no SAE: pass --sae DIR, --run DIR (a finished run folder) or set [run] sae")
    adata, model, _ = cells_and_model(config)
    try:
        model.check_layer(config.extract.layer)
    except UserError as e:
        raise UserError(f"extract.layer: {e}") from None
    sae = load_sae(sae_dir)
    if sae.W_dec.shape[1] != model.d_model:
        raise UserError(f"{sae_dir}: the SAE reads d = {sae.W_dec.shape[1]} but {model.name} has d_model = "
                        f"{model.d_model}")
    out = Path(args.out) if args.out else (run_dir or Path("runs") / f"{Path(args.config).stem}-steer")
    folder = RunFolder(out)
    ctx = Context(config=config, folder=folder, model=model, adata=adata)
    ctx.sae = sae
    check(ctx)
    if config.steer.feature is not None:
        from sae_fast.steer.interventions import check_features

        check_features([config.steer.feature], sae, "steer.feature")
    enrichment = None
    if run_dir is not None:
        try:
            enrichment = RunFolder(run_dir).read_table("enrichment")
        except (FileNotFoundError, OSError):
            enrichment = None
    run_steering(config.steer, sae, model, adata, config.extract.layer, folder, enrichment, ctx.say)
    text = "\n".join(summary_lines(folder, model.name))
    with atomic_path(folder.tables / "steer_summary.txt") as tmp:
        tmp.write_text(text + "\n")
    print(text)
    print(f"tables: {folder.tables}")
    return 0
