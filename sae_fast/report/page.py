"""One self-contained HTML page from a run folder's files.

`render(run_dir)` reads only files (config.resolved.toml, state.json, environment.json, log.jsonl, tables/,
summary.json, summary.txt, annotated.h5ad, figures/*.png) and returns the page as a string: figures are inline
PNGs, styles and the feature browser's few lines of JavaScript are inline, and nothing is fetched from the
network. A section whose files are absent is left out; a table with missing or extra columns shows what it has.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from sae_fast.errors import UserError
from sae_fast.report import figures as figs

N_BINS = 16  # histogram bins of the per-cell-type activation violins
N_TERMS = 8  # GO terms shown per feature in the browser
N_GENES = 20  # top genes shown per feature (the features table keeps 20)
BATCH_HINTS = ("batch", "patient", "sample", "donor", "chemistry", "technology", "assay", "source", "stim")
METRIC_LABELS = {  # sae_metrics.json keys -> (label, how to print, what it means)
    "fvu_heldout": ("FVU, held-out cells", "{:.4f}", "fraction of variance unexplained on cells not trained on"),
    "fvu": ("FVU", "{:.4f}", "fraction of variance unexplained"),
    "mse": ("MSE", "{:.4g}", "mean squared reconstruction error per token"),
    "l0": ("L0", "{:.2f}", "active features per token"),
    "dead_fraction": ("dead", "{:.1%}", "features that never fired on the evaluated tokens"),
    "ers_ratio": ("ERS (paper)", "{:.3f}", "MSE(X_0, X_orig) / MSE(X_orig, X_rec) over cell embeddings"),
    "ers_fraction": ("ERS (code)", "{:.3f}", "1 - SE(X_orig, X_rec) / SE(X_0, X_orig)"),
    "ers": ("ERS", "{:.3f}", "Embedding Recovery Score"),
    "n_tokens": ("tokens evaluated", "{:,.0f}", ""),
    "n_cells": ("cells evaluated", "{:,.0f}", ""),
    "holdout": ("held-out share", "{:.0%}", "cells kept out of training and evaluated here (data.holdout)"),
    "n_features": ("features", "{:,.0f}", "dictionary size"),
}


# ------------------------------------------------------------------------------------------- reading files


class RunDir:
    """Read-only access to a run folder's files; every reader returns None when its file is absent."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: no such folder; give a run folder (sae-fast run / demo --out)")
        markers = ("state.json", "log.jsonl", "tables", "summary.txt", "annotated.h5ad")
        if not any((self.path / m).exists() for m in markers):
            raise UserError(f"{self.path}: not a sae-fast run folder (none of {', '.join(markers)}); give the "
                            "folder `sae-fast run` / `demo` / `interpret` wrote")

    def table(self, name: str) -> pd.DataFrame | None:
        for ext in ("parquet", "csv"):
            p = self.path / "tables" / f"{name}.{ext}"
            if p.is_file():
                try:
                    return pd.read_parquet(p) if ext == "parquet" else pd.read_csv(p)
                except Exception as e:  # a damaged table leaves its section out, not the whole page
                    raise UserError(f"{p}: cannot be read ({e.__class__.__name__}: {e}); rerun its stage") from None
        return None

    def json(self, rel: str):
        p = self.path / rel
        return json.loads(p.read_text()) if p.is_file() else None

    def text(self, rel: str) -> str | None:
        p = self.path / rel
        return p.read_text() if p.is_file() else None

    def log(self) -> list[dict]:
        p = self.path / "log.jsonl"
        if not p.is_file():
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: skip it
                continue
        return out

    def config(self) -> dict:
        text = self.text("config.resolved.toml")
        if text is not None:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            try:
                return tomllib.loads(text)
            except tomllib.TOMLDecodeError:
                pass
        return (self.json("state.json") or {}).get("config") or {}

    def annotated(self):
        p = self.path / "annotated.h5ad"
        if not p.is_file():
            return None
        import anndata

        return anndata.read_h5ad(p, backed="r")


# ------------------------------------------------------------------------------------------ HTML helpers


def esc(x) -> str:
    return html.escape("" if x is None else str(x))


def fmt(x, spec: str = "{:.3g}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if isinstance(x, (int, np.integer)) and "%" not in spec and "e" not in spec:
        return f"{int(x):,}"
    try:
        return spec.format(x)
    except (ValueError, TypeError):
        return str(x)


def img(uri: str, alt: str, cls: str = "fig") -> str:
    """An inline image; a figure of figures.py shows at its matplotlib size (at most the column's width)."""
    width = f' width="{figs.css_width(uri)}"' if cls == "fig" else ""
    return f'<img class="{cls}" src="{uri}" alt="{esc(alt)}"{width}>'


def table_html(df: pd.DataFrame, *, formats: dict | None = None, cls: str = "data", max_rows: int = 200) -> str:
    """A DataFrame as an HTML table: numbers right-aligned, floats with 3 significant digits."""
    formats = formats or {}
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    rows = []
    for r in df.head(max_rows).itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, r):
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            text = fmt(v, formats.get(c, "{:.3g}")) if num else esc(v)
            cells.append(f'<td class="num">{text}</td>' if num else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="note">{len(df) - max_rows} more rows in the table file.</p>' if len(df) > max_rows else ""
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}' \
           f"</tbody></table></div>{more}"


def kv_table(items: list[tuple[str, str, str]], numbers: bool = True) -> str:
    cls = "num" if numbers else "v"
    rows = "".join(f'<tr><th>{esc(k)}</th><td class="{cls}">{v}</td><td class="note">{esc(n)}</td></tr>'
                   for k, v, n in items)
    return f'<table class="kv">{rows}</table>'


def section(sid: str, title: str, body: str, intro: str = "") -> dict:
    return {"id": sid, "title": title, "html": f'<section id="{sid}"><h2>{esc(title)}</h2>'
            + (f'<p class="intro">{intro}</p>' if intro else "") + body + "</section>"}


# --------------------------------------------------------------------------------------------- sections


def _model_line(cfg: dict, state: dict | None) -> tuple[str, str, str]:
    model = (cfg.get("model") or {}).get("name") or "?"
    layer = (cfg.get("extract") or {}).get("layer")
    sae = cfg.get("sae") or {}
    arch = sae.get("arch", "")
    return model, "" if layer is None else str(layer), arch


