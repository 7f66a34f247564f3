"""fit.json: every fit of one set of runs, with bootstrap intervals, as a document, a table and back.

``fit_with_intervals`` runs Kaplan's three laws and Chinchilla's three approaches and their
bootstraps; ``fit_report`` is the fit.json document (``scaling.py fit`` writes it), ``format_table``
prints it, and ``read_fit``/``laws_from_report``/``approach3_draws`` read it back for ``predict``
and ``forecast``. Approach 3's bootstrap draws are stored whole, not only as intervals, so that a
forecast can give an interval for the loss of any run without refitting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.core.errors import ConfigError, DataError
from jaxllm.core.fileio import read_json
from jaxllm.scaling import bootstrap as sb
from jaxllm.scaling.laws import (
    BOOTSTRAP_STARTS,
    PAPER_STARTS,
    Allocation,
    ChinchillaLaw,
    KaplanLaw,
    PowerLaw,
    Profile,
    Runs,
    fit_approach1,
    fit_approach2,
    fit_chinchilla,
    fit_kaplan,
    fit_profiles,
)

STARTS = {"paper": PAPER_STARTS, "coarse": BOOTSTRAP_STARTS}
LAW_KEYS = ("E", "A", "B", "alpha", "beta")
APPROACH3_KEYS = (*LAW_KEYS, "a", "b", "G")


@dataclass(frozen=True)
class ScalingFit:
    """Every fit of one set of runs. Approaches 1 and 2 need IsoFLOP profiles; without, they are None."""

    kaplan: dict[str, KaplanLaw]  # "N", "D", "C": L(N), L(D), L(C); absent when skipped
    approach1: Allocation | None
    profiles: list[Profile]
    approach2: Allocation | None
    approach3: ChinchillaLaw
    objective: float  # approach 3's Huber objective at its minimum
    skipped: dict[str, str]  # "kaplan_N"/.../"approach1"/"approach2": why it could not be fitted

    def parameters(self) -> dict[str, float]:
        """Every fitted number under a flat name such as ``approach3.alpha``: what bootstrap resamples."""
        out = {}
        for name, law in self.kaplan.items():
            out[f"kaplan_{name}.alpha"], out[f"kaplan_{name}.X_c"] = law.alpha, law.X_c
        for name, alloc in (("approach1", self.approach1), ("approach2", self.approach2)):
            if alloc is not None:
                out[f"{name}.a"], out[f"{name}.b"] = alloc.a, alloc.b
        law = self.approach3
        for key in ("E", "A", "B", "alpha", "beta", "a", "b", "G"):
            out[f"approach3.{key}"] = getattr(law, key)
        return out


def fit_all(runs: Runs, starts: np.ndarray = PAPER_STARTS, E: float | None = None) -> ScalingFit:
    """Kaplan's three laws and Chinchilla's three approaches on the same runs.

    Kaplan's laws and approaches 1 and 2 are skipped (with the reason) rather than fatal: runs that
    are not an IsoFLOP sweep, such as an N x D grid, still get Kaplan's laws and approach 3.
    """
    approach3, objective = fit_chinchilla(runs, starts, E=E)
    profiles = fit_profiles(runs)
    skipped, kaplan = {}, {}
    for name, x in zip("NDC", (runs.N, runs.D, runs.C)):
        try:  # an envelope of one run (the smallest N is also the best) has no slope to fit
            kaplan[name] = fit_kaplan(x, runs.loss, f"L({name})")
        except ConfigError as e:
            skipped[f"kaplan_{name}"] = str(e)
    approach1 = approach2 = None
    try:
        approach1 = fit_approach1(runs)
    except ConfigError as e:
        skipped["approach1"] = str(e)
    try:
        approach2 = fit_approach2(profiles)
    except ConfigError as e:
        skipped["approach2"] = str(e)
    return ScalingFit(kaplan, approach1, profiles, approach2, approach3, objective, skipped)


@dataclass(frozen=True)
class FitSettings:
    """What ``scaling.py fit`` was asked: recorded in fit.json beside the numbers."""

    csv: str
    columns: dict[str, str | None]  # role (params, tokens, flops, loss) -> column name
    drop_highest_loss: int = 0
    resamples: int = 100  # bootstrap resamples; 0 = no intervals
    seed: int = 0
    starts: str = "paper"  # a key of STARTS
    entropy_rate: float | None = None  # the true irreducible loss, when known
    fix_E: bool = False  # approach 3's E fixed at entropy_rate, not fitted

    def __post_init__(self) -> None:
        if self.resamples < 0:
            raise ConfigError(f"--bootstrap must be >= 0, got {self.resamples}")
        if self.fix_E and self.entropy_rate is None:
            raise ConfigError("--fix-E fixes approach 3's E at the true entropy rate: give it with --entropy-rate RATE")
        rate = self.entropy_rate
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ConfigError(f"--entropy-rate must be a loss in nats/token > 0, got {rate:g}")

    def check_runs(self, runs: Runs) -> None:
        """The entropy rate, a loss no model can beat, must lie below every run's loss."""
        lowest = float(np.min(runs.loss))
        if self.entropy_rate is not None and self.entropy_rate >= lowest:
            raise ConfigError(
                f"--entropy-rate {self.entropy_rate:g} is at or above the lowest loss in {self.csv} "
                f"({lowest:.4g}): no run can beat the entropy rate; check the rate and the loss column"
            )

    @property
    def fixed_E(self) -> float | None:
        return self.entropy_rate if self.fix_E else None


