"""Small-sample statistics for the benchmark tables: sample std, t-intervals, paired differences.

Every interval is a two-sided Student-t interval for a mean, ``mean ± t_{1-α/2, n-1} · sd / √n``,
with ``sd`` the sample standard deviation (ddof = 1). The t quantile comes from
``scipy.stats.t.ppf`` (scipy is a dependency of bdgf).

Paired differences: a variant and the reference (``full``) are run with the same seeds, so
``variant − full`` is formed per matched seed key (e.g. (pretraining seed, classifier seed)) and
the interval is taken over those differences; the seed-to-seed variation they share cancels.

>>> d = paired_difference({(0, 0): 0.91, (0, 1): 0.92}, {(0, 0): 0.90, (0, 1): 0.90})
>>> round(d.mean, 3), d.n
(0.015, 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np
from scipy import stats as _scipy_stats


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1); NaN for fewer than 2 values (undefined)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"sample_std needs a non-empty 1-D sequence, got shape {x.shape}")
    return float(x.std(ddof=1)) if x.size >= 2 else math.nan


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (e.g. t(0.975, 2) = 4.303)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(_scipy_stats.t.ppf(p, df))


@dataclass(frozen=True)
class MeanInterval:
    """Mean of n values with its two-sided t-interval (low, high are NaN when n < 2)."""

    n: int
    mean: float
    sd: float  # sample std, ddof = 1
    half_width: float
    level: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (False when it is undefined)."""
        return bool(self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "sd": self.sd, "low": self.low, "high": self.high,
                "level": self.level, "excludes_zero": self.excludes_zero}


def mean_interval(values: Sequence[float], level: float = 0.95) -> MeanInterval:
    """Mean and two-sided ``level`` t-interval of ``values`` (n - 1 degrees of freedom)."""
    x = np.asarray(values, dtype=np.float64)
    sd = sample_std(x)
    n = int(x.size)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n) if n >= 2 else math.nan
    return MeanInterval(n=n, mean=float(x.mean()), sd=sd, half_width=half, level=level)


def paired_values(variant: Mapping[Hashable, float], reference: Mapping[Hashable, float]) -> list[tuple]:
    """[(key, variant − reference)] over the keys both hold, in sorted key order.

    Raises ValueError when they share no key (nothing can be paired)."""
    common = sorted(set(variant) & set(reference))
    if not common:
        raise ValueError(f"no matched keys to pair: variant has {sorted(variant)}, reference {sorted(reference)}")
    return [(k, float(variant[k]) - float(reference[k])) for k in common]


def paired_difference(variant: Mapping[Hashable, float], reference: Mapping[Hashable, float],
                      level: float = 0.95) -> MeanInterval:
    """t-interval of the mean paired difference ``variant − reference`` over matched keys."""
    return mean_interval([d for _, d in paired_values(variant, reference)], level)


def clustered_paired_difference(variant: Mapping[tuple, float], reference: Mapping[tuple, float],
                                level: float = 0.95) -> MeanInterval:
    """The conservative version for nested seeds: the paired differences are first averaged within
    each cluster (the first element of the key, e.g. the pretraining seed), then the t-interval
    is taken over the cluster means (n = number of clusters). Use it when runs that share a
    pretraining seed are not independent of each other."""
    by_cluster: dict = {}
    for key, d in paired_values(variant, reference):
        by_cluster.setdefault(key[0], []).append(d)
    return mean_interval([float(np.mean(v)) for _, v in sorted(by_cluster.items())], level)


__all__ = ["sample_std", "t_quantile", "MeanInterval", "mean_interval", "paired_values",
           "paired_difference", "clustered_paired_difference"]