def _metric_label(key: str, metrics: dict) -> tuple[str, str, str]:
    label, spec, note = METRIC_LABELS.get(key, (key, "{:.4g}", ""))
    if metrics.get("holdout") and key in ("fvu", "mse", "l0", "dead_fraction"):  # evaluated on held-out cells
        label = f"{label}, held-out cells"
    return label, spec, note


def overview(run: RunDir, cfg: dict, metrics: dict | None, summary: dict | None, extras: dict) -> str:
    tiles = []

    def tile(label, value, note=""):
        tiles.append(f'<div class="tile"><div class="tv">{value}</div><div class="tl">{esc(label)}</div>'
                     + (f'<div class="tn">{esc(note)}</div>' if note else "") + "</div>")

    if metrics:
        n_feat = metrics.get("n_features") or extras.get("n_features")
        if n_feat:
            tile("SAE features", fmt(int(n_feat)))
        fvu = "fvu_heldout" if "fvu_heldout" in metrics else "fvu"
        for key in (fvu, "l0", "dead_fraction"):
            if key in metrics:
                label, spec, _ = _metric_label(key, metrics)
                tile(label, fmt(metrics[key], spec))
    if summary:
        for basis in ("sae", "raw", "ica"):
            v = summary.get(f"share_enriched_{basis}")
            if v is not None and _finite(v):
                tile(f"{'raw neurons' if basis == 'raw' else basis.upper()} with a GO term", f"{100 * v:.0f}%")
        p = summary.get("mannwhitney_max_ic_p")
        if p is not None and _finite(p):
            tile("Mann-Whitney p, max IC", f"{p:.2g}", "SAE vs raw neurons")
    for label, value, note in extras.get("tiles", []):
        tile(label, value, note)
    return f'<div class="tiles">{"".join(tiles)}</div>' if tiles else ""


def run_section(run: RunDir, cfg: dict, state: dict | None, log: list[dict]) -> dict | None:
    parts = []
    timings = _timings(state, log)
    if timings:
        total = sum(s for _, s, _ in timings) or 1.0
        rows = "".join(
            f'<tr><th>{esc(name)}</th><td class="num">{_seconds(s)}</td><td class="barcell"><div class="bar" '
            f'style="width:{max(100 * s / total, 0.5):.1f}%"></div></td><td class="note">{esc(info)}</td></tr>'
            for name, s, info in timings)
        parts.append(f'<h3>Stage timings</h3><table class="kv timings">{rows}<tr class="total"><th>total</th>'
                     f'<td class="num">{_seconds(total)}</td><td></td><td></td></tr></table>')
    env = run.json("environment.json")
    if env:
        items = [(k, esc(v), "") for k, v in env.items() if not isinstance(v, dict)]
        pk = env.get("packages") or {}
        if pk:
            items.append(("packages", ", ".join(f"{esc(k)} {esc(v)}" for k, v in pk.items()), ""))
        parts.append("<h3>Environment</h3>" + kv_table(items, numbers=False))
    toml = run.text("config.resolved.toml")
    if toml:
        parts.append(f'<h3>Config</h3><details><summary>config.resolved.toml ({len(toml.splitlines())} lines)'
                     f"</summary><pre>{esc(toml)}</pre></details>")
    if not parts:
        return None
    return section("run", "Run", '<div class="cols">' + "".join(f"<div>{p}</div>" for p in parts[:2]) + "</div>"
                   + "".join(parts[2:]))


def _timings(state: dict | None, log: list[dict]) -> list[tuple[str, float, str]]:
    done = (state or {}).get("done") or {}
    out = []
    for name, info in done.items():
        if isinstance(info, dict) and "seconds" in info:
            extra = ", ".join(f"{k} {fmt(v, '{:.4g}')}" for k, v in info.items()
                              if k != "seconds" and isinstance(v, (int, float, str)))
            out.append((name, float(info["seconds"]), extra[:120]))
    if not out:  # an old folder without state.json: the last stage_done of each stage in the log
        last = {}
        for e in log:
            if e.get("event") == "stage_done" and "seconds" in e:
                last[e.get("stage", "?")] = float(e["seconds"])
        out = [(k, v, "") for k, v in last.items()]
    return out


def training_section(run: RunDir, cfg: dict, log: list[dict]) -> dict | None:
    steps = [e for e in log if e.get("event") == "train_step"]
    if not steps:
        text = run.text("sae/metrics.jsonl")
        steps = [json.loads(s) for s in (text or "").splitlines() if s.strip()]
    if not steps:
        return None
    df = pd.DataFrame(steps)
    if "step" not in df:
        return None
    df = df.drop_duplicates("step", keep="last").sort_values("step")
    if "tokens" not in df:
        bs = (cfg.get("sae") or {}).get("batch_size")
        df["tokens"] = df["step"] * bs if bs else df["step"]
        xlabel_note = "" if bs else " (steps: the config gives no batch size)"
    else:
        xlabel_note = ""
    last = df.iloc[-1]
    note = (f"{len(df)} logged steps, last at step {int(last['step']):,}"
            + (f", {float(last['tokens_per_s']):,.0f} tokens/s" if "tokens_per_s" in df else "") + xlabel_note)
    return section("training", "Training", img(figs.data_uri(figs.training_curves(df)), "training curves"),
                   intro=esc(note) + ". Metrics of each logged training batch (FVU here is per batch; SAE "
                   "metrics above are over the whole evaluation set).")


def metrics_section(metrics: dict | None, state: dict | None) -> dict | None:
    if not metrics:
        return None
    items = []
    keys = [k for k in METRIC_LABELS if k in metrics] + [k for k in metrics if k not in METRIC_LABELS]
    for k in keys:
        v = metrics[k]
        if isinstance(v, (dict, list)):
            continue
        label, spec, note = _metric_label(k, metrics)
        items.append((label, fmt(v, spec) if isinstance(v, (int, float)) else esc(v), note))
    where = "the held-out cells' tokens" if metrics.get("holdout") else "its evaluation tokens"
    return section("metrics", "SAE metrics", kv_table(items), intro="From tables/sae_metrics.json: the SAE "
                   f"evaluated over {where} after training.")


