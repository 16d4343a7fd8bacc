"""Cell-level association of features with labels (cell type, batch, chemistry), as in [P].

Each feature is divided by its maximum over all tokens (= the max over cells of its per-cell max-pool), so it
lies in [0, 1]; a threshold t makes it a binary active/inactive call per cell. Against each label value (one
vs rest):

    AMI = max over t in {0, .2, .4, .6, .8} of adjusted_mutual_info_score(label == value, activation > t)
    F1  = max over t in {.1, .3, .5, .7, .9} of f1_score(label == value, activation > t)

Both are computed for all features, values and thresholds at once from 2x2 contingency counts (one matrix
product per threshold); the AMI's expected-MI term depends only on the two marginals, so it is computed once
per (class size, active count) pair in numba. Values equal scikit-learn's (arithmetic-mean AMI, F1 with
zero_division=0) on the same binarisations; the tests check it.
"""

from __future__ import annotations

from typing import NamedTuple

import numba as nb
import numpy as np
import pandas as pd

from sae_fast.errors import UserError

AMI_THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8)
F1_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
_EPS = float(np.finfo(np.float64).eps)


@nb.njit(cache=True)
def _emi(a1, b1, N, logfact):
    """Expected MI of two binary labelings with marginals (N-a1, a1) and (N-b1, b1) (sklearn's formula)."""
    a = (N - a1, a1)
    b = (N - b1, b1)
    emi = 0.0
    for i in range(2):
        for j in range(2):
            ai = a[i]
            bj = b[j]
            for nij in range(max(1, ai + bj - N), min(ai, bj) + 1):
                term2 = np.log(N) + np.log(nij) - np.log(ai) - np.log(bj)
                gln = (logfact[ai] + logfact[bj] + logfact[N - ai] + logfact[N - bj] - logfact[nij]
                       - logfact[N] - logfact[ai - nij] - logfact[bj - nij] - logfact[N - ai - bj + nij])
                emi += nij / N * term2 * np.exp(gln)
    return emi


@nb.njit(cache=True)
def _h(a1, N):
    if a1 == 0 or a1 == N:
        return 0.0
    p = a1 / N
    return -(p * (np.log(a1) - np.log(N)) + (1 - p) * (np.log(N - a1) - np.log(N)))


@nb.njit(cache=True)
def _ami(n11, a1, b1, N, emi, eps):
    """sklearn's adjusted_mutual_info_score for binary labelings given the 2x2 counts."""
    a_one = a1 == 0 or a1 == N
    b_one = b1 == 0 or b1 == N
    if a_one and b_one:
        return 1.0
    if a_one or b_one:
        return 0.0
    cnt = (N - a1 - b1 + n11, b1 - n11, a1 - n11, n11)  # (0,0) (0,1) (1,0) (1,1)
    ar = (N - a1, N - a1, a1, a1)
    br = (N - b1, b1, N - b1, b1)
    mi = 0.0
    for c in range(4):
        if cnt[c] > 0:
            v = cnt[c] / N * (np.log(cnt[c]) - np.log(N)) + cnt[c] / N * (-np.log(ar[c] * br[c] * 1.0)
                                                                         + 2 * np.log(N))
            if abs(v) >= eps:
                mi += v
    mi = max(mi, 0.0)
    den = 0.5 * (_h(a1, N) + _h(b1, N)) - emi
    den = min(den, -eps) if den < 0 else max(den, eps)
    num = mi - emi
    num = min(num, -eps) if num < 0 else max(num, eps)
    return num / den


@nb.njit(parallel=True, cache=True)
def _ami_all(n11, a1, b1, N, logfact, eps):
    """n11 [C, T, F] true positives, a1 [C] class sizes, b1 [T, F] active counts -> AMI [C, T, F]."""
    C, T, F = n11.shape
    out = np.empty((C, T, F))
    for c in nb.prange(C):
        cache = np.full(N + 1, np.nan)
        for t in range(T):
            for f in range(F):
                b = b1[t, f]
                if np.isnan(cache[b]):
                    cache[b] = _emi(a1[c], b, N, logfact) if 0 < a1[c] < N and 0 < b < N else 0.0
                out[c, t, f] = _ami(n11[c, t, f], a1[c], b, N, cache[b], eps)
    return out


class CellScores(NamedTuple):
    classes: list  # the label values, one vs rest
    ami: np.ndarray  # [C, F] best AMI over AMI_THRESHOLDS
    ami_threshold: np.ndarray  # [C, F] the threshold that gave it
    f1: np.ndarray  # [C, F] best F1 over F1_THRESHOLDS
    f1_threshold: np.ndarray  # [C, F]


