"""Scaling-law fits: how the final loss of a run depends on parameters N, tokens D and compute C.

Kaplan et al. (2020) fit each variable alone, L = (X_c / X)^alpha: a straight line in log-log.
Chinchilla (Hoffmann et al. 2022) asks how to split a budget C = 6ND between N and D, three ways:
(1) take the best run at each budget and fit N_opt ~ C^a, D_opt ~ C^b; (2) fit a parabola to loss
against log N at each budget (an IsoFLOP profile) and use its vertex; (3) fit L = E + A/N^alpha +
B/D^beta to all runs, then minimise it under 6ND = C. Units throughout: N in parameters, D in
tokens, C in FLOPs, loss in nats per token.

Beside this module: ``csv_io`` reads runs from a CSV, ``bootstrap`` gives intervals,
``report`` runs every fit and writes fit.json, ``forecast`` sizes and scores a larger run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.optimize
from threadpoolctl import threadpool_limits

from jaxllm.core.errors import ConfigError

# Training FLOPs per parameter per token: 2 in the forward pass, 4 in the backward pass.
FLOPS_PER_PARAM_TOKEN = 6.0
# Chinchilla's Huber threshold on log-loss residuals: so small that the fit is nearly least
# absolute deviations, which keeps a few bad runs from dragging the law.
HUBER_DELTA = 1e-3
# Runs whose log10(C) lie within this of a profile's centre share a budget (+-12% in FLOPs):
# published budgets are only approximately equal, and sweeps space budgets >= 0.3 dex apart.
ISOFLOP_TOLERANCE_DEX = 0.05
# A parabola through 3 model sizes fits exactly whatever their noise; 5 leave two to average it out.
MIN_PROFILE_SIZES = 5
MIN_BUDGETS = 2  # a power law N_opt ~ C^a has two parameters
MIN_ENVELOPE_POINTS = 2  # and so has a Kaplan law
MIN_LAW_RUNS = 6  # approach 3 has five parameters; it needs more runs than that


def start_grid(
    a: Sequence[float], b: Sequence[float], e: Sequence[float], alpha: Sequence[float], beta: Sequence[float]
) -> np.ndarray:
    """All combinations of starting values, shape [S, 5] in the order (a, b, e, alpha, beta)."""
    return np.array(list(itertools.product(a, b, e, alpha, beta)), dtype=np.float64)


# The Chinchilla paper's grid (its appendix D.2): 4500 starts.
PAPER_STARTS = start_grid(
    a=np.arange(0, 30, 5),
    b=np.arange(0, 30, 5),
    e=np.arange(-1, 1.5, 0.5),
    alpha=np.arange(0, 2.5, 0.5),
    beta=np.arange(0, 2.5, 0.5),
)
# A coarse grid for bootstrap refits, where a few hundred fits must stay fast: 32 starts.
BOOTSTRAP_STARTS = start_grid(a=(5, 10), b=(5, 10), e=(0, 1), alpha=(0.3, 1), beta=(0.3, 1))


# --- Runs: the data every fit takes --------------------------------------------------------------


@dataclass(frozen=True)
class Runs:
    """Final results of a study's training runs; every array has shape [runs], float64, all entries > 0."""

    N: np.ndarray  # parameters
    D: np.ndarray  # training tokens
    C: np.ndarray  # training FLOPs
    loss: np.ndarray  # final loss, nats per token

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, idx: np.ndarray) -> Runs:
        """The runs at integer indices or boolean mask ``idx`` (repeats allowed: bootstrap)."""
        return Runs(self.N[idx], self.D[idx], self.C[idx], self.loss[idx])


def make_runs(N: np.ndarray, loss: np.ndarray, D: np.ndarray | None = None, C: np.ndarray | None = None) -> Runs:
    """Validated :class:`Runs` from arrays of shape [runs]; the missing one of D, C is C = 6ND."""
    if D is None and C is None:
        raise ConfigError("runs need tokens D or FLOPs C (D = C / 6N when only C is given)")
    arrays = {"N": N, "loss": loss, "D": D, "C": C}
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items() if v is not None}
    shapes = {k: v.shape for k, v in arrays.items()}
    if len(set(shapes.values())) != 1 or arrays["N"].ndim != 1:
        raise ConfigError(f"runs need 1-D arrays of one length, got shapes {shapes}")
    for name, x in arrays.items():
        bad = np.flatnonzero(~(np.isfinite(x) & (x > 0)))
        if bad.size:
            raise ConfigError(f"{name} must be finite and > 0, but run {bad[0]} has {name} = {x[bad[0]]}")
    N = arrays["N"]
    D = arrays["D"] if "D" in arrays else arrays["C"] / (FLOPS_PER_PARAM_TOKEN * N)
    C = arrays["C"] if "C" in arrays else FLOPS_PER_PARAM_TOKEN * N * D
    return Runs(N=N, D=D, C=C, loss=arrays["loss"])