def interpretation_section(run: RunDir, feats: pd.DataFrame | None, enr: pd.DataFrame | None,
                           summary: dict | None) -> dict | None:
    bases = run.table("bases")
    if feats is None and bases is None:
        return None
    parts = []
    if bases is not None:
        show = bases.copy()
        if "share_enriched" in show:
            show["share_enriched"] = show["share_enriched"].map(lambda v: f"{100 * v:.1f}%")
        parts.append(table_html(show, formats={"median_max_ic": "{:.2f}"}))
    figs_html = []
    if feats is not None and "pr" in feats:
        figs_html.append(img(figs.data_uri(figs.pr_histogram(feats["pr"].to_numpy(float))), "Fig. 1a"))
    ic = _max_ic_by_basis(feats, enr)
    if ic:
        test = ""
        if summary and _finite(summary.get("mannwhitney_max_ic_p")):
            test = (f"Mann-Whitney U (SAE vs raw) = {summary['mannwhitney_max_ic_u']:.0f}, "
                    f"p = {summary['mannwhitney_max_ic_p']:.2g}")
        figs_html.append(img(figs.data_uri(figs.max_ic_boxes(ic, test)), "Fig. 1b"))
    if figs_html:
        parts.append('<div class="figrow">' + "".join(figs_html) + "</div>")
    if summary and _finite(summary.get("mannwhitney_max_ic_p")):
        parts.append(f'<p class="caption">Fig. 1b: two-sided Mann-Whitney U test of max IC, SAE features vs raw '
                     f"neurons (features with a significant term): U = {summary['mannwhitney_max_ic_u']:.0f}, "
                     f"p = {summary['mannwhitney_max_ic_p']:.2g}.</p>")
    head = ""
    if summary:
        head = (f"{fmt(summary.get('n_features'))} SAE features over {fmt(summary.get('n_cells'))} cells "
                f"({fmt(summary.get('n_tokens'))} gene tokens), background {fmt(summary.get('n_background_genes'))}"
                f" genes (filter {esc(summary.get('gene_filter'))}), gene sets {esc(summary.get('gene_sets'))}, "
                f"top-gene rule {esc(summary.get('top_rule'))}. ")
    intro = head + ("Each basis (SAE features, raw residual neurons, ICA components) goes through the identical "
                    "pipeline: participation ratio, top genes, over-representation against GO, "
                    "Benjamini-Hochberg. Fig. 1 as in Yanovsky &amp; Chernomoretz.")
    return section("interpretation", "Interpretation", "".join(parts), intro=intro)


def _max_ic_by_basis(feats, enr) -> dict[str, np.ndarray]:
    out = {}
    if enr is not None and {"ic", "feature"} <= set(enr.columns) and len(enr):
        basis = enr["basis"] if "basis" in enr else pd.Series("sae", index=enr.index)
        for b in ("sae", "raw", "ica"):
            sub = enr[basis == b]
            if len(sub):
                v = sub.groupby("feature")["ic"].max().to_numpy(float)
                out[b] = v[np.isfinite(v)]
    elif feats is not None and "max_ic" in feats:
        out["sae"] = feats["max_ic"].dropna().to_numpy(float)
    return {k: v for k, v in out.items() if v.size}


# -------------------------------------------------------------------------------------- feature browser


def label_keys(obs: pd.DataFrame, summary: dict | None, assoc: pd.DataFrame | None) -> list[str]:
    keys = list((summary or {}).get("label_keys") or [])
    if not keys and assoc is not None and "key" in assoc:
        keys = list(dict.fromkeys(assoc["key"].astype(str)))
    return [k for k in keys if k in obs.columns]


def cell_type_key(keys: list[str]) -> str | None:
    for k in keys:
        if not any(h in k.lower() for h in BATCH_HINTS):
            return k
    return keys[0] if keys else None


def association_scores(cell_max: np.ndarray, obs: pd.DataFrame, keys: list[str], chunk: int = 2048):
    """AMI of every feature against every value of each key (sae_fast.interpret.cells, in feature chunks)."""
    from sae_fast.interpret.cells import association_scores as scores
    from sae_fast.interpret.cells import normalise_by_max

    out = {}
    for key in keys:
        labels = obs[key].astype(str).to_numpy()
        parts, classes = [], None
        for s in range(0, cell_max.shape[1], chunk):
            r = scores(normalise_by_max(cell_max[:, s:s + chunk]), labels)
            classes = r.classes
            parts.append(r.ami)
        out[key] = (classes, np.concatenate(parts, 1))  # [C, F]
    return out


def violin_data(cell_max: np.ndarray, labels: np.ndarray, chunk: int = 2048) -> tuple[list[str], list, list]:
    """Per feature and label value: the share of cells where it fires, and a histogram (N_BINS bins over
    [0, the feature's max]) of its per-cell max activation over those cells, scaled to 0..99; None for a feature
    that never fires. Features go in chunks, so memory stays at a few [cells, chunk] arrays."""
    lab = np.asarray(labels).astype(str)
    classes = sorted(pd.unique(lab))
    masks = [lab == c for c in classes]
    per_feature = []
    for s in range(0, cell_max.shape[1], chunk):
        X = np.asarray(cell_max[:, s:s + chunk], np.float64)
        F = X.shape[1]
        fmax = X.max(0)
        x = X / np.where(fmax > 0, fmax, 1.0)
        flat = np.arange(F)[None, :] * N_BINS + np.minimum((x * N_BINS).astype(np.int64), N_BINS - 1)
        hists, fracs = [], []
        for rows in masks:
            on = x[rows] > 0
            h = np.bincount(flat[rows][on], minlength=F * N_BINS).reshape(F, N_BINS).astype(float)
            peak = h.max(1, keepdims=True)
            hists.append(np.round(99 * h / np.where(peak > 0, peak, 1.0)).astype(int))
            fracs.append(on.sum(0) / max(int(rows.sum()), 1))
        per_feature += [None if fmax[f] <= 0 else
                        [[round(float(fracs[j][f]), 3), hists[j][f].tolist()] for j in range(len(classes))]
                        for f in range(F)]
    return classes, [int(m.sum()) for m in masks], per_feature


