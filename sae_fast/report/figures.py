"""The report's figures: each function takes plain tables (pandas / numpy) and returns a matplotlib Figure;
`data_uri` turns one into an inline PNG (base64), so the page needs no file beside it.

Every figure is drawn with the Agg backend in one small house style (`_style`), sized for a ~1,000 px wide page.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pandas as pd

COLORS = {"sae": "#2f6db5", "raw": "#d1813b", "ica": "#5e9e5a", "random": "#9a9a9a", "up": "#c0392b",
          "down": "#2471a3", "heldout": "#d1813b", "optimised": "#2f6db5"}
CYCLE = ["#2f6db5", "#d1813b", "#5e9e5a", "#b5475b", "#7d5fa8", "#8c6d46", "#c76fb0", "#6f6f6f", "#a9a83a",
         "#3aa8b0"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "axes.spines.top": False,
                         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
                         "legend.frameon": False, "legend.fontsize": 8, "figure.dpi": 100,
                         "svg.fonttype": "none", "font.family": "DejaVu Sans"})
    return plt


DPI = 144  # 1.5 image pixels per CSS pixel: sharp on high-density screens, small enough to inline


def data_uri(fig) -> str:
    """The figure as a data:image/png;base64 URI (closed afterwards)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def css_width(uri: str) -> int:
    """The width in CSS pixels at which a `data_uri` figure shows its matplotlib size (PNG width / 1.5)."""
    head = base64.b64decode(uri.split(",", 1)[1][:32])
    return round(int.from_bytes(head[16:20], "big") * 96 / DPI)


def file_uri(path) -> str:
    """A PNG file (e.g. a UMAP a stage wrote) as a data URI."""
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


# ---------------------------------------------------------------------------------------------- training


def training_curves(steps: pd.DataFrame):
    """Loss, FVU, L0 and dead fraction against training tokens (columns tokens + any of those metrics)."""
    plt = _plt()
    panels = [(c, t) for c, t in (("loss", "loss"), ("fvu", "FVU (train batch)"), ("l0", "L0 (active / token)"),
                                  ("dead_fraction", "dead fraction")) if c in steps and steps[c].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.3), squeeze=False)
    x = steps["tokens"].to_numpy(float)
    for ax, (col, title) in zip(axes[0], panels):
        ax.plot(x, steps[col].to_numpy(float), color=COLORS["sae"], lw=1.4, marker="o" if len(x) < 8 else None,
                ms=3)
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        if col in ("loss", "fvu") and (steps[col] > 0).all() and steps[col].max() / steps[col].min() > 20:
            ax.set_yscale("log")
        if x.max() > 1e4:
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ interpretation


def pr_histogram(pr: np.ndarray):
    """[Y] Fig. 1a: participation ratio per SAE feature (dead features, PR = 0 or NaN, left out)."""
    plt = _plt()
    pr = np.asarray(pr, float)
    pr = pr[np.isfinite(pr) & (pr > 0)]
    fig, ax = plt.subplots(figsize=(4.4, 2.9))
    if pr.size:
        bins = np.logspace(np.log10(max(pr.min(), 1.0)), np.log10(pr.max() * 1.01), 40) if pr.max() > 30 * max(
            pr.min(), 1.0) else 40
        ax.hist(pr, bins=bins, color=COLORS["sae"], alpha=0.85)
        if not isinstance(bins, int):
            ax.set_xscale("log")
        med = float(np.median(pr))
        ax.axvline(med, color="black", lw=1, ls="--")
        ax.text(med, ax.get_ylim()[1] * 0.95, f" median {med:.1f}", va="top", fontsize=8)
    ax.set_xlabel("participation ratio (effective number of genes)")
    ax.set_ylabel("SAE features")
    ax.set_title(f"Fig. 1a: PR of {pr.size} live SAE features")
    fig.tight_layout()
    return fig


