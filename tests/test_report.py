"""`sae-fast report`: the demo run's page in headless Chromium (figures loaded, no network request, the feature
browser's panel opens on a click, a full-page screenshot), the steering / batch-removal sections on small
synthetic tables, and folders that lack stages.

Chromium is Debian's `chromium` package, driven over its DevTools protocol through --remote-debugging-pipe (file
descriptors 3 and 4, NUL-separated JSON), so the test needs no Python package and no downloaded browser. Where
chromium is missing the test installs it with apt-get when it runs as root, and fails otherwise.

SAE_FAST_UPDATE_SCREENSHOT=1 writes the screenshot to docs/img/report.png; SAE_FAST_REPORT_RUN=DIR renders
that run folder (e.g. a full `sae-fast demo --out runs/demo`) instead of the shrunk demo run.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sae_fast.cli import main
from sae_fast.errors import UserError
from sae_fast.report import render_report, write_report

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1280,900"]


# ------------------------------------------------------------------------------------------- the browser


def chromium_path() -> str:
    """Debian's chromium; installed with apt-get when missing and running as root, else the test fails."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.geteuid() != 0:
        pytest.fail("chromium is not installed and this is not root: apt-get install -y chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
    return shutil.which("chromium")


def _high(fd: int) -> int:
    """The descriptor moved to >= 10 (close-on-exec), so that mapping it onto 3 or 4 never overwrites the other."""
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Chromium:
    """Headless Chromium over the DevTools protocol on a pipe: send(method, **params) -> result; events kept."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="sae-fast-chromium-")
        to_r, to_w = (_high(fd) for fd in os.pipe())
        from_r, from_w = (_high(fd) for fd in os.pipe())
        args = [chromium_path(), *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
                "about:blank"]
        # chromium reads commands on fd 3 and writes replies on fd 4
        self.pid = os.posix_spawn(args[0], args, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, to_r, 3), (os.POSIX_SPAWN_DUP2, from_w, 4),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0), (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
        os.close(to_r)
        os.close(from_w)
        self.w, self.r = os.fdopen(to_w, "wb", buffering=0), os.fdopen(from_r, "rb", buffering=0)
        self.buf, self.n, self.events = b"", 0, []
        page = next(t for t in self.send("Target.getTargets", session=False)["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", session=False, targetId=page["targetId"],
                                 flatten=True)["sessionId"]

    def _message(self) -> dict:
        while b"\0" not in self.buf:
            chunk = self.r.read(1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: bool = True, **params):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self.w.write(json.dumps(msg).encode() + b"\0")
        while True:
            m = self._message()
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._message())
        raise TimeoutError(method)

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:60]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, path: Path) -> float:
        """Load a file; return the seconds until its load event (every image decoded)."""
        self.events.clear()
        t0 = time.perf_counter()
        self.send("Page.navigate", url=path.resolve().as_uri())
        self.wait_event("Page.loadEventFired")
        return time.perf_counter() - t0

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the first element matching `selector` (scrolled into view)."""
        box = self.js(f"(()=>{{const e=document.querySelector({json.dumps(selector)});e.scrollIntoView("
                      "{block:'center'});const r=e.getBoundingClientRect();return [r.x+r.width/2,r.y+r.height/2]})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self) -> bytes:
        """A full-page PNG."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        return base64.b64decode(shot["data"])

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self):
        try:
            self.send("Browser.close", session=False)
        except (RuntimeError, OSError):
            pass
        for _ in range(100):  # up to 10 s for a clean exit, then kill
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        self.w.close()
        self.r.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    b = Chromium()
    b.send("Page.enable")
    b.send("Network.enable")
    b.send("Runtime.enable")
    yield b
    b.close()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


IMAGES_OK = """[...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])"""


def check_images(browser, min_count: int) -> list:
    images = browser.js(IMAGES_OK)
    assert len(images) >= min_count, images
    bad = [i for i in images if not (i[1] and i[2] > 0 and i[3] > 0)]
    assert not bad, f"images not loaded or empty: {bad}"
    return images


def check_offline(browser, page: Path):
    urls = browser.requests()
    assert urls and urls[0] == page.resolve().as_uri()
    outside = [u for u in urls if not u.startswith(("file:", "data:"))]
    assert not outside, f"the page made network requests: {outside}"
    assert [u for u in urls if u.startswith("file:")] == [page.resolve().as_uri()], urls  # nothing beside it


# --------------------------------------------------------------------------------------- the demo's page


@pytest.fixture(scope="module")
def demo_dir(request):
    given = os.environ.get("SAE_FAST_REPORT_RUN")
    if given:
        return Path(given)
    return request.getfixturevalue("demo_run")[0]


def test_demo_report_in_chromium(demo_dir, browser, tmp_path):
    page = demo_dir / "report.html"  # the run's last stage wrote it
    if os.environ.get("SAE_FAST_REPORT_RUN"):
        page = tmp_path / "report.html"
        assert main(["report", str(demo_dir), "--out", str(page), "-q"]) == 0
    else:
        state = json.loads((demo_dir / "state.json").read_text())
        assert state["done"]["report"]["bytes"] == page.stat().st_size
    size = page.stat().st_size
    assert size <= 5e6, f"{size / 1e6:.1f} MB"
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text), "a link to the network"
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert 'class="error"' not in text  # every section drew

    seconds = browser.open(page)
    assert seconds <= 10, f"rendered in {seconds:.1f} s"
    sections = browser.js("[...document.querySelectorAll('main section')].map(s => s.id)")
    for sid in ("metrics", "training", "interpretation", "features", "overlap", "association", "run", "summary"):
        assert sid in sections, (sid, sections)
    images = check_images(browser, min_count=5)
    alts = {a for a, *_ in images}
    assert {"training curves", "Fig. 1a", "Fig. 1b", "overlap graph components",
            "cell-level association heatmap"} <= alts, alts
    assert browser.js("document.body.innerText").count("embedded demo model") >= 1  # the mini label

    # the feature browser: a click on a row opens that feature's panel
    n_rows = browser.js("document.querySelectorAll('#ft tbody tr').length")
    feats = pd.read_parquet(demo_dir / "tables" / "features.parquet") if (
        demo_dir / "tables" / "features.parquet").exists() else pd.read_csv(demo_dir / "tables" / "features.csv")
    assert n_rows == len(feats)
    # a feature with GO terms, preferably one that marks a cell type (a telling panel for the screenshot)
    assoc = pd.read_parquet(demo_dir / "tables" / "cell_association.parquet")
    marking = assoc.sort_values("ami", ascending=False, kind="stable").feature
    with_terms = set(feats.feature[feats.n_sig > 0])
    enriched = next((int(f) for f in marking if f in with_terms),
                    int(feats.sort_values("best_q", kind="stable").feature.iloc[0]))
    browser.js(f"document.getElementById('q').value='{enriched}';document.getElementById('q')"
               ".dispatchEvent(new Event('input'))")
    assert browser.js("[...document.querySelectorAll('#ft tbody tr')].filter(r=>!r.hidden).length") >= 1
    browser.click(f"#ft tbody tr[data-f='{enriched}']")
    panel = browser.js("(()=>{const p=document.getElementById('panel');return [p.dataset.feature, p.innerText,"
                       " p.querySelectorAll('#violin polygon').length, p.getBoundingClientRect().height]})()")
    assert panel[0] == str(enriched), panel
    top = str(feats.set_index("feature").loc[enriched, "top_genes"]).split(";")[0]
    best = str(feats.set_index("feature").loc[enriched, "best_name"])
    assert f"Feature {enriched}" in panel[1] and top in panel[1] and best in panel[1], panel[1][:400]
    assert "Top genes" in panel[1] and "GO terms" in panel[1] and "Gene families" in panel[1]
    assert panel[2] >= 1, "no violin drawn"
    assert panel[3] > 150
    check_offline(browser, page)

    browser.js("document.getElementById('q').value='';document.getElementById('q').dispatchEvent(new Event('input'))")
    browser.js("document.querySelector('#ft tr.sel').scrollIntoView({block:'center'});window.scrollTo(0, 0)")
    shot = browser.screenshot()
    w, h = png_size(shot)
    assert w >= 1000 and h > 2000, (w, h)
    (tmp_path / "report.png").write_bytes(shot)
    if os.environ.get("SAE_FAST_UPDATE_SCREENSHOT"):
        out = ROOT / "docs" / "img" / "report.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(shot)


def test_demo_report_numbers_match_the_tables(demo_dir, tmp_path):
    """`sae-fast report --out`: the browser's best AMI per feature (recomputed from annotated.h5ad) equals the
    interpret stage's cell_association table, and Fig. 1b's Mann-Whitney line is the summary's."""
    out = tmp_path / "elsewhere" / "page.html"
    assert main(["report", str(demo_dir), "--out", str(out), "-q"]) == 0
    text = out.read_text()
    data = json.loads(re.search(r'<script type="application/json" id="feature-data">(.*?)</script>', text,
                                re.S).group(1).replace("<\\/", "</"))
    assoc = pd.read_parquet(demo_dir / "tables" / "cell_association.parquet")
    for r in assoc[assoc["rank"] == 1].itertuples():
        best = {k: (label, ami) for k, label, ami in data["features"][str(r.feature)]["ami"]}
        if r.key in best:
            assert best[r.key][1] >= round(r.ami, 3) - 1e-3  # the feature's best label is at least this one
            if best[r.key][0] == r.label:
                assert best[r.key][1] == pytest.approx(r.ami, abs=1e-3)
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert f"p = {summary['mannwhitney_max_ic_p']:.2g}" in text


def test_violin_histograms_match_numpy():
    from sae_fast.report.page import N_BINS, violin_data

    rng = np.random.default_rng(1)
    X = rng.gamma(1.0, 1.0, (200, 7)) * (rng.random((200, 7)) < 0.6)
    X[:, 3] = 0  # a feature that never fires
    labels = rng.choice(["T", "B", "NK"], 200)
    classes, counts, per_feature = violin_data(X.astype(np.float32), labels)
    assert violin_data(X.astype(np.float32), labels, chunk=3) == (classes, counts, per_feature)
    assert classes == ["B", "NK", "T"] and counts == [int((labels == c).sum()) for c in classes]
    assert per_feature[3] is None
    for f in (0, 1, 6):
        for j, c in enumerate(classes):
            v = X[labels == c, f]
            on = v[v > 0]
            h, _ = np.histogram(on, bins=N_BINS, range=(0, X[:, f].max()))
            frac, got = per_feature[f][j]
            assert frac == pytest.approx(on.size / v.size, abs=1e-3)
            assert got == np.round(99 * h / h.max()).astype(int).tolist()


# --------------------------------------------------------------------------- steering sections, partial runs


def synthetic_steering(folder: Path) -> dict:
    """Small tables in the layouts the steering and batch-removal stages write, with extra and missing columns,
    plus a UMAP PNG; returns the fractions the page must show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    t = folder / "tables"
    t.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"feature": f, "alpha": a, "n_up": int(abs(a - 1) * 40 + f % 3), "n_down": int(abs(a - 1) * 30),
                   "top_up_terms": "translation; immune response", "top_down_terms": "cell cycle",
                   "extra_column": 1} for f in (5, 9) for a in (0, 0.5, 1, 2, 5)]).to_csv(t / "alpha_sweep.csv",
                                                                                     index=False)
    pre = rng.uniform(5, 10, 120)
    post = pre + rng.normal(-0.8, 1.0, 120)
    held = rng.random(120) < 0.2
    pd.DataFrame({"cell": [f"c{i}" for i in range(120)], "dist_pre": pre, "dist_post": post, "closer": post < pre,
                  "heldout": held}).to_csv(t / "contrast_cells.csv", index=False)
    src, tgt = rng.normal(1, 1, 300), rng.normal(1, 1, 300)
    steered = src + (tgt - src) * rng.normal(0.4, 0.6, 300)
    gap = (steered - src) / (tgt - src)
    pd.DataFrame({"gene": [f"G{i}" for i in range(300)], "src": src, "tgt": tgt, "steered": steered, "gap": gap,
                  "correct": np.sign(steered - src) == np.sign(tgt - src),
                  "direction": np.where(tgt > src, "up", "down"), "effect_size": np.abs(tgt - src)}).to_csv(
        t / "contrast_gap.csv", index=False)
    pd.DataFrame({"feature": np.arange(40), "alpha": rng.normal(1, 0.4, 40)}).to_csv(t / "contrast_alphas.csv",
                                                                                     index=False)
    pd.DataFrame({"epoch": np.arange(1, 11), "loss": np.linspace(3, 1, 10), "control_loss": np.linspace(3, 2.5, 10)}
                 ).to_csv(t / "contrast_history.csv", index=False)
    pd.DataFrame({"term": ["GO:0006412"], "name": ["translation"], "alpha_up": [5.0], "alpha_down": [-5.0]}).to_csv(
        t / "alpha_sweep_flipped.csv", index=False)
    (t / "steer_summary.json").write_text(json.dumps({"source": "CD4 T", "target": "CD8 T", "closer_fraction": 0.7833,
                                                      "control_closer_fraction": 0.55, "gap_binom_p_up": 1e-5}))
    rows = [{"n": 0, "c": np.nan, "selector": "unsteered", "seed": None, "embedding": "unsteered", "bio": 0.6,
             "batch": 0.4, "total": 0.52},
            {"n": np.nan, "c": np.nan, "selector": "unintegrated", "seed": None, "embedding": "unintegrated",
             "bio": 0.55, "batch": 0.35, "total": 0.47}]  # the layout of steer.debatch's tidy table
    for sel, seeds in (("ami", [None]), ("random", [42, 43, 44])):
        for seed in seeds:
            for n in (10, 20, 50):
                b = 0.4 + (0.004 if sel == "ami" else 0.001) * n + rng.normal(0, 0.01)
                rows.append({"n": n, "c": -2.0, "selector": sel, "seed": seed, "embedding": f"{sel}_n{n}_{seed}",
                             "bio": 0.6 - 0.001 * n, "batch": b, "total": 0.6 * (0.6 - 0.001 * n) + 0.4 * b,
                             "silhouette_label": 0.5})
    pd.DataFrame(rows).to_csv(t / "debatch.csv", index=False)
    (folder / "figures").mkdir(exist_ok=True)
    for name in ("umap_unsteered", "umap_clamp_n20"):
        fig, ax = plt.subplots(figsize=(3, 3))
        ax.scatter(*rng.normal(size=(2, 50)), s=4)
        fig.savefig(folder / "figures" / f"{name}.png", dpi=60)
        plt.close(fig)
    closer = post < pre
    return {"closer": closer.mean(), "closer_heldout": closer[held].mean(),
            "up": np.mean((np.sign(steered - src) == np.sign(tgt - src))[tgt > src])}


def test_steering_and_debatch_sections(demo_dir, browser, tmp_path):
    run = tmp_path / "run"
    # the demo's own steering tables and top genes are replaced by the synthetic ones below
    shutil.copytree(demo_dir, run, ignore=shutil.ignore_patterns(
        "shards", "sae", "report.html", "alpha_sweep*", "contrast_*", "deg_*", "steer_summary.json", "top_genes.*"))
    want = synthetic_steering(run)
    # the top genes' activations, in the layout proposed for the interpret stage (feature, gene, activation)
    acts = pd.DataFrame({"feature": 0, "gene": ["GENE_A", "GENE_B", "GENE_C"], "activation": [0.5, 2.25, 1.0]})
    acts.to_csv(run / "tables" / "top_genes.csv", index=False)
    page = write_report(run)
    assert page == run / "report.html"
    text = page.read_text()
    assert f"closer fraction {100 * want['closer']:.1f}% of 120 source cells" in text
    assert f"{100 * want['closer_heldout']:.1f}% of the" in text
    browser.open(page)
    sections = browser.js("[...document.querySelectorAll('main section')].map(s => s.id)")
    assert {"steering", "debatch", "features"} <= set(sections), sections
    alts = {a for a, *_ in check_images(browser, min_count=13)}
    assert {"alpha sweep", "closer fraction", "learned alphas", "gap fractions", "cumulative share by effect size",
            "contrastive loss",
            "scIB scores against clamped features", "UMAP unsteered", "UMAP clamp n20"} <= alts, alts
    body = browser.js("document.body.innerText")
    assert f"moved toward the target: {100 * want['up']:.1f}% of" in body
    assert "Features with |alpha - 1| > 0.3" in body and "unintegrated" in body
    assert "Terms that flip sides (1)" in body and "CD4 T → CD8 T" in body
    assert re.search(r"closer fraction, all source cells\s+78.3%\s+\[Y\]: 81%", body), body[:3000]
    assert re.search(r"control \(random features\), all cells\s+55.0%", body)
    browser.click("#ft tbody tr[data-f='0']")
    bars = browser.js("[...document.querySelectorAll('#panel .gbar')].map(b => b.innerText.replace(/\\s+/g, ' '))")
    assert bars[:3] == ["GENE_B 2.25", "GENE_C 1.00", "GENE_A 0.500"], bars
    check_offline(browser, page)


def test_report_without_stages(demo_dir, tmp_path):
    """A folder with only some files: those sections, no others, no broken image."""
    run = tmp_path / "partial"
    (run / "tables").mkdir(parents=True)
    shutil.copy(demo_dir / "tables" / "sae_metrics.json", run / "tables")
    shutil.copy(demo_dir / "state.json", run)
    text = render_report(run)
    ids = re.findall(r'<section id="([^"]+)"', text)
    assert ids == ["metrics", "run"], ids
    assert "<img" not in text

    # an interpret-only folder (sae-fast interpret --out): tables, summary.json and annotated.h5ad, no log
    run2 = tmp_path / "interp"
    shutil.copytree(demo_dir, run2, ignore=shutil.ignore_patterns("shards", "sae", "log.jsonl", "state.json",
                                                                  "environment.json", "config.resolved.toml",
                                                                  "summary.txt", "report.html"))
    text = render_report(run2)
    ids = re.findall(r'<section id="([^"]+)"', text)
    assert ids[:2] == ["metrics", "interpretation"] and "features" in ids and "training" not in ids, ids
    srcs = re.findall(r'<img[^>]* src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") and len(s) > 1000 for s in srcs)


def test_a_table_it_cannot_draw_leaves_a_note_not_a_crash(tmp_path, capsys):
    run = tmp_path / "odd"
    (run / "tables").mkdir(parents=True)
    (run / "tables" / "sae_metrics.json").write_text('{"fvu": 0.1, "l0": 8}')
    pd.DataFrame({"dist_pre": ["near", "far"], "dist_post": ["x", "y"]}).to_csv(run / "tables" /
                                                                               "contrast_cells.csv", index=False)
    text = render_report(run)
    assert re.findall(r'<section id="([^"]+)"', text) == ["metrics", "steering"]
    assert '<p class="error">This section could not be drawn' in text and "closer fraction" not in text
    assert "section 'Steering' left out" in capsys.readouterr().err


def test_report_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        render_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a sae-fast run folder"):
        render_report(tmp_path / "empty")
    assert main(["report", str(tmp_path / "empty")]) == 2