# --- Power laws in log-log: Kaplan, and the N_opt ~ C^a fits of approaches 1 and 2 ----------------


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * x ** exponent."""

    exponent: float
    coefficient: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.coefficient * np.asarray(x, dtype=np.float64) ** self.exponent


def fit_power_law(x: np.ndarray, y: np.ndarray, what: str, need: int = MIN_BUDGETS) -> PowerLaw:
    """Least squares of log y on log x over points of shape [K]; ``what`` names the fit in errors."""
    if len(x) < need:
        raise ConfigError(f"{what} needs at least {need} points, got {len(x)}")
    if np.ptp(np.log(x)) == 0:
        raise ConfigError(f"{what} needs points at different x, all {len(x)} are at {x[0]:.4g}")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(exponent=float(slope), coefficient=float(np.exp(intercept)))


@dataclass(frozen=True)
class KaplanLaw:
    """L = (X_c / X) ** alpha, fitted to ``points`` runs on the loss envelope."""

    alpha: float
    X_c: float
    points: int

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return (self.X_c / np.asarray(x, dtype=np.float64)) ** self.alpha


def lower_envelope(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Boolean mask [runs] of runs with lower loss than every run at smaller or equal x.

    Kaplan's laws describe loss when X is the only bottleneck; in a sweep the nearest thing is the
    best loss reached with at most that X (for X = C this is his compute-efficient frontier).
    """
    order = np.lexsort((loss, x))  # by x, ties by loss: a tie's best run comes first
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], loss[order][:-1]]))
    mask = np.zeros(len(x), dtype=bool)
    mask[order] = loss[order] < best_before
    return mask


def fit_kaplan(x: np.ndarray, loss: np.ndarray, what: str) -> KaplanLaw:
    """Kaplan's L = (X_c / X)^alpha through the lower envelope of runs [runs]; log L is linear in log X."""
    on = lower_envelope(x, loss)
    law = fit_power_law(x[on], loss[on], f"Kaplan {what} (on the loss envelope)", need=MIN_ENVELOPE_POINTS)
    alpha = -law.exponent
    # log L = alpha log X_c - alpha log X, so the intercept log(coefficient) is alpha log X_c.
    with np.errstate(over="ignore", divide="ignore"):
        X_c = float(np.exp(np.log(law.coefficient) / alpha))
    return KaplanLaw(alpha=alpha, X_c=X_c, points=int(on.sum()))


# --- Chinchilla approaches 1 and 2: IsoFLOP profiles -----------------------------------------------


def isoflop_groups(C: np.ndarray, tolerance_dex: float = ISOFLOP_TOLERANCE_DEX) -> list[np.ndarray]:
    """Runs [runs] grouped by budget: lists of indices, each within ``tolerance_dex`` of its centre.

    Greedy from the densest budget: its centre is the run with most neighbours within the tolerance,
    so groups sit on the budgets a sweep used rather than on arbitrary bin edges. Sorted by C.
    """
    log_c = np.log10(C)
    near = np.abs(log_c[:, None] - log_c[None, :]) <= tolerance_dex  # [runs, runs]
    free = np.ones(len(C), dtype=bool)
    groups = []
    while free.any():
        counts = np.where(free, near[:, free].sum(axis=1), -1)
        members = np.flatnonzero(near[np.argmax(counts)] & free)
        groups.append(members)
        free[members] = False
    return sorted(groups, key=lambda g: float(np.mean(log_c[g])))


def profile_groups(runs: Runs) -> list[np.ndarray]:
    """The budget groups (index arrays, sorted by C) that sample enough model sizes to be profiles."""
    return [g for g in isoflop_groups(runs.C) if len(np.unique(runs.N[g])) >= MIN_PROFILE_SIZES]


