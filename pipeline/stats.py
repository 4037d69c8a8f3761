"""Intervals for the comparison: percentile bootstrap over evaluation windows (perplexity) or items (accuracy), and
paired bootstrap differences between two nodes scored on the same windows / items.

Perplexity of a set of equal-length windows is exp(mean of the per-window mean NLL), so resampling windows and
recomputing that gives its interval; a paired difference resamples the same window indices for both nodes, which
removes the (large) variation between windows that both nodes share.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BOOT = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float
    lo: float
    hi: float

    @property
    def significant(self) -> bool:
        """For a difference: the interval excludes 0."""
        return self.lo > 0 or self.hi < 0

    def as_list(self) -> list[float]:
        return [round(self.estimate, 4), round(self.lo, 4), round(self.hi, 4)]


def _indices(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(N_BOOT, n))


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    a = (1 - LEVEL) / 2
    lo, hi = np.quantile(samples, [a, 1 - a])
    return float(lo), float(hi)


def _ppl(nll: np.ndarray) -> np.ndarray:
    return np.exp(nll.mean(axis=-1))


def ppl_interval(nll: list[float], seed: int = 0) -> Interval:
    """Perplexity and its bootstrap interval from per-window mean NLLs."""
    x = np.asarray(nll, dtype=np.float64)
    return Interval(float(_ppl(x)), *_percentiles(_ppl(x[_indices(len(x), seed)])))


def mean_interval(items: list[float], seed: int = 0) -> Interval:
    """A mean (accuracy from 0/1 items) and its bootstrap interval."""
    x = np.asarray(items, dtype=np.float64)
    return Interval(float(x.mean()), *_percentiles(x[_indices(len(x), seed)].mean(axis=1)))


def paired_ppl_diff(nll_a: list[float], nll_b: list[float], seed: int = 0) -> Interval:
    """ppl(b) - ppl(a) on the same windows, with a paired bootstrap interval."""
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired difference needs the same windows ({a.shape} vs {b.shape})")
    idx = _indices(len(a), seed)
    return Interval(float(_ppl(b) - _ppl(a)), *_percentiles(_ppl(b[idx]) - _ppl(a[idx])))


def paired_mean_diff(items_a: list[float], items_b: list[float], seed: int = 0) -> Interval:
    """mean(b) - mean(a) on the same items (accuracy difference), with a paired bootstrap interval."""
    a, b = np.asarray(items_a, dtype=np.float64), np.asarray(items_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired difference needs the same items ({a.shape} vs {b.shape})")
    idx = _indices(len(a), seed)
    return Interval(float(b.mean() - a.mean()), *_percentiles(b[idx].mean(axis=1) - a[idx].mean(axis=1)))


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0
