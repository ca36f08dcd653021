"""What the quantization guard judges int8 candidates on: the held-out part of the calibration feeds,
the fidelity of a candidate's outputs against fp32 on them, and a site's own SQNR."""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

import numpy as np

from ...errors import CalibrationError


def split_feeds(feeds: List[dict], holdout: float) -> Tuple[List[dict], List[dict]]:
    """(fit, check): the last `holdout` share of the feeds (at least one) is held out; a single feed
    is split along its batch axis instead."""
    n = len(feeds)
    if n >= 2:
        k = min(n - 1, max(1, int(round(n * holdout))))
        return feeds[:n - k], feeds[n - k:]
    feed = feeds[0]
    batch = {a.shape[0] if a.ndim else 1 for a in feed.values()}
    b = batch.pop() if len(batch) == 1 else 1
    if b < 2:
        raise CalibrationError("the accuracy guard holds out part of the calibration data and one feed of one "
                               "sample cannot be split: give more samples (or tolerance=None, autotune=False)")
    k = min(b - 1, max(1, int(round(b * holdout))))
    return [{k_: a[:b - k] for k_, a in feed.items()}], [{k_: a[b - k:] for k_, a in feed.items()}]


@dataclasses.dataclass
class Fidelity:
    cosine: float  # the worst output's
    top1: Optional[float]  # argmax agreement over rows of 2-D outputs (classifier logits); None without any
    score: Optional[float] = None  # eval_fn's, when given

    def text(self) -> str:
        s = f"cosine {self.cosine:.5f}"
        if self.top1 is not None:
            s += f", top-1 agreement {self.top1:.4f}"
        if self.score is not None:
            s += f", eval_fn {self.score:.5g}"
        return s


def fidelity(ref: List[List[np.ndarray]], got: List[List[np.ndarray]]) -> Fidelity:
    """Fidelity of outputs `got` against `ref` (per feed, per output)."""
    cos, agree, rows = 1.0, 0, 0
    for i in range(len(ref[0])):
        a = np.concatenate([np.asarray(r[i], np.float64).ravel() for r in ref])
        b = np.concatenate([np.asarray(g[i], np.float64).ravel() for g in got])
        if a.size == 0:
            continue
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        c = float(a @ b / denom) if denom > 0 else float(np.allclose(a, b))
        cos = min(cos, c if np.isfinite(c) else -1.0)
        for r, g in zip(ref, got):
            x, y = np.asarray(r[i]), np.asarray(g[i])
            if x.ndim == 2 and x.shape[-1] > 1 and x.dtype.kind == "f":
                agree += int(np.sum(x.argmax(-1) == y.argmax(-1)))
                rows += x.shape[0]
    return Fidelity(cos, agree / rows if rows else None)


def sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)