@dataclass(frozen=True)
class Allocation:
    """Compute-optimal allocation N_opt = k_N C^a, D_opt = k_D C^b, and the [K] points it was fitted to."""

    N_opt: PowerLaw
    D_opt: PowerLaw
    C: np.ndarray  # [K] FLOPs
    N: np.ndarray  # [K] parameters
    D: np.ndarray  # [K] tokens

    @property
    def a(self) -> float:
        return self.N_opt.exponent

    @property
    def b(self) -> float:
        return self.D_opt.exponent


def _allocation(C: np.ndarray, N: np.ndarray, D: np.ndarray, what: str) -> Allocation:
    if len(C) < MIN_BUDGETS:
        raise ConfigError(
            f"{what} needs at least {MIN_BUDGETS} compute budgets with >= {MIN_PROFILE_SIZES} model sizes each "
            f"(runs within {ISOFLOP_TOLERANCE_DEX} dex of FLOPs count as one budget), found {len(C)}"
        )
    return Allocation(
        N_opt=fit_power_law(C, N, f"{what} N_opt ~ C^a"),
        D_opt=fit_power_law(C, D, f"{what} D_opt ~ C^b"),
        C=C,
        N=N,
        D=D,
    )


def fit_approach1(runs: Runs) -> Allocation:
    """Approach 1: the lowest-loss run of each budget (the envelope), then N_opt ~ C^a, D_opt ~ C^b.

    The paper takes the envelope over whole training curves; with only final losses, the best run
    per budget is what is left, so N_opt moves in steps of the sweep's model sizes.
    """
    best = np.array([g[np.argmin(runs.loss[g])] for g in profile_groups(runs)], dtype=int)
    return _allocation(runs.C[best], runs.N[best], runs.D[best], "approach 1")


@dataclass(frozen=True)
class Profile:
    """One IsoFLOP profile: runs at one budget and the parabola loss = p0 x^2 + p1 x + p2 through them.

    x = ln N - centre; centring keeps the least squares well conditioned (ln N is ~20).
    """

    C: float  # budget, FLOPs: geometric mean of its runs' C
    runs: np.ndarray  # [R] indices into the Runs it came from
    centre: float  # mean ln N of its runs
    parabola: np.ndarray  # [3] coefficients (p0, p1, p2), as np.polyfit returns them
    skipped: str | None  # why the vertex is not used as N_opt; None when it is

    def loss_at(self, N: np.ndarray | float) -> np.ndarray:
        """The parabola's loss at N parameters, nats per token."""
        return np.polyval(self.parabola, np.log(N) - self.centre)

    @property
    def N_opt(self) -> float:
        """Parameters at the parabola's vertex."""
        p0, p1, _ = self.parabola
        return float(np.exp(self.centre - p1 / (2 * p0)))

    @property
    def D_opt(self) -> float:
        """Tokens at the vertex: D = C / 6N."""
        return self.C / (FLOPS_PER_PARAM_TOKEN * self.N_opt)

    @property
    def loss_min(self) -> float:
        return float(self.loss_at(self.N_opt))


def fit_profiles(runs: Runs) -> list[Profile]:
    """A parabola in ln N through each budget with enough model sizes, sorted by C; unusable ones say why."""
    profiles = []
    for g in profile_groups(runs):
        log_N = np.log(runs.N[g])
        centre = float(log_N.mean())
        x = log_N - centre
        parabola = np.polyfit(x, runs.loss[g], 2)
        p0, p1, _ = parabola
        if p0 <= 0:
            skipped = "loss is not convex in log N"
        elif not x.min() <= -p1 / (2 * p0) <= x.max():
            # A vertex outside the sampled sizes is an extrapolation, not a measured optimum.
            skipped = "minimum lies outside the model sizes run"
        else:
            skipped = None
        C = float(np.exp(np.mean(np.log(runs.C[g]))))
        profiles.append(Profile(C=C, runs=g, centre=centre, parabola=parabola, skipped=skipped))
    return profiles


def fit_approach2(profiles: list[Profile]) -> Allocation:
    """Approach 2: power laws N_opt ~ C^a and D_opt ~ C^b through the usable profiles' vertices."""
    used = [p for p in profiles if p.skipped is None]
    C = np.array([p.C for p in used])
    N = np.array([p.N_opt for p in used])
    return _allocation(C, N, C / (FLOPS_PER_PARAM_TOKEN * N), "approach 2")