def browser_section(feats: pd.DataFrame | None, enr: pd.DataFrame | None, top_acts: pd.DataFrame | None,
                    adata, keys: list[str], ami: dict) -> dict | None:
    if feats is None or "feature" not in feats:
        return None
    feats = feats.reset_index(drop=True)
    n = len(feats)
    sae_enr = None
    if enr is not None and "feature" in enr:
        sae_enr = enr[enr["basis"] == "sae"] if "basis" in enr else enr
        sae_enr = sae_enr.sort_values("q_value" if "q_value" in sae_enr else "feature", kind="stable")
    terms = {int(f): g.head(N_TERMS) for f, g in sae_enr.groupby("feature", sort=False)} if sae_enr is not None \
        else {}
    acts = {}
    if top_acts is not None and {"feature", "gene", "activation"} <= set(top_acts.columns):
        for f, g in top_acts.groupby("feature", sort=False):
            g = g.sort_values("activation", ascending=False, kind="stable").head(N_GENES)
            acts[int(f)] = (list(map(str, g["gene"])), [_num(a) or 0.0 for a in g["activation"]])
    fam_cols = [c for c in feats.columns if c.startswith("family_")]
    ct_key = cell_type_key(keys)
    violins, classes, counts = None, [], []
    if adata is not None and ct_key is not None and "X_sae_max" in adata.obsm:
        classes, counts, violins = violin_data(np.asarray(adata.obsm["X_sae_max"], np.float32),
                                              adata.obs[ct_key].to_numpy())
    best = {}  # key -> (label per feature, ami per feature)
    for key, (cls, A) in ami.items():
        if A.shape[1] == n:
            j = A.argmax(0)
            best[key] = ([cls[i] for i in j], A[j, np.arange(n)])
    shown_keys = [k for k in keys if k in best][:3]

    data, rows = {}, []
    for r in feats.itertuples(index=False):
        f = int(r.feature)
        genes = [g for g in str(getattr(r, "top_genes", "") or "").split(";") if g and g != "nan"][:N_GENES]
        if f in acts:
            genes, a = acts[f]
        else:
            a = None
        t = terms.get(f)
        d = {"g": genes, "a": a, "pr": _num(getattr(r, "pr", None)), "nt": _num(getattr(r, "n_top", None)),
             "ns": _num(getattr(r, "n_sig", None)), "rho": _num(getattr(r, "expr_spearman", None)),
             "mk": _str(getattr(r, "best_marker", None)), "cp": _num(getattr(r, "component", None)),
             "t": [] if t is None else [[_str(x.get("term")), _str(x.get("name")), _num(x.get("q_value")),
                                         f"{_str(x.get('overlap'))}/{_str(x.get('query_size'))}",
                                         _num(x.get("ic"))] for x in t.to_dict("records")],
             "fam": [[c[len("family_"):], round(float(getattr(r, c)), 3)] for c in fam_cols
                     if _finite(getattr(r, c)) and float(getattr(r, c)) > 0],
             "ami": [[k, best[k][0][f], _num(round(float(best[k][1][f]), 3))] for k in shown_keys if f < n]}
        if violins is not None and f < len(violins):
            d["v"] = violins[f]
        data[f] = d
        pr = _num(getattr(r, "pr", None))
        q, ic = _num(getattr(r, "best_q", None)), _num(getattr(r, "max_ic", None))
        name = _str(getattr(r, "best_name", None)) or ""
        term = _str(getattr(r, "best_term", None)) or ""
        cells = [f'<td class="num">{f}</td>', f'<td class="num" data-v="{pr if pr is not None else -1}">'
                 f'{fmt(pr, "{:.1f}")}</td>',
                 f'<td class="genes" title="{esc(", ".join(genes))}">{esc(", ".join(genes[:8]))}</td>',
                 f'<td class="term" title="{esc(term)}">{esc(name)}</td>',
                 f'<td class="num" data-v="{q if q is not None else 2}">{fmt(q, "{:.2g}")}</td>',
                 f'<td class="num" data-v="{ic if ic is not None else -1}">{fmt(ic, "{:.2f}")}</td>']
        for k in shown_keys:
            v = round(float(best[k][1][f]), 2) + 0.0
            cells.append(f'<td class="ami" data-v="{v:.2f}" title="{esc(best[k][0][f])}">{v:.2f} <span '
                         f'class="lab">{esc(best[k][0][f])}</span></td>')
        search = " ".join(genes + [term, name])
        rows.append(f'<tr data-f="{f}" data-s="{esc(search.lower())}">{"".join(cells)}</tr>')
    heads = ["feature", "PR", "top genes", "best GO term", "q", "max IC"] + [f"AMI {k}" for k in shown_keys]
    head = "".join(f'<th title="click to sort">{esc(h)}</th>' for h in heads)
    violin_note = (f"per {esc(ct_key)}" if violins is not None else "")
    body = (f'<div class="browser"><div class="bleft"><input id="q" type="search" placeholder="search genes, GO '
            f'terms or a feature number ({n} features)" autocomplete="off"><div class="tablebox"><table id="ft" '
            f'class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div></div>'
            f'<div class="bright"><div id="panel" class="panel"><p class="note">Click a feature in the table to '
            f"see its top genes, GO terms, activation {violin_note} and gene-family shares.</p></div></div></div>")
    payload = {"features": data, "classes": classes, "counts": counts, "ctKey": ct_key, "bins": N_BINS}
    script = ('<script type="application/json" id="feature-data">'
              + json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/") + "</script>")
    intro = ("Every SAE feature. Type to filter (genes, GO term names, a feature number); click a column header "
             "to sort; click a row for the feature's page. AMI: the best adjusted mutual information of the "
             "feature (on / off per cell, best threshold) with one value of the label, as in Pedrocchi et al.")
    return section("features", "Feature browser", body + script, intro=intro)


# ------------------------------------------------------------------------------- overlap, association


def overlap_section(run: RunDir, feats: pd.DataFrame | None, cfg: dict) -> dict | None:
    comps = run.table("components")
    if comps is None or not len(comps) or "features" not in comps:
        return None
    from sae_fast.interpret.overlap import overlap_coefficients

    threshold = float((cfg.get("interpret") or {}).get("overlap_threshold", 0.2))
    top = {}
    if feats is not None and "top_genes" in feats:
        top = {int(f): [g for g in str(t).split(";") if g] for f, t in zip(feats["feature"], feats["top_genes"])}
    drawn = []
    for r in comps.itertuples(index=False):
        members = [int(x) for x in str(r.features).split(";") if x.strip().lstrip("-").isdigit()]
        coef = overlap_coefficients([top.get(f, []) for f in members]).tocoo()
        edges = [(members[i], members[j]) for i, j, v in zip(coef.row, coef.col, coef.data) if i < j and
                 v > threshold]
        drawn.append((members, edges, str(getattr(r, "shared_terms", "") or "")))
    terms = {}
    if feats is not None and "best_name" in feats:
        terms = {int(f): _str(t) for f, t in zip(feats["feature"], feats["best_name"]) if _str(t)}
    fig = img(figs.data_uri(figs.overlap_components(drawn, terms)), "overlap graph components")
    show = comps.copy()
    if "features" in show:
        show["features"] = show["features"].astype(str).map(lambda s: s if len(s) < 80 else s[:77] + "...")
    intro = (f"Features joined where their top-gene sets overlap (coefficient > {threshold:g}); the "
             f"{min(8, len(comps))} largest of {len(comps)} components with two or more features, each with the "
             "GO terms its features share; large components coloured by their features' best GO term. "
             "Edges drawn from the top genes stored per feature (up to 20).")
    return section("overlap", "Overlap graph", fig + table_html(show, max_rows=30), intro=intro)


def association_section(assoc: pd.DataFrame | None, ami: dict, keys: list[str]) -> dict | None:
    if assoc is None or not len(assoc) or not {"key", "label", "feature"} <= set(assoc.columns):
        return None
    top = assoc[assoc["rank"] <= 2] if "rank" in assoc else assoc
    cols = list(dict.fromkeys(int(f) for f in top["feature"]))[:48]
    rows, matrix = [], []
    for (key, label), _ in assoc.groupby(["key", "label"], sort=False):
        rows.append(f"{key}: {label}")
        if key in ami:
            cls, A = ami[key]
            matrix.append(A[list(cls).index(str(label)), cols] if str(label) in cls else np.full(len(cols), np.nan))
        else:  # only the top features per label are in the table
            sub = assoc[(assoc["key"] == key) & (assoc["label"] == label)].set_index("feature")
            matrix.append(np.array([float(sub["ami"].get(f, np.nan)) if "ami" in sub else np.nan for f in cols]))
    fig = img(figs.data_uri(figs.association_heatmap(np.vstack(matrix), rows, [str(c) for c in cols])),
              "cell-level association heatmap")
    best = assoc[assoc["rank"] == 1] if "rank" in assoc else assoc
    keep = [c for c in ("key", "label", "feature", "ami", "ami_threshold", "f1", "f1_threshold", "n_cells")
            if c in best]
    intro = ("AMI between each label value (one vs rest) and each feature's per-cell activation (divided by its "
             "max, best threshold): the two best features of every label, as columns"
             + ("" if ami else "; grey: not among a label's top features in tables/cell_association") + ".")
    return section("association", "Cell-level association", f'<div class="figrow"><div>{fig}</div><div><h3>Best '
                   f"feature per label</h3>{table_html(best[keep].reset_index(drop=True))}</div></div>", intro=intro)


# ------------------------------------------------------------------------------------ steering, debatch


def steering_section(run: RunDir) -> dict | None:
    parts = []
    sweep = run.table("alpha_sweep")
    if sweep is not None and len(sweep) and {"feature", "alpha"} <= set(sweep.columns):
        fig = img(figs.data_uri(figs.alpha_sweep(sweep)), "alpha sweep") if {"n_up", "n_down"} & set(
            sweep.columns) else ""
        parts.append("<h3>Alpha sweep</h3><p class='intro'>Feature scaled by alpha inside the forward pass: "
                     "significant DEGs of the steered predictions (paired t-test, Bonferroni) and the top GO terms "
                     "of each side (Table 1 of Yanovsky &amp; Chernomoretz).</p>" + fig + table_html(sweep))
        flipped = run.table("alpha_sweep_flipped")
        if flipped is not None and len(flipped):
            parts.append(f"<h3>Terms that flip sides ({len(flipped)})</h3><p class='intro'>Enriched among the "
                         "genes up at one alpha and among the genes down at an alpha of the other sign.</p>"
                         + table_html(flipped, max_rows=60))
    cells = run.table("contrast_cells")
    gap = run.table("contrast_gap")
    alphas = run.table("contrast_alphas")
    row = []
    if cells is not None and len(cells) and {"dist_pre", "dist_post"} <= set(cells.columns):
        row.append(img(figs.data_uri(figs.closer_scatter(cells)), "closer fraction"))
    if alphas is not None and len(alphas) and "alpha" in alphas:
        row.append(img(figs.data_uri(figs.contrast_alphas(alphas)), "learned alphas"))
    g_ok = gap is not None and len(gap) and "gap" in gap and ({"direction"} <= set(gap.columns)
                                                            or {"src", "tgt"} <= set(gap.columns))
    if g_ok:
        row.append(img(figs.data_uri(figs.gap_distributions(gap)), "gap fractions"))
        if {"effect", "effect_size"} & set(gap.columns) or {"src", "tgt"} <= set(gap.columns):
            row.append(img(figs.data_uri(figs.gap_cumulative(gap)), "cumulative share by effect size"))
    history = run.table("contrast_history")
    if history is not None and len(history) and {"epoch", "loss"} <= set(history.columns):
        row.append(img(figs.data_uri(figs.contrast_history(history)), "contrastive loss"))
    if row:
        text = []
        if cells is not None and {"dist_pre", "dist_post"} <= set(cells.columns):
            closer = cells["dist_post"] < cells["dist_pre"]
            text.append(f"closer fraction {100 * closer.mean():.1f}% of {len(cells)} source cells")
            if "heldout" in cells and cells["heldout"].astype(bool).any():
                h = cells["heldout"].astype(bool)
                text.append(f"{100 * closer[h].mean():.1f}% of the {int(h.sum())} held-out cells")
        if g_ok:
            moved = [f"{100 * figs.correct(sub).mean():.1f}% of {len(sub)} genes {name}"
                     for name, sub in figs.directions(gap)]
            text.append("moved toward the target: " + ", ".join(moved))
        parts.append("<h3>Contrastive steering</h3><p class='intro'>Alphas learned so that source cells' embeddings "
                     "move toward the target's mean" + (": " + esc("; ".join(text)) if text else "") + ". Gap "
                     "fraction per gene (s - src) / (tgt - src): 0 = unmoved, 1 = at the target; correct = moved "
                     "toward the target.</p>" + _steer_facts(run.json("tables/steer_summary.json"))
                     + '<div class="figrow">' + "".join(row) + "</div>")
        if alphas is not None and "alpha" in alphas:
            far = alphas[(alphas["alpha"] - 1).abs() > 0.3]
            if len(far):
                parts.append("<h3>Features with |alpha - 1| &gt; 0.3</h3>" + table_html(
                    far.sort_values("alpha", key=lambda a: -(a - 1).abs(), kind="stable").reset_index(drop=True)))
    if not parts:
        return None
    return section("steering", "Steering", "".join(parts))


STEER_FACTS = {  # steer_summary.json keys -> label, format; [Y]'s numbers are AIDO.Cell-100M, CD4 T -> CD8 T
    "closer_fraction": ("closer fraction, all source cells", "{:.1%}", "[Y]: 81%"),
    "closer_fraction_heldout": ("closer fraction, held-out cells", "{:.1%}", "not in [Y]"),
    "control_closer_fraction": ("control (random features), all cells", "{:.1%}", ""),
    "control_closer_fraction_heldout": ("control (random features), held-out", "{:.1%}", ""),
    "gap_share_correct_up": ("genes up in target moved correctly", "{:.1%}", "[Y]: 70%"),
    "gap_share_correct_down": ("genes down in target moved correctly", "{:.1%}", "[Y]: 65%"),
    "gap_binom_p_up": ("binomial p (one-sided, vs 0.5), up", "{:.2g}", ""),
    "gap_binom_p_down": ("binomial p (one-sided, vs 0.5), down", "{:.2g}", ""),
    "gap_median_gap": ("median gap fraction", "{:.3f}", ""),
    "n_changed": ("features with |alpha - 1| > 0.3", "{:,.0f}", ""),
}


def _steer_facts(facts: dict | None) -> str:
    """The headline numbers of contrastive steering (tables/steer_summary.json), beside [Y]'s."""
    items = [(label, fmt(facts[k], spec), ref) for k, (label, spec, ref) in STEER_FACTS.items()
             if facts and _finite(facts.get(k))]
    if not items:
        return ""
    where = f" ({esc(facts.get('source'))} &rarr; {esc(facts.get('target'))})" if facts.get("source") else ""
    return f"<p class='note'>Headline numbers{where}; [Y]'s are AIDO.Cell-100M's.</p>" + kv_table(items)


def debatch_section(run: RunDir) -> dict | None:
    df = run.table("debatch")
    umaps = sorted({*run.path.glob("figures/umap_*.png"), *run.path.glob("debatch/**/umap*.png")})
    if (df is None or not len(df)) and not umaps:
        return None
    parts = []
    if df is not None and len(df):
        if {"batch", "bio"} & set(df.columns) and "n" in df:
            parts.append(img(figs.data_uri(figs.debatch_curves(df)), "scIB scores against clamped features"))
        parts.append(table_html(df, max_rows=120))
    text = run.text("tables/debatch_summary.txt")
    if text:
        parts.append(f"<details><summary>debatch_summary.txt</summary><pre>{esc(text.rstrip())}</pre></details>")
    if umaps:
        cap = lambda p: p.stem.replace("umap_", "").replace("_", " ")
        first = {"unintegrated": 0, "unsteered": 1}
        umaps = sorted(umaps, key=lambda p: (first.get(cap(p), 2), p.name))
        parts.append('<h3>UMAPs</h3><div class="figrow">' + "".join(
            f'<figure class="umapfig">{img(figs.file_uri(p), "UMAP " + cap(p), "umap")}<figcaption>{esc(cap(p))}'
            "</figcaption></figure>" for p in umaps) + "</div>")
    intro = ("Batch features (ranked by AMI with the batch label) clamped to c inside the forward pass, the "
             "embedding re-scored with scib-metrics (total = 0.6 bio + 0.4 batch), against random feature sets "
             "of the same size, the unsteered and the unintegrated embedding (Pedrocchi et al.).")
    return section("debatch", "Batch removal", "".join(parts), intro=intro)


def other_figures_section(run: RunDir, used: set[Path]) -> dict | None:
    pngs = [p for p in sorted(run.path.glob("figures/*.png")) if p not in used]
    if not pngs:
        return None
    return section("figures", "Other figures", '<div class="figrow">' + "".join(
        f'<figure>{img(figs.file_uri(p), p.stem)}<figcaption>{esc(p.name)}</figcaption></figure>' for p in pngs)
        + "</div>")


# ---------------------------------------------------------------------------------------------- the page


def render(run_dir) -> str:
    """The whole report of the run folder `run_dir` as one HTML string."""
    from sae_fast import __version__

    run = RunDir(run_dir)
    cfg = run.config()
    state = run.json("state.json")
    log = run.log()
    metrics = run.json("tables/sae_metrics.json")
    summary = run.json("summary.json") or run.json("tables/summary.json")
    feats, enr, assoc = run.table("features"), run.table("enrichment"), run.table("cell_association")
    adata = run.annotated()
    keys, ami = [], {}
    if adata is not None:
        keys = label_keys(adata.obs, summary, assoc)
        if "X_sae_max" in adata.obsm and keys:
            ami = association_scores(np.asarray(adata.obsm["X_sae_max"], np.float32), adata.obs, keys)
    extras = {"n_features": ((state or {}).get("done") or {}).get("train", {}).get("n_features"), "tiles": []}
    cells = run.table("contrast_cells")
    if cells is not None and {"dist_pre", "dist_post"} <= set(cells.columns) and len(cells) and all(
            pd.api.types.is_numeric_dtype(cells[c]) for c in ("dist_pre", "dist_post")):
        extras["tiles"].append(("closer fraction", f"{100 * (cells['dist_post'] < cells['dist_pre']).mean():.0f}%",
                                "contrastive steering"))
    umaps = {*run.path.glob("figures/umap_*.png")}
    builders = [
        ("metrics", "SAE metrics", lambda: metrics_section(metrics, state)),
        ("training", "Training", lambda: training_section(run, cfg, log)),
        ("interpretation", "Interpretation", lambda: interpretation_section(run, feats, enr, summary)),
        ("features", "Feature browser", lambda: browser_section(feats, enr, run.table("top_genes"), adata, keys,
                                                                ami)),
        ("overlap", "Overlap graph", lambda: overlap_section(run, feats, cfg)),
        ("association", "Cell-level association", lambda: association_section(assoc, ami, keys)),
        ("steering", "Steering", lambda: steering_section(run)),
        ("debatch", "Batch removal", lambda: debatch_section(run)),
        ("figures", "Other figures", lambda: other_figures_section(run, umaps)),
        ("run", "Run", lambda: run_section(run, cfg, state, log)),
    ]
    sections = [s for s in (_guarded(*b) for b in builders) if s is not None]
    text = run.text("summary.txt")
    if text:
        sections.append(section("summary", "Printed summary", f"<pre>{esc(text.rstrip())}</pre>",
                                intro="summary.txt, as the run printed it."))
    model, layer, arch = _model_line(cfg, state)
    title = f"sae-fast report: {Path(run_dir).resolve().name}"
    sub = " · ".join(x for x in (f"model {esc(model)}" if model != "?" else "", f"layer {esc(layer)}" if layer
                                 else "", f"{esc(arch)} SAE" if arch else "") if x)
    banner = ""
    if model == "mini":
        banner = ('<p class="banner">These numbers come from the embedded demo model <code>mini</code> (a small '
                  "AIDO.Cell-architecture model pretrained on the bundled cells), not from AIDO.Cell-100M.</p>")
    nav = "".join(f'<a href="#{s["id"]}">{esc(s["title"])}</a>' for s in sections)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(s["html"] for s in sections)
    if not sections:
        body = '<section><p class="note">This folder has none of the files a report shows yet.</p></section>'
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{esc(title)}</title><style>{CSS}</style></head>'
            f'<body><header><div class="wrap"><h1>{esc(title)}</h1><p class="sub">{sub}</p>{banner}'
            f'{overview(run, cfg, metrics, summary, extras)}</div></header><nav><div class="wrap">{nav}</div></nav>'
            f'<main class="wrap">{body}</main><footer class="wrap">Made by sae-fast {esc(__version__)} on {when} '
            f"from {esc(Path(run_dir).resolve())}. Self-contained: no file or network access needed to view it."
            f"</footer><script>{JS}</script></body></html>")