def fit_with_intervals(
    runs: Runs, settings: FitSettings, progress: Callable[[Iterable[int]], Iterable[int]] = iter
) -> tuple[ScalingFit, dict[str, sb.Interval], dict[str, list[float]]]:
    """Every fit of ``runs``, the 95% intervals of its numbers, and the bootstrap draws of each number."""
    fit = fit_all(runs, STARTS[settings.starts], settings.fixed_E)
    if not settings.resamples:
        return fit, {}, {}
    draws = sb.bootstrap_draws(
        runs,
        lambda r: fit_all(r, BOOTSTRAP_STARTS, settings.fixed_E).parameters(),
        settings.resamples,
        settings.seed,
        progress,
    )
    found = sb.intervals(draws)
    for name, alloc in (("approach1", fit.approach1), ("approach2", fit.approach2)):
        if alloc is not None:  # one point per budget: resample the budgets, not the runs
            found.update(sb.bootstrap_allocation(alloc, name, settings.resamples, settings.seed))
    return fit, found, draws


def fit_report(
    fit: ScalingFit, found: dict[str, sb.Interval], draws: dict[str, list[float]], runs: Runs, settings: FitSettings
) -> dict[str, Any]:
    """The fit.json document: per approach its parameters with 95% intervals, and the exponents a, b."""

    def entry(name: str, value: float) -> dict[str, Any]:
        interval = found.get(name)
        return {"value": value, "ci95": None if interval is None else [interval.low, interval.high]}

    def samples(prefix: str) -> int:
        return max((iv.samples for name, iv in found.items() if name.startswith(prefix)), default=0)

    report: dict[str, Any] = {
        "data": {
            "csv": settings.csv,
            "runs": len(runs),
            "dropped_highest_loss": settings.drop_highest_loss,
            "columns": settings.columns,
        },
        "bootstrap": {
            "resamples": settings.resamples,
            "seed": settings.seed,
            "percentiles": list(sb.PERCENTILES),
            "starts": len(BOOTSTRAP_STARTS),
        },
        "kaplan": {f"L({x})": _kaplan_entry(x, fit, entry, samples) for x in "NDC"},
    }
    for name, alloc in (("approach1", fit.approach1), ("approach2", fit.approach2)):
        report[name] = _allocation_entry(name, alloc, fit.skipped, entry, samples)
    report["approach2_profiles"] = [
        {
            "C": p.C,
            "runs": len(p.runs),
            "N_opt": p.N_opt,
            "D_opt": p.D_opt,
            "loss_min": p.loss_min,
            "skipped": p.skipped,
        }
        for p in fit.profiles
    ]
    params = fit.parameters()
    report["approach3"] = {
        "law": "L = E + A / N^alpha + B / D^beta; N_opt = G (C/6)^a, D_opt = C / (6 N_opt)",
        **{key: entry(f"approach3.{key}", params[f"approach3.{key}"]) for key in APPROACH3_KEYS},
        "huber_objective": fit.objective,
        "starts": len(STARTS[settings.starts]),
        "E_fixed": settings.fix_E,
        "bootstrap_fits": samples("approach3."),
        "bootstrap_draws": {key: draws.get(f"approach3.{key}", []) for key in LAW_KEYS},
    }
    if settings.entropy_rate is not None:
        report["approach3"]["true_entropy_rate"] = settings.entropy_rate
        report["approach3"]["E_minus_entropy_rate"] = params["approach3.E"] - settings.entropy_rate
    return _finite(report)