def max_ic_boxes(ic: dict[str, np.ndarray], test: str = ""):
    """[Y] Fig. 1b: max information content of the significant GO terms per feature, per basis (violin + box +
    points)."""
    plt = _plt()
    names = [k for k, v in ic.items() if len(v)]
    fig, ax = plt.subplots(figsize=(4.4, 2.9))
    data = [np.asarray(ic[k], float) for k in names]
    if names:
        parts = ax.violinplot(data, showextrema=False, widths=0.8)
        for body, k in zip(parts["bodies"], names):
            body.set_facecolor(COLORS.get(k, "#888888"))
            body.set_alpha(0.35)
        ax.boxplot(data, widths=0.22, showfliers=False, medianprops={"color": "black"})
        rng = np.random.default_rng(0)
        for i, (k, v) in enumerate(zip(names, data), 1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, v.size), v, s=4, color=COLORS.get(k, "#888888"), alpha=0.6,
                       lw=0)
        ax.set_xticks(range(1, len(names) + 1), [f"{k.upper() if k != 'raw' else 'raw neurons'}\n(n={v.size})"
                                                 for k, v in zip(names, data)])
    ax.set_ylabel("max IC of significant terms")
    ax.set_title("Fig. 1b: max IC per enriched feature")
    if test:
        ax.text(0.99, 0.02, test, transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    fig.tight_layout()
    return fig


def overlap_components(components: list[tuple[list[int], list[tuple[int, int]], str]],
                       terms: dict[int, str] | None = None, max_panels: int = 8, max_nodes: int = 300):
    """The overlap graph's largest components: (features, edges, shared-term caption) per component, drawn as
    small networks (spring layout, networkx). A component of more than 40 features gets a 2 x 2 panel with its
    nodes coloured by their best GO term (`terms`: feature -> term name; the 6 commonest named); one of more than
    `max_nodes` features is drawn as a random sample of them."""
    import networkx as nx

    plt = _plt()
    terms = terms or {}
    comps = components[:max_panels]
    big = bool(comps) and len(comps[0][0]) > 40
    rest = len(comps) - 1 if big else len(comps)
    ncol = (4 if rest else 2) if big else max(1, min(4, rest))
    nrow = 2 + math.ceil(max(0, rest - 4) / 4) if big else math.ceil(rest / ncol)
    fig = plt.figure(figsize=(2.55 * ncol, 2.6 * nrow))
    grid = fig.add_gridspec(nrow, ncol)
    slots = [grid[r, c] for r in range(nrow) for c in range(ncol) if not (big and r < 2 and c < 2)]
    if big:
        slots.insert(0, grid[0:2, 0:2])
    rng = np.random.default_rng(0)
    for j, (slot, (feats, edges, caption)) in enumerate(zip(slots, comps)):
        ax = fig.add_subplot(slot)
        ax.axis("off")
        g = nx.Graph()
        g.add_nodes_from(feats)
        g.add_edges_from(edges)
        title = f"{len(feats)} features"
        if len(feats) > max_nodes:
            g = g.subgraph(rng.choice(np.asarray(feats), max_nodes, replace=False).tolist())
            title += f" ({max_nodes} drawn at random)"
        n = g.number_of_nodes()
        pos = nx.spring_layout(g, seed=0, k=1.5 / math.sqrt(max(n, 1)))
        nx.draw_networkx_edges(g, pos, ax=ax, edge_color="#9aa7b4", width=0.8 if n <= 40 else 0.3,
                               alpha=1.0 if n <= 40 else 0.2)
        if n <= 40:
            nx.draw_networkx_nodes(g, pos, ax=ax, node_color=CYCLE[j % len(CYCLE)], alpha=0.9,
                                   node_size=260 if n <= 12 else 110)
            if n <= 20:
                nx.draw_networkx_labels(g, pos, ax=ax, font_size=6.5, font_color="white")
        else:
            names = pd.Series([terms.get(f) for f in g.nodes], dtype=object)
            common = list(names.dropna().value_counts().index[:6])
            for c, name in enumerate([*common, None]):
                nodes = [f for f, t in zip(g.nodes, names) if (t == name if name else t not in common)]
                label = _wrap(name, 38, 1) if name else "other / no significant term"
                nx.draw_networkx_nodes(g, pos, nodelist=nodes, ax=ax, node_size=16 if name else 9,
                                       node_color=CYCLE[c] if name else "#c8ced6", label=f"{label} ({len(nodes)})")
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, markerscale=1.6, title="best GO term",
                      title_fontsize=7.5)
        ax.set_title(title, fontsize=9)
        if caption:
            ax.text(0.5, -0.02, _wrap("shared: " + caption, 34 if not (big and j == 0) else 70, 3),
                    transform=ax.transAxes, ha="center", va="top", fontsize=6.8, color="#333333")
        ax.margins(0.05)
    fig.tight_layout(h_pad=2.6)
    return fig


