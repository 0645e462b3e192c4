"""Plain Python-loop reference implementations of the TIP core (Liger-Kernel style).

Deliberately naive and obviously correct: nested lists of Python floats, explicit loops, no
vectorisation. The unit tests compare the vectorised torch implementation against these.
"""

from __future__ import annotations

import math
import struct

LOG_RATIO_CLAMP = 20.0
TAIL_EPS = 1e-12


def to_lists(t):
    """Tensor -> nested Python lists (floats/bools/ints)."""
    return t.tolist()


def f32(x: float) -> float:
    """Round a Python float to the nearest float32 (as a Python float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def keep_count(m: int, ratio: float) -> int:
    """Eq. 6 budget for a group of m valid tokens."""
    if m == 0:
        return 0
    return min(m, max(1, math.floor(ratio * m + 1e-6)))


# ---------------------------------------------------------------- signals

def sampled_divergence(lp_s, lp_t, mask, estimator):
    out = []
    for row_s, row_t, row_m in zip(lp_s, lp_t, mask):
        row = []
        for s, t, m in zip(row_s, row_t, row_m):
            if not m:
                row.append(0.0)
                continue
            k1 = s - t
            if estimator == "k1":
                row.append(k1)
            elif estimator == "abs":
                row.append(abs(k1))
            else:
                log_r = max(-LOG_RATIO_CLAMP, min(LOG_RATIO_CLAMP, t - s))
                r = math.exp(log_r)
                if estimator == "k3":
                    row.append(max(0.0, (r - 1.0) - log_r))
                else:  # forward
                    row.append(max(0.0, r * log_r - (r - 1.0)))
        out.append(row)
    return out


def topk_divergences(t_topk, s_topk, mask):
    """(reverse, forward) KL over top-k + one tail bucket, python loops."""
    rev, fwd = [], []
    for row_t, row_s, row_m in zip(t_topk, s_topk, mask):
        r_row, f_row = [], []
        for lt, ls, m in zip(row_t, row_s, row_m):
            if not m:
                r_row.append(0.0)
                f_row.append(0.0)
                continue
            pt = [math.exp(v) for v in lt]
            ps = [math.exp(v) for v in ls]
            tail_t = max(TAIL_EPS, 1.0 - sum(pt))
            tail_s = max(TAIL_EPS, 1.0 - sum(ps))
            r = sum(p * (a - b) for p, a, b in zip(ps, ls, lt)) + tail_s * (math.log(tail_s) - math.log(tail_t))
            f = sum(p * (b - a) for p, a, b in zip(pt, ls, lt)) + tail_t * (math.log(tail_t) - math.log(tail_s))
            r_row.append(max(0.0, r))
            f_row.append(max(0.0, f))
        rev.append(r_row)
        fwd.append(f_row)
    return rev, fwd


def full_kl_row(s_logits, t_logits):
    """(KL(S||T), KL(T||S), H(S)) of one row of logits, python floats."""
    def log_softmax(z):
        mx = max(z)
        lse = mx + math.log(sum(math.exp(v - mx) for v in z))
        return [v - lse for v in z]
    ls, lt = log_softmax(s_logits), log_softmax(t_logits)
    rev = sum(math.exp(a) * (a - b) for a, b in zip(ls, lt))
    fwd = sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    ent = -sum(math.exp(a) * a for a in ls)
    return rev, fwd, ent


# ---------------------------------------------------------------- scores

def minmax(x, mask, scope):
    rows = len(x)
    out = [[0.0] * len(x[0]) if rows else [] for _ in range(rows)]
    groups = [[(i, j) for i in range(rows) for j in range(len(x[i])) if mask[i][j]]] if scope == "batch" else \
        [[(i, j) for j in range(len(x[i])) if mask[i][j]] for i in range(rows)]
    for g in groups:
        if not g:
            continue
        vals = [x[i][j] for i, j in g]
        lo, hi = min(vals), max(vals)
        for i, j in g:
            out[i][j] = (x[i][j] - lo) / (hi - lo) if hi > lo else 0.0
    return out


def token_scores(method, h, d, mask, fwd=None, scope="batch"):
    rows, cols = len(mask), len(mask[0]) if mask else 0
    if method == "entropy":
        return [[h[i][j] if mask[i][j] else 0.0 for j in range(cols)] for i in range(rows)]
    if method == "divergence":
        return [[d[i][j] if mask[i][j] else 0.0 for j in range(cols)] for i in range(rows)]
    hh = minmax(h, mask, scope)
    if method == "soft_or":
        dh = minmax(d, mask, scope)
        return [[(hh[i][j] + dh[i][j] - hh[i][j] * dh[i][j]) if mask[i][j] else 0.0 for j in range(cols)]
                for i in range(rows)]
    if method == "q3":
        f = fwd if fwd is not None else d
        return [[f[i][j] * (1.0 - hh[i][j]) if mask[i][j] else 0.0 for j in range(cols)] for i in range(rows)]
    raise ValueError(method)


# ---------------------------------------------------------------- selection

def select(scores, mask, ratio, scope="sequence", invert=False):
    rows = len(mask)
    keep = [[False] * len(mask[i]) for i in range(rows)]
    if scope == "sequence":
        groups = [[(i, j) for j in range(len(mask[i])) if mask[i][j]] for i in range(rows)]
    else:
        groups = [[(i, j) for i in range(rows) for j in range(len(mask[i])) if mask[i][j]]]
    for g in groups:
        k = keep_count(len(g), ratio)
        # sort by score (descending, or ascending if invert), ties by position (row-major)
        order = sorted(range(len(g)), key=lambda n: ((scores[g[n][0]][g[n][1]] if invert
                                                      else -scores[g[n][0]][g[n][1]]), n))
        for n in order[:k]:
            i, j = g[n]
            keep[i][j] = True
    return keep


def poisson_pi(weights, mask, ratio, scope="sequence"):
    """Inclusion probabilities π = min(1, c·w) with Σπ = k, by textbook iterative capping."""
    rows = len(mask)
    pi = [[0.0] * len(mask[i]) for i in range(rows)]
    if scope == "sequence":
        groups = [[(i, j) for j in range(len(mask[i])) if mask[i][j]] for i in range(rows)]
    else:
        groups = [[(i, j) for i in range(rows) for j in range(len(mask[i])) if mask[i][j]]]
    for g in groups:
        k = keep_count(len(g), ratio)
        if k == 0:
            continue
        pos = [(i, j) for i, j in g if weights[i][j] > 0]
        zero = [(i, j) for i, j in g if not weights[i][j] > 0]
        if len(pos) < k:
            for i, j in pos:
                pi[i][j] = 1.0
            for i, j in zero:
                pi[i][j] = (k - len(pos)) / len(zero)
            continue
        capped: set = set()
        while True:
            rest = [(i, j) for i, j in pos if (i, j) not in capped]
            s = sum(weights[i][j] for i, j in rest)
            c = (k - len(capped)) / s if s > 0 else 0.0
            new = {(i, j) for i, j in rest if c * weights[i][j] >= 1.0}
            if not new:
                break
            capped |= new
        for i, j in pos:
            pi[i][j] = 1.0 if (i, j) in capped else min(1.0, c * weights[i][j])
    return pi


# ---------------------------------------------------------------- taxonomy

def quantile(values, q):
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return f32(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def classify(h, d, mask, te=0.5, td=0.5, mode="quantile"):
    rows = len(mask)
    valid = [(i, j) for i in range(rows) for j in range(len(mask[i])) if mask[i][j]]
    if mode == "quantile":
        if valid:
            te = quantile([h[i][j] for i, j in valid], te)
            td = quantile([d[i][j] for i, j in valid], td)
    else:  # thresholds are compared in float32, like the signals
        te, td = f32(te), f32(td)
    out = [[0] * len(mask[i]) for i in range(rows)]
    for i, j in valid:
        hi_h, hi_d = h[i][j] > te, d[i][j] > td
        out[i][j] = 1 if (hi_h and hi_d) else 2 if hi_h else 3 if hi_d else 4
    return out


def quadrant_stats(q, d, mask, keep=None):
    counts = [0.0] * 4
    mass = [0.0] * 4
    kept = [0.0] * 4
    for i in range(len(mask)):
        for j in range(len(mask[i])):
            if not mask[i][j]:
                continue
            c = q[i][j] - 1
            counts[c] += 1
            mass[c] += abs(d[i][j])
            if keep is not None and keep[i][j]:
                kept[c] += 1
    out = {}
    for name, vals in (("share", counts), ("divergence_share", mass), ("kept_share", kept)):
        if name == "kept_share" and keep is None:
            continue
        tot = sum(vals)
        for n in range(4):
            out[f"q{n + 1}_{name}"] = vals[n] / tot if tot > 0 else 0.0
    return out


# ---------------------------------------------------------------- test data helpers

def ragged_mask(batch, seq, generator, *, empty_rows=(), holes=True):
    """Random ragged response mask [B, T] (bool tensor): random lengths, optional tool-output holes
    in the middle of some rows (multi-turn), and the listed rows left empty."""
    import torch

    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for i in range(batch):
        length = int(torch.randint(1, seq + 1, (1,), generator=generator))
        mask[i, :length] = True
        if holes and length >= 4 and bool(torch.rand((), generator=generator) < 0.5):
            start = int(torch.randint(1, length - 2, (1,), generator=generator))
            stop = min(length - 1, start + int(torch.randint(1, 4, (1,), generator=generator)))
            mask[i, start:stop] = False
    for i in empty_rows:
        mask[i] = False
    return mask
