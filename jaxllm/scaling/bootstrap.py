"""Bootstrap intervals of scaling-law fits: refit on resamples, take percentiles.

Approach 3 and Kaplan's laws resample runs; approaches 1 and 2, which reduce each budget to one
point, resample budgets. The draws themselves (one fitted value per resample) are kept beside the
intervals: a forecast turns approach 3's draws into an interval of the loss it predicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from jaxllm.scaling.laws import MIN_BUDGETS, Allocation, Runs, fit_power_law

PERCENTILES = (2.5, 97.5)


@dataclass(frozen=True)
class Interval:
    """Percentile interval of one parameter over the bootstrap resamples where its fit succeeded."""

    low: float
    high: float
    samples: int


def bootstrap_draws(
    runs: Runs,
    fit: Callable[[Runs], dict[str, float]],
    samples: int,
    seed: int,
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> dict[str, list[float]]:
    """Refit on ``samples`` resamples of the runs (drawn with replacement, seeded); each name's values.

    ``fit`` maps runs to named parameters; a name it leaves out of a resample (a fit that needs
    profiles the resample lacks) just has fewer values. ``progress`` wraps the loop (e.g. tqdm).
    """
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in progress(range(samples)):
        resample = runs.take(rng.integers(0, len(runs), size=len(runs)))
        for name, value in fit(resample).items():
            values.setdefault(name, []).append(value)
    return values


def intervals(draws: dict[str, list[float]], percentiles: tuple[float, float] = PERCENTILES) -> dict[str, Interval]:
    """The percentile interval of each name's draws."""
    return {
        name: Interval(*(float(q) for q in np.percentile(v, percentiles)), samples=len(v))
        for name, v in draws.items()
        if v
    }


def bootstrap_allocation(
    alloc: Allocation, name: str, samples: int, seed: int, percentiles: tuple[float, float] = PERCENTILES
) -> dict[str, Interval]:
    """Intervals of ``{name}.a`` and ``{name}.b`` by resampling the budgets (one compute-optimal point
    each, shape [K]) with replacement and refitting the two power laws.

    Approaches 1 and 2 reduce each budget to one point, so the budgets are the cases to resample:
    resampling runs instead leaves most budgets with too few distinct sizes for a profile (a sweep
    runs ~5 per budget). Resamples with fewer than two distinct budgets are skipped.
    """
    rng = np.random.default_rng(seed)
    fits: dict[str, list[float]] = {f"{name}.a": [], f"{name}.b": []}
    for _ in range(samples):
        pick = rng.integers(0, len(alloc.C), size=len(alloc.C))
        if len(np.unique(alloc.C[pick])) < MIN_BUDGETS:
            continue
        fits[f"{name}.a"].append(fit_power_law(alloc.C[pick], alloc.N[pick], name).exponent)
        fits[f"{name}.b"].append(fit_power_law(alloc.C[pick], alloc.D[pick], name).exponent)
    return intervals(fits, percentiles)