def normalise_by_max(cell_max) -> np.ndarray:
    """Divide each feature (column) by its maximum; all-zero features stay 0."""
    X = np.asarray(cell_max, np.float64)
    m = X.max(0)
    return X / np.where(m > 0, m, 1.0)


def _counts(X, Y, thresholds):
    """n11 [C, T, F] = label-class x active counts; b1 [T, F] active counts per threshold."""
    act = np.stack([(X > t) for t in thresholds]).astype(np.float32)  # [T, n, F]
    n11 = np.einsum("nc,tnf->ctf", Y, act).round().astype(np.int64)
    return n11, act.sum(1).round().astype(np.int64)


def association_scores(X, labels) -> CellScores:
    """AMI and F1 of every feature against every value of one label (one vs rest), max over the sweeps.

    X: [n_cells, F] per-cell activations already divided by each feature's max (`normalise_by_max`)."""
    X = np.asarray(X, np.float64)
    labels = pd.Series(np.asarray(labels)).astype(str)
    if labels.size != X.shape[0]:
        raise UserError(f"{labels.size} labels for {X.shape[0]} cells; give one label per cell")
    classes = sorted(labels.unique())
    Y = np.stack([(labels == c).to_numpy() for c in classes], 1).astype(np.float32)  # [n, C]
    N = X.shape[0]
    a1 = Y.sum(0).round().astype(np.int64)
    logfact = _logfact(N)
    n11, b1 = _counts(X, Y, AMI_THRESHOLDS)
    ami = _ami_all(n11, a1, b1, N, logfact, _EPS)  # [C, T, F]
    n11f, b1f = _counts(X, Y, F1_THRESHOLDS)
    denom = a1[:, None, None] + b1f[None]  # 2tp + fp + fn = |label| + |active|
    f1 = np.where(denom > 0, 2 * n11f / np.maximum(denom, 1), 0.0)
    ai, fi = ami.argmax(1), f1.argmax(1)
    return CellScores(classes, ami.max(1), np.asarray(AMI_THRESHOLDS)[ai], f1.max(1),
                      np.asarray(F1_THRESHOLDS)[fi])


def rank_by_label(X, labels) -> pd.DataFrame:
    """Every feature ranked by its association with one label, [P]'s batch-feature rule: the AMI of
    `association_scores` (one vs rest, max over thresholds), then the max over the label's values.

    X: [n_cells, F] per-cell activations divided by each feature's max. Columns: feature, ami, label (the
    value that gave the best AMI), ami_threshold; best first (ties by feature index)."""
    s = association_scores(X, labels)
    best = s.ami.argmax(0)
    cols = np.arange(s.ami.shape[1])
    df = pd.DataFrame({"feature": cols, "ami": s.ami[best, cols], "label": np.asarray(s.classes)[best],
                       "ami_threshold": s.ami_threshold[best, cols]})
    return df.sort_values(["ami", "feature"], ascending=[False, True], kind="stable").reset_index(drop=True)


def _logfact(n: int) -> np.ndarray:
    from scipy.special import gammaln

    return gammaln(np.arange(n + 1) + 1.0)


def best_features(X, obs: pd.DataFrame, keys, top: int = 5) -> pd.DataFrame:
    """The `top` features by AMI for every value of every obs column in `keys` (cell type, batch, ...).

    Columns: key, label, rank, feature, ami, ami_threshold, f1, f1_threshold, n_cells."""
    rows = []
    for key in keys:
        if key not in obs:
            raise UserError(f"obs has no column {key!r}; available: {', '.join(map(str, obs.columns))}")
        s = association_scores(X, obs[key].to_numpy())
        counts = obs[key].astype(str).value_counts()
        for c, cls in enumerate(s.classes):
            order = np.argsort(-s.ami[c], kind="stable")[:top]
            for r, f in enumerate(order):
                rows.append({"key": key, "label": cls, "rank": r + 1, "feature": int(f), "ami": s.ami[c, f],
                             "ami_threshold": s.ami_threshold[c, f], "f1": s.f1[c, f],
                             "f1_threshold": s.f1_threshold[c, f], "n_cells": int(counts[cls])})
    return pd.DataFrame(rows, columns=["key", "label", "rank", "feature", "ami", "ami_threshold", "f1",
                                       "f1_threshold", "n_cells"])