# --- Chinchilla approach 3: the parametric law -----------------------------------------------------


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, and its compute-optimal allocation under C = 6ND."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
        """Predicted loss, nats per token, broadcasting N and D."""
        N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def a(self) -> float:
        """N_opt ~ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ~ C^b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """N_opt = G (C/6)^a: setting dL/dN = 0 along N D = C/6 gives alpha A / N^alpha = beta B / D^beta."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def optimal_N(self, C: np.ndarray | float) -> np.ndarray:
        """Compute-optimal parameters for C FLOPs."""
        return self.G * (np.asarray(C, np.float64) / FLOPS_PER_PARAM_TOKEN) ** self.a

    def optimal_D(self, C: np.ndarray | float) -> np.ndarray:
        """Compute-optimal tokens for C FLOPs."""
        return np.asarray(C, np.float64) / (FLOPS_PER_PARAM_TOKEN * self.optimal_N(C))


def huber_objective(
    theta: np.ndarray, log_N: np.ndarray, log_D: np.ndarray, log_loss: np.ndarray, delta: float = HUBER_DELTA
) -> tuple[float, np.ndarray]:
    """Sum over runs [runs] of Huber(log L_pred - log L), and its gradient [5].

    ``theta`` = (a, b, e, alpha, beta) with A = exp(a), B = exp(b), E = exp(e), so that
    log L_pred = logsumexp(a - alpha log N, b - beta log D, e): positive A, B, E for free, and the
    three terms are summed without overflow.
    """
    a, b, e, alpha, beta = theta
    # the three terms [runs] one by one: stacking them cost a third of each call (fits call this ~200 times a start)
    t_n, t_d = a - alpha * log_N, b - beta * log_D
    top = np.maximum(np.maximum(t_n, t_d), e)
    w_n, w_d, w_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = w_n + w_d + w_e
    residual = top + np.log(total) - log_loss  # [runs]
    size = np.abs(residual)
    value = np.where(size <= delta, 0.5 * residual * residual, delta * (size - 0.5 * delta)).sum()
    # d log L_pred / d term_k is the softmax weight of term k.
    g = np.clip(residual, -delta, delta) / total
    g_n, g_d = g * w_n, g * w_d
    grad = np.array([g_n.sum(), g_d.sum(), (g * w_e).sum(), -(g_n @ log_N), -(g_d @ log_D)])
    return float(value), grad


def fit_chinchilla(
    runs: Runs, starts: np.ndarray = PAPER_STARTS, delta: float = HUBER_DELTA, E: float | None = None
) -> tuple[ChinchillaLaw, float]:
    """Approach 3: L-BFGS from each of ``starts`` [S, 5], keep the lowest Huber objective.

    Returns the law and its objective. Tolerances are tight because the objective is tiny (residuals
    ~1e-2 times delta 1e-3): scipy's defaults stop far from the minimum. ``E`` given fixes the
    irreducible loss (a corpus of known entropy rate) and fits the other four parameters: a handful
    of budgets leaves E poorly determined, and a free E may fall below what any model can reach.
    """
    bounds = None
    if E is not None:  # equal bounds pin e = log E; the starts' e column then only repeats starts
        bounds = [(None, None)] * 2 + [(math.log(E), math.log(E))] + [(None, None)] * 2
        starts = np.unique(np.column_stack([starts[:, :2], np.full(len(starts), math.log(E)), starts[:, 3:]]), axis=0)
    if len(runs) < MIN_LAW_RUNS:
        raise ConfigError(f"approach 3 fits 5 parameters and needs at least {MIN_LAW_RUNS} runs, got {len(runs)}")
    data = (np.log(runs.N), np.log(runs.D), np.log(runs.loss), delta)
    best_value, best_theta = np.inf, None
    # L-BFGS-B calls BLAS on vectors of 5: more threads only add synchronisation, which on a busy
    # machine costs many times the work itself.
    with threadpool_limits(limits=1, user_api="blas"):
        for start in starts:
            result = scipy.optimize.minimize(
                huber_objective,
                start,
                args=data,
                jac=True,
                method="L-BFGS-B",
                bounds=bounds,
                options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-10},
            )
            # log A, log B, log E beyond ~700 overflow a float: a degenerate fit, not a law.
            if np.isfinite(result.fun) and result.fun < best_value and np.all(result.x[:3] < 700):
                best_value, best_theta = result.fun, result.x
    if best_theta is None:
        raise ConfigError(f"approach 3 found no finite fit from {len(starts)} starting points")
    a, b, e, alpha, beta = (float(v) for v in best_theta)
    return ChinchillaLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta), float(best_value)