def _kaplan_entry(x: str, fit: ScalingFit, entry: Callable, samples: Callable) -> dict[str, Any]:
    law = fit.kaplan.get(x)
    if law is None:
        return {"skipped": fit.skipped[f"kaplan_{x}"]}
    return {
        "law": f"L = ({x}_c / {x})^alpha",
        "alpha": entry(f"kaplan_{x}.alpha", law.alpha),
        "X_c": entry(f"kaplan_{x}.X_c", law.X_c),
        "envelope_runs": law.points,
        "bootstrap_fits": samples(f"kaplan_{x}."),
    }


def _allocation_entry(
    name: str, alloc: Allocation | None, skipped: dict[str, str], entry: Callable, samples: Callable
) -> dict[str, Any]:
    if alloc is None:
        return {"skipped": skipped[name]}
    how = {"approach1": "lowest-loss run of each budget", "approach2": "vertex of a parabola in log N per budget"}
    return {
        "method": how[name],
        "law": "N_opt = N_coefficient * C^a, D_opt = D_coefficient * C^b",
        "a": entry(f"{name}.a", alloc.a),
        "b": entry(f"{name}.b", alloc.b),
        "N_coefficient": alloc.N_opt.coefficient,
        "D_coefficient": alloc.D_opt.coefficient,
        "budgets": [{"C": c, "N_opt": n, "D_opt": d} for c, n, d in zip(alloc.C, alloc.N, alloc.D)],
        "bootstrap_fits": samples(f"{name}."),
    }


def format_table(report: dict[str, Any]) -> str:
    """The fitted numbers of a fit.json document as an aligned text table."""
    data = report["data"]
    dropped = f", {data['dropped_highest_loss']} highest-loss dropped" if data["dropped_highest_loss"] else ""
    lines = [
        (
            f"{data['runs']} runs from {data['csv']}{dropped}; "
            f"95% intervals from {report['bootstrap']['resamples']} bootstrap resamples"
        ),
        "",
        f"{'fit':<14}{'parameter':<11}{'value':>12}   95% interval",
    ]

    def row(fit: str, name: str, entry: dict[str, Any]) -> None:
        ci = entry["ci95"]
        interval = "" if ci is None else f"[{_num(ci[0])}, {_num(ci[1])}]"
        lines.append(f"{fit:<14}{name:<11}{_num(entry['value']):>12}   {interval}")

    for name, law in report["kaplan"].items():
        if "skipped" in law:
            lines.append(f"{'Kaplan ' + name:<14}skipped: {law['skipped']}")
            continue
        row(f"Kaplan {name}", "alpha", law["alpha"])
        row("", f"{name[2]}_c", law["X_c"])
    for name in ("approach1", "approach2"):
        title = f"Chinchilla {name[-1]}"
        if "skipped" in report[name]:
            lines.append(f"{title:<14}skipped: {report[name]['skipped']}")
            continue
        row(title, "a (N~C^a)", report[name]["a"])
        row("", "b (D~C^b)", report[name]["b"])
    a3 = report["approach3"]
    for i, key in enumerate(APPROACH3_KEYS):
        row("Chinchilla 3" if i == 0 else "", key, a3[key])
    if "true_entropy_rate" in a3:
        rate, gap = a3["true_entropy_rate"], a3["E_minus_entropy_rate"]
        lines.append(
            f"{'':<14}{'true rate':<11}{_num(rate):>12}   E - rate = {gap:+.4f} nats/token ({gap / rate:+.1%})"
        )
    used = sum(p["skipped"] is None for p in report["approach2_profiles"])
    lines.append(f"\nIsoFLOP profiles: {used} of {len(report['approach2_profiles'])} budgets used by approach 2")
    return "\n".join(lines)