def association_heatmap(matrix: np.ndarray, rows: list[str], cols: list[str]):
    """Cell-level association: AMI of features (columns) against label values (rows); NaN = not computed."""
    plt = _plt()
    m = np.ma.masked_invalid(np.asarray(matrix, float))
    fig, ax = plt.subplots(figsize=(min(1.6 + 0.28 * len(cols), 11), 0.9 + 0.24 * len(rows)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    im = ax.imshow(m, aspect="auto", cmap=cmap, vmin=0, vmax=max(float(m.max()) if m.count() else 1.0, 1e-3),
                   interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7.5)
    ax.grid(False)
    ax.set_xlabel("SAE feature")
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="AMI")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- steering


def alpha_sweep(df: pd.DataFrame):
    """DEGs up and down against alpha, one line pair per steered feature."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 2.8))
    for j, (feat, sub) in enumerate(df.groupby("feature", sort=True)):
        sub = sub.sort_values("alpha")
        c = CYCLE[j % len(CYCLE)]
        if "n_up" in sub:
            ax.plot(sub["alpha"], sub["n_up"], "-o", color=c, ms=3, label=f"feature {feat}: up")
        if "n_down" in sub:
            ax.plot(sub["alpha"], sub["n_down"], "--s", color=c, ms=3, label=f"feature {feat}: down")
    ax.set_xlabel("alpha (feature scale)")
    ax.set_ylabel("significant DEGs")
    ax.set_title("Alpha sweep")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def closer_scatter(df: pd.DataFrame):
    """Distance to the target centroid before vs after contrastive steering, one point per source cell."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.9, 3.6))
    held = df["heldout"].astype(bool).to_numpy() if "heldout" in df else np.zeros(len(df), bool)
    pre, post = df["dist_pre"].to_numpy(float), df["dist_post"].to_numpy(float)
    for mask, name in ((~held, "optimised"), (held, "heldout")):
        if mask.any():
            frac = float(np.mean(post[mask] < pre[mask]))
            label = "held-out" if name == "heldout" else "optimised on"
            ax.scatter(pre[mask], post[mask], s=9, alpha=0.7, lw=0, color=COLORS[name],
                       label=f"{label}: {100 * frac:.0f}% closer (n={int(mask.sum())})")
    lo, hi = float(np.nanmin([pre.min(), post.min()])), float(np.nanmax([pre.max(), post.max()]))
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--")
    ax.set_xlabel("distance to target centroid, before")
    ax.set_ylabel("after steering")
    ax.set_title("Closer fraction (below the diagonal)")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig


def gap_distributions(df: pd.DataFrame, clip: tuple[float, float] = (-1.0, 2.0)):
    """Gap fraction (s - src) / (tgt - src) per gene, split into genes up and down in the target; 0 = unmoved,
    1 = at the target."""
    plt = _plt()
    sides = directions(df)
    fig, axes = plt.subplots(1, len(sides), figsize=(3.3 * len(sides), 2.6), squeeze=False, sharey=False)
    bins = np.linspace(clip[0], clip[1], 31)
    for ax, (name, sub) in zip(axes[0], sides):
        gap = np.clip(sub["gap"].to_numpy(float), *clip)
        ok = correct(sub)
        ax.hist(gap, bins=bins, color=COLORS[name], alpha=0.85)
        ax.axvline(0, color="black", lw=0.8)
        ax.axvline(1, color="black", lw=0.8, ls=":")
        ax.set_title(f"genes {name} in target: {100 * ok.mean():.0f}% correct (n={len(sub)})")
        ax.set_xlabel(f"gap fraction (clipped to [{clip[0]:g}, {clip[1]:g}])")
        ax.set_ylabel("genes")
    fig.tight_layout()
    return fig


def gap_cumulative(df: pd.DataFrame):
    """Share of genes moved in the right direction among the genes with the largest |tgt - src|, cumulated by
    effect size."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    effect = next((df[c] for c in ("effect", "effect_size") if c in df), None)
    effect = effect if effect is not None else (df["tgt"] - df["src"]).abs()
    for name, sub in directions(df) + [("all", df)]:
        order = np.argsort(-effect.loc[sub.index].to_numpy(float), kind="stable")
        ok = correct(sub)[order]
        share = np.cumsum(ok) / np.arange(1, ok.size + 1)
        ax.plot(np.arange(1, ok.size + 1), share, color=COLORS.get(name, "black"), lw=1.3,
                label=f"{name} ({100 * ok.mean():.0f}% overall)")
    ax.axhline(0.5, color="black", lw=0.7, ls=":")
    ax.set_xlabel("genes, largest |target - source| first")
    ax.set_ylabel("share moved correctly")
    ax.set_ylim(0, 1.02)
    ax.set_title("Cumulative share by effect size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def directions(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The genes up and down in the target (column direction, else the sign of tgt - src)."""
    if "direction" in df:
        d = df["direction"].astype(str).str.lower()
        up, down = df[d.str.startswith("up") | (d == "1") | (d == "+")], df[d.str.startswith("down") | (d == "-1")
                                                                            | (d == "-")]
    else:
        up, down = df[df["tgt"] > df["src"]], df[df["tgt"] < df["src"]]
    return [(n, s) for n, s in (("up", up), ("down", down)) if len(s)]


def correct(df: pd.DataFrame) -> np.ndarray:
    """Moved toward the target (column correct, else gap > 0)."""
    if "correct" in df:
        return df["correct"].astype(str).str.lower().isin(["true", "1", "1.0"]).to_numpy()
    return (df["gap"].to_numpy(float) > 0)


def contrast_alphas(df: pd.DataFrame, col: str = "alpha", threshold: float = 0.3):
    """Learned alphas of contrastive steering, sorted; features with |alpha - 1| > threshold highlighted."""
    plt = _plt()
    a = df.sort_values(col, kind="stable")[col].to_numpy(float)
    fig, ax = plt.subplots(figsize=(4.4, 2.6))
    far = np.abs(a - 1) > threshold
    x = np.arange(a.size)
    ax.scatter(x[~far], a[~far], s=6, color=COLORS["random"], lw=0, label="|alpha - 1| <= 0.3")
    ax.scatter(x[far], a[far], s=10, color=COLORS["sae"], lw=0, label=f"|alpha - 1| > 0.3 ({int(far.sum())})")
    ax.axhline(1, color="black", lw=0.7)
    ax.set_xlabel("features, by learned alpha")
    ax.set_ylabel("alpha")
    ax.set_title("Learned alphas")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def contrast_history(df: pd.DataFrame):
    """The contrastive-steering loss per epoch, and the random-feature control's when present."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.9, 2.7))
    ax.plot(df["epoch"], df["loss"], color=COLORS["sae"], lw=1.4, label="annotated features")
    if "control_loss" in df:
        ax.plot(df["epoch"], df["control_loss"], color=COLORS["random"], lw=1.4, label="random features (control)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Contrastive steering loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def debatch_curves(df: pd.DataFrame):
    """scIB scores (batch, bio, total) against the number of clamped features, one row of panels per clamp value
    c: each selector (the top batch features by AMI, random sets: mean +- sd over their seeds) as a line; the
    rows without a clamp value (unsteered, unintegrated) as dotted reference lines."""
    plt = _plt()
    metrics = [m for m in ("batch", "bio", "total") if m in df]
    c = df["c"] if "c" in df else pd.Series(np.nan, index=df.index)
    cs = sorted(c.dropna().unique()) or [None]
    sel = df["selector"].astype(str) if "selector" in df else pd.Series("clamped", index=df.index)
    refs = df[c.isna()]
    fig, axes = plt.subplots(len(cs), len(metrics), figsize=(2.9 * len(metrics), 2.4 * len(cs)), squeeze=False)
    names = {"ami": "top batch features", "random": "random features"}
    for r, cv in enumerate(cs):
        rows = df[c == cv] if cv is not None else df
        for ax, m in zip(axes[r], metrics):
            for j, (name, sub) in enumerate(rows.groupby(sel.loc[rows.index], sort=True)):
                g = sub.groupby("n")[m]
                mean, sd = g.mean(), g.std().fillna(0)
                color = COLORS["sae"] if name == "ami" else COLORS.get(name, CYCLE[(j + 1) % len(CYCLE)])
                ax.plot(mean.index, mean.to_numpy(), "-o", ms=3, color=color, label=names.get(name, name))
                if (sd > 0).any():
                    ax.fill_between(mean.index, mean - sd, mean + sd, color=color, alpha=0.2, lw=0)
            if cv is not None:
                for k, (name, sub) in enumerate(refs.groupby(sel.loc[refs.index], sort=True)):
                    ax.axhline(sub[m].mean(), color=CYCLE[(k + 2) % len(CYCLE)], lw=1, ls=":", label=name)
            ax.set_title(m + (f" (c = {cv:g})" if cv is not None else ""))
            ax.set_xlabel("clamped features n")
        axes[r][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int, lines: int) -> str:
    import textwrap

    out = textwrap.wrap(text, width)
    return "\n".join(out[:lines]) + (" ..." if len(out) > lines else "")