def _guarded(sid: str, title: str, build) -> dict | None:
    """One section; if its files hold something it cannot draw, the page says so in that section (and on
    stderr) instead of failing as a whole: the report is the last stage of a run and reads any folder."""
    try:
        return build()
    except UserError:
        raise
    except Exception as e:  # shown on the page and on stderr, never silent
        import sys

        msg = f"{e.__class__.__name__}: {e}"
        print(f"sae-fast report: section {title!r} left out: {msg}", file=sys.stderr)
        return section(sid, title, f'<p class="error">This section could not be drawn from the folder\'s files: '
                       f"{esc(msg)}</p>")


def write(run_dir, out=None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report.html), atomically; return its path."""
    from sae_fast.utils import atomic_path

    out = Path(out) if out else Path(run_dir) / "report.html"
    page = render(run_dir)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------- bits


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _num(x):
    if not _finite(x):
        return None
    x = float(x)
    return int(x) if x.is_integer() and abs(x) < 2 ** 53 else float(f"{x:.4g}")


def _str(x):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    s = str(x)
    return None if s in ("", "nan", "None") else s


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


CSS = """
:root{--ink:#1d2733;--mute:#5b6b7c;--line:#dde3ea;--bg:#f4f6f9;--card:#fff;--acc:#2f6db5;--acc2:#e8f0fa}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--ink);
background:var(--bg)}
.wrap{max-width:1240px;margin:0 auto;padding:0 20px}
header{background:#17324f;color:#fff;padding:18px 0 0}
header h1{margin:0;font-size:22px;font-weight:600}
header .sub{margin:2px 0 10px;color:#bcd0e6}
.error{background:#fdecea;color:#8a1f11;border-radius:6px;padding:8px 12px}
.banner{background:#fff6d9;color:#5c4500;border-radius:6px;padding:7px 12px;margin:6px 0 12px;font-size:13px}
.tiles{display:flex;flex-wrap:wrap;gap:10px;padding-bottom:14px}
.tile{background:rgba(255,255,255,.09);border-radius:8px;padding:8px 14px;min-width:118px}
.tv{font-size:20px;font-weight:600}.tl{font-size:12px;color:#cfe0f2}.tn{font-size:11px;color:#9fb8d2}
nav{position:sticky;top:0;z-index:5;background:#17324f;padding:0 0 10px;box-shadow:0 2px 4px rgba(0,0,0,.12)}
nav .wrap{display:flex;flex-wrap:wrap;gap:4px}
nav a{color:#dfeaf6;text-decoration:none;font-size:13px;padding:3px 10px;border-radius:12px;
background:rgba(255,255,255,.08)}
nav a:hover{background:rgba(255,255,255,.2)}
section{scroll-margin-top:48px;background:var(--card);border:1px solid var(--line);border-radius:10px;
padding:16px 20px;margin:16px 0}
h2{margin:0 0 8px;font-size:18px}h3{font-size:14px;margin:16px 0 6px}
.intro{color:var(--mute);margin:0 0 12px;max-width:980px}.note{color:var(--mute);font-size:12px}
img.fig{max-width:100%;height:auto;display:block;margin:6px 0}
img.umap{width:100%;height:auto}figure.umapfig{flex:1 1 560px;max-width:100%}
.figrow{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.figrow img{max-width:100%}
figure{margin:0}figcaption{color:var(--mute);font-size:12px;text-align:center}
.caption{font-size:13px;margin:4px 0 0}
.cols{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:24px}
@media(max-width:900px){.cols,.browser{grid-template-columns:1fr!important}}
table{border-collapse:collapse;font-size:13px}
table.data th,table.data td{padding:4px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
table.data thead th{background:#eef2f6;position:sticky;top:0;z-index:1;white-space:nowrap}
table.kv th{text-align:left;font-weight:500;padding:3px 12px 3px 0;white-space:nowrap;vertical-align:top}
table.kv td{padding:3px 10px 3px 0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.scroll{overflow:auto;max-height:420px}
.barcell{width:180px}.bar{height:10px;background:var(--acc);border-radius:3px}
tr.total th,tr.total td{border-top:1px solid var(--line);font-weight:600}
pre{background:#f6f8fa;border:1px solid var(--line);border-radius:6px;padding:10px;overflow:auto;font-size:12px;
max-height:480px}
details summary{cursor:pointer;color:var(--acc)}
.browser{display:grid;grid-template-columns:minmax(0,1fr) 400px;gap:16px}
#q{width:100%;padding:7px 10px;border:1px solid #c5cfda;border-radius:6px;font-size:14px;margin-bottom:8px}
.tablebox{max-height:560px;overflow:auto;border:1px solid var(--line);border-radius:6px}
#ft{width:100%}#ft th{cursor:pointer}#ft tbody tr{cursor:pointer}#ft tbody tr:hover{background:var(--acc2)}
#ft tr.sel{background:#d5e5f7}#ft td{font-size:12.5px}#ft th,#ft td{padding:4px 6px}
#ft td.genes{color:#334;max-width:150px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
#ft td.term{max-width:170px}#ft td.ami{max-width:96px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.lab{color:var(--mute);font-size:11px}
.panel{position:sticky;top:10px;border:1px solid var(--line);border-radius:8px;padding:12px 14px;min-height:200px}
.panel h3{margin:0 0 4px;font-size:16px}.panel h4{margin:14px 0 4px;font-size:13px}
#violin{width:100%;height:auto}
.chips span{display:inline-block;background:var(--acc2);border-radius:10px;padding:1px 8px;margin:2px;font-size:12px}
.gbar{display:grid;grid-template-columns:80px 1fr 52px;gap:6px;align-items:center;font-size:12px}
.gbar div.b{height:9px;background:var(--acc);border-radius:2px}
.terms td,.terms th{font-size:12px;padding:2px 6px;border-bottom:1px solid var(--line);text-align:left}
.terms td+td{white-space:nowrap}
footer{color:var(--mute);font-size:12px;padding:10px 20px 30px}
"""

# the feature browser: filter, sort, and one feature's panel (genes, terms, violins, families)
JS = r"""
const D = JSON.parse((document.getElementById('feature-data') || {}).textContent || '{"features":{}}');
const E = s => String(s ?? '').replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
const ft = document.getElementById('ft'), q = document.getElementById('q'), panel = document.getElementById('panel');
const rows = () => ft.tBodies[0].rows;
if (q) q.oninput = () => {
  const s = q.value.trim().toLowerCase();
  for (const r of rows()) r.hidden = !!s && !(r.dataset.f === s || r.dataset.s.includes(s));
};
if (ft) ft.tHead.querySelectorAll('th').forEach((th, c) => th.onclick = () => {
  const dir = th.dataset.d = th.dataset.d === '1' ? '-1' : '1';
  const val = r => { const x = r.cells[c].dataset.v ?? r.cells[c].textContent;
                     return isNaN(parseFloat(x)) ? x : parseFloat(x); };
  const sorted = [...rows()].sort((a, b) => { const x = val(a), y = val(b);
                                              return (x < y ? -1 : x > y ? 1 : 0) * dir; });
  ft.tBodies[0].append(...sorted);
});
const bar = (name, w, text, color) => `<div class="gbar"><span>${E(name)}</span>
  <div class="b" style="width:${w.toFixed(1)}%;background:${color}"></div><span>${text}</span></div>`;
function violins(v) {  // one horizontal violin per cell type: histogram of the per-cell max, mirrored
  const w = 430, lw = 110, rh = 24, h = v.length * rh + 26, pw = w - lw - 52, B = D.bins;
  let s = `<svg id="violin" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" font-size="11"
    xmlns="http://www.w3.org/2000/svg">`;
  v.forEach(([frac, hist], j) => {
    const y = j * rh + rh / 2, m = Math.max(...hist) || 1, top = [], bottom = [];
    hist.forEach((c, k) => {
      const x = (lw + (k + .5) / B * pw).toFixed(1), d = c / m * rh * .45;
      top.push(`${x},${(y - d).toFixed(1)}`); bottom.unshift(`${x},${(y + d).toFixed(1)}`);
    });
    s += `<text x="${lw - 6}" y="${y + 4}" text-anchor="end">${E(D.classes[j])}</text>`;
    if (frac > 0) s += `<polygon points="${top.concat(bottom).join(' ')}" fill="#2f6db5" fill-opacity=".55"
      stroke="#2f6db5"/>`;
    s += `<text x="${w - 4}" y="${y + 4}" text-anchor="end" fill="#5b6b7c">${Math.round(frac * 100)}%</text>`;
  });
  return s + `<line x1="${lw}" x2="${lw + pw}" y1="${h - 22}" y2="${h - 22}" stroke="#999"/>
    <text x="${lw}" y="${h - 8}">0</text><text x="${lw + pw}" y="${h - 8}" text-anchor="end">max</text>
    <text x="${w - 4}" y="${h - 8}" text-anchor="end" fill="#5b6b7c">fires</text></svg>`;
}
function show(f) {
  const d = D.features[f];
  if (!d) return;
  const facts = [`PR ${d.pr == null ? '–' : d.pr.toFixed(1)}`, `${d.nt ?? '–'} top genes tested`,
                 `${d.ns ?? 0} significant term${d.ns === 1 ? '' : 's'}`];
  if (d.cp != null) facts.push(`overlap component ${d.cp}`);
  if (d.rho != null) facts.push(`expression Spearman ${d.rho.toFixed(2)}`);
  if (d.mk) facts.push(`marker set ${E(d.mk)}`);
  let h = `<h3>Feature ${f}</h3><p class="note">${facts.join(' · ')}</p><h4>Top genes</h4>`;
  if (d.a) { const m = Math.max(...d.a) || 1;
             h += d.g.map((g, i) => bar(g, 100 * d.a[i] / m, d.a[i].toPrecision(3), '#2f6db5')).join(''); }
  else h += '<div class="chips">' + d.g.map(g => `<span>${E(g)}</span>`).join('') + '</div>';
  h += '<h4>GO terms</h4>';
  h += d.t.length ? '<table class="terms"><tr><th>term</th><th>q</th><th>overlap</th><th>IC</th></tr>' +
    d.t.map(t => `<tr><td title="${E(t[0])}">${E(t[1] || t[0])}</td>
      <td>${t[2] == null ? '' : t[2].toExponential(1)}</td><td>${E(t[3])}</td>
      <td>${t[4] == null ? '' : t[4].toFixed(2)}</td></tr>`).join('') + '</table>'
    : '<p class="note">none significant</p>';
  if (d.ami.length) h += '<p class="note">' + d.ami.map(a => `best ${E(a[0])}: ${E(a[1])} (AMI ${a[2]})`)
    .join(' · ') + '</p>';
  if (d.v) h += `<h4>Activation per ${E(D.ctKey)}</h4><p class="note">max activation per cell, over the cells
    where it fires (each violin scaled to its own peak); right: the share of cells where it fires</p>` + violins(d.v);
  h += '<h4>Gene families</h4>' + (d.fam.length
    ? d.fam.map(([n, s]) => bar(n, 100 * s, (100 * s).toFixed(0) + '%', '#5e9e5a')).join('')
    : '<p class="note">no strongly active gene in a tracked family</p>');
  panel.innerHTML = h;
  panel.dataset.feature = f;
  for (const r of rows()) r.classList.toggle('sel', r.dataset.f === String(f));
}
if (ft) ft.tBodies[0].onclick = e => { const r = e.target.closest('tr'); if (r) show(r.dataset.f); };
"""