# --- reading fit.json back ---------------------------------------------------------------------------


def read_fit(path: Path) -> dict[str, Any]:
    """A fit.json document (a missing or unreadable file is a one-line DataError)."""
    return read_json(path, "fit file")


def laws_from_report(report: dict[str, Any], path: Path) -> tuple[ChinchillaLaw, tuple[PowerLaw, PowerLaw] | None]:
    """Approach 3's law, and approach 2's N_opt and D_opt power laws (None if skipped), from fit.json;
    every number finite and the law's inside its domain (E >= 0; A, B, alpha, beta > 0)."""
    try:
        law = ChinchillaLaw(**{k: _number(report["approach3"][k]["value"], f"approach3 {k}", path) for k in LAW_KEYS})
        a2 = report.get("approach2", {})
        approach2 = None
        if "a" in a2:
            approach2 = (
                PowerLaw(_number(a2["a"]["value"], "approach2 a", path), _number(a2["N_coefficient"], "a", path)),
                PowerLaw(_number(a2["b"]["value"], "approach2 b", path), _number(a2["D_coefficient"], "b", path)),
            )
    except (KeyError, TypeError, AttributeError):
        raise DataError(f"{path} is not a fit written by `scaling.py fit`: no approach3 E, A, B, alpha, beta") from None
    _check_domain(law, path)
    return law, approach2


def _number(value: Any, what: str, path: Path) -> float:
    """``value`` as a float, refused unless it is a finite JSON number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{path}: {what} is {value!r}, not a finite number; rerun `scaling.py fit` on its CSV")
    return float(value)


def _check_domain(law: ChinchillaLaw, path: Path) -> None:
    bad = [k for k in LAW_KEYS[1:] if getattr(law, k) <= 0] + (["E"] if law.E < 0 else [])
    if bad:
        raise DataError(
            f"{path}: approach 3's law has {bad[0]} = {getattr(law, bad[0]):g}, "
            "outside L = E + A/N^alpha + B/D^beta's domain "
            "(E >= 0; A, B, alpha, beta > 0); no compute-optimal size follows from it"
        )


def approach3_draws(report: dict[str, Any], path: Path) -> list[ChinchillaLaw]:
    """Approach 3's law refitted on each bootstrap resample, as stored in fit.json (a draw with a
    non-finite number, stored as null, is dropped; any other non-number is refused)."""
    stored = report.get("approach3", {}).get("bootstrap_draws") or {}
    columns = [stored.get(k) or [] for k in LAW_KEYS] if isinstance(stored, dict) else []
    if not all(isinstance(c, list) and c for c in columns) or len({len(c) for c in columns}) != 1:
        raise DataError(
            f"{path} holds no bootstrap draws of approach 3 (written with --bootstrap 0, or before "
            "forecasts existed); rerun `scaling.py fit` on its CSV"
        )
    rows = [row for row in zip(*columns) if None not in row]
    draws = [ChinchillaLaw(*(_number(v, "a bootstrap draw", path) for v in row)) for row in rows]
    if not draws:
        raise DataError(f"{path}: every bootstrap draw of approach 3 is non-finite; rerun `scaling.py fit`")
    return draws


def _finite(value: Any) -> Any:
    """The document with non-finite floats as None: JSON has no inf or NaN (a law with alpha <= 0)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"
