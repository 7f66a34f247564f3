"""Forecasts: the loss of a run larger than any in a sweep, said before training it, then scored.

For a budget C, approach 3's law L = E + A/N^alpha + B/D^beta (fitted to the sweep's runs, read
from fit.json) gives the compute-optimal N_opt. The run takes the shape of the sweep's own family
nearest to N_opt in log N: the sweep's ladder ``sweep.shapes`` with the gaps between its rungs filled
one head's width at a time, continued past its largest model at the same depth in the same steps.
Its steps give D = C / 6N tokens with the shape's own N (the sweep's counting,
``flops.param_counts()["matmul"]``), and the rest of its config is the
sweep's (``sweep.json``), as a sweep run of that shape would be. The predicted loss is the law at
that run's N and D, and its 95% interval the same from each bootstrap refit of the law stored in
fit.json. The interval is the fit's uncertainty given the sweep's runs; it knows nothing of the
seed-to-seed noise of the one run trained, nor of a law whose form is wrong beyond the sweep.

Files in the forecast's folder: ``config.yaml`` (a train.py config of the run), ``forecast.json``
(``{"compute", "config", "run", "predicted": {"loss", "ci95", ...}, "approach2", "actual"}``,
``actual`` null until trained) and ``forecast.png``; the run itself in ``runs/<name>``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.core.config import INT32_MAX, Config, from_dict, save_config, to_dict
from jaxllm.core.errors import ConfigError, DataError
from jaxllm.core.fileio import read_json, write_json
from jaxllm.model import flops
from jaxllm.scaling.bootstrap import PERCENTILES
from jaxllm.scaling.csv_io import load_runs
from jaxllm.scaling.laws import FLOPS_PER_PARAM_TOKEN, ChinchillaLaw, PowerLaw
from jaxllm.scaling.report import approach3_draws, laws_from_report, read_fit
from jaxllm.scaling.run_manager import study_folder, train_once
from jaxllm.scaling.sweep import (
    HEAD_SIZE,
    MIN_STEPS,
    Shape,
    SweepConfig,
    parse_budgets,
    parse_shapes,
    run_config,
    shape_model,
    vocab_size,
)
from jaxllm.train import run_dir

FORECAST = "forecast.json"
MAX_D_MODEL = 1 << 16  # the widest model a forecast plans: the family grows one head at a time up to it


@dataclass(frozen=True)
class Sweep:
    """The sweep a fit came from: its config and the folder holding sweep.json and results.csv."""

    cfg: SweepConfig
    folder: Path
    entropy_rate: float | None = None  # the corpus's true irreducible loss, nats/token, when known


@dataclass(frozen=True)
class Plan:
    """The run a budget asks for, and the loss approach 3 predicts for it."""

    compute: float  # the budget asked for, FLOPs
    shape: Shape
    N: int  # parameters of the FLOP count
    steps: int
    D: int  # tokens: steps x tokens per step
    N_opt: float  # approach 3's compute-optimal parameters and tokens for ``compute``
    D_opt: float
    loss: float  # approach 3 at (N, D), nats per token
    ci95: tuple[float, float]  # the same over the bootstrap refits of the law
    frontier_loss: float  # approach 3 at (N_opt, D_opt)

    @property
    def C(self) -> float:
        """FLOPs of the run as planned: 6 N D."""
        return FLOPS_PER_PARAM_TOKEN * self.N * self.D


def find_sweep(fit_path: Path, report: dict[str, Any]) -> Sweep:
    """The sweep beside fit.json, or beside the CSV it was fitted to (``fit --out`` elsewhere)."""
    for folder in (fit_path.parent, Path(report.get("data", {}).get("csv", "")).parent):
        if (folder / "sweep.json").is_file():
            meta = read_json(folder / "sweep.json", "sweep record")
            rate = meta.get("entropy_rate")
            rate = float(rate) if isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0 else None
            return Sweep(from_dict(meta.get("config", {}), SweepConfig), folder, rate)
    raise DataError(
        f"no sweep.json beside {fit_path} or its CSV: a forecast builds its run from the config of "
        "the sweep that was fitted (`scaling.py sweep --fit`)"
    )


def check_budget(C: float, budgets: list[float]) -> None:
    """A forecast extrapolates upwards: C must exceed the sweep's smallest budget."""
    if not (math.isfinite(C) and C > 0):
        raise ConfigError(f"--compute must be a FLOP count > 0, got {C:g}")
    if C <= min(budgets):
        raise ConfigError(
            f"--compute {C:.3g} is at or below the sweep's smallest budget {min(budgets):.3g} FLOPs; "
            "a forecast is for a larger run"
        )


def shape_family(ladder: list[Shape], count: Callable[[Shape], int], N_target: float) -> list[Shape]:
    """The sweep's ladder, its gaps filled one head wider at a time at the depth of the smaller rung, then
    its largest model's depth at widths growing by one head until N >= N_target.

    The fill is there because a sweep's ladder is coarse (1x96 to 1x128 is 1.75x in N): the nearest rung
    can be 30% off N_opt, and a run off the frontier tests the law away from where the forecast is made.
    """
    rungs = sorted(ladder, key=count)
    family = list(ladder)
    for small, big in itertools.pairwise(rungs):
        widths = range(small.d_model + HEAD_SIZE, big.d_model, HEAD_SIZE)
        family += [
            s
            for s in (Shape(small.n_layer, w) for w in widths)
            if count(small) < count(s) < count(big) and s not in family
        ]
    largest = rungs[-1]
    shape = largest
    while count(shape) < N_target:
        if shape.d_model >= MAX_D_MODEL:
            raise ConfigError(
                f"approach 3's N_opt = {N_target:.3g} needs a {largest.n_layer}-layer model wider than "
                f"d_model {MAX_D_MODEL}, beyond any run this sweep's family can plan; forecast a smaller budget"
            )
        shape = Shape(largest.n_layer, shape.d_model + HEAD_SIZE)
        family.append(shape)
    return family


def plan(
    law: ChinchillaLaw,
    draws: list[ChinchillaLaw],
    C: float,
    ladder: list[Shape],
    count: Callable[[Shape], int],
    tokens_per_step: int,
) -> Plan:
    """The run for budget ``C``: the family's shape nearest N_opt in log N, trained on D = C / 6N tokens."""
    N_opt, D_opt = float(law.optimal_N(C)), float(law.optimal_D(C))
    if not (math.isfinite(N_opt) and N_opt > 0):
        raise ConfigError(
            f"approach 3's law (alpha {law.alpha:.3g}, beta {law.beta:.3g}) has no compute-optimal "
            "model size to forecast with; see the fit's table"
        )
    _check_steps(C, D_opt / tokens_per_step)
    shape = min(shape_family(ladder, count, N_opt), key=lambda s: abs(math.log(count(s) / N_opt)))
    N = count(shape)
    steps = round(C / (FLOPS_PER_PARAM_TOKEN * N) / tokens_per_step)
    if steps < MIN_STEPS:
        raise ConfigError(
            f"--compute {C:.3g} gives the {shape.n_layer}x{shape.d_model} model (N={N}) only {steps} "
            f"steps; a forecast needs at least {MIN_STEPS}"
        )
    _check_steps(C, steps)
    D = steps * tokens_per_step
    spread = [float(d.loss(N, D)) for d in draws]
    low, high = (float(q) for q in np.percentile(spread, PERCENTILES))
    return Plan(
        compute=C,
        shape=shape,
        N=N,
        steps=steps,
        D=D,
        N_opt=N_opt,
        D_opt=D_opt,
        loss=float(law.loss(N, D)),
        ci95=(low, high),
        frontier_loss=float(law.loss(N_opt, D_opt)),
    )


def _check_steps(C: float, steps: float) -> None:
    """A forecast's run must fit train.steps (at most INT32_MAX), checked before any shape is sized."""
    if not steps <= INT32_MAX:
        raise ConfigError(
            f"--compute {C:.3g} asks for about {steps:.3g} training steps, beyond train.steps' limit of "
            f"{INT32_MAX}; forecast a smaller budget"
        )


@dataclass(frozen=True)
class Forecast:
    """Everything one forecast needs, read and checked before anything is written."""

    fit_path: Path
    law: ChinchillaLaw  # approach 3 as fitted
    draws: list[ChinchillaLaw]  # approach 3 refitted on each bootstrap resample
    sweep: Sweep
    plan: Plan
    run_cfg: Config  # train.py's config of the run, in out/runs/<name>
    approach2: dict[str, Any] | None
    out: Path


def prepare(fit_path: Path, C: float, out: Path | None) -> Forecast:
    """The forecast for budget ``C`` from ``fit_path``, into ``out`` (default ``FIT_DIR/forecast-C<C>``)."""
    report = read_fit(fit_path)
    law, approach2 = laws_from_report(report, fit_path)
    draws = approach3_draws(report, fit_path)
    sweep = find_sweep(fit_path, report)
    cfg = sweep.cfg
    check_budget(C, parse_budgets(cfg.sweep.budgets))
    vocab, t = vocab_size(cfg), cfg.train

    def count(shape: Shape) -> int:
        return flops.param_counts(shape_model(cfg.model, shape, vocab, t.seq_len))["matmul"]

    out = out if out is not None else fit_path.parent / f"forecast-C{C:.3g}".replace("+", "")
    run_dir.check_kind(out, "forecast", "--out")
    p = plan(law, draws, C, parse_shapes(cfg.sweep.shapes), count, t.batch_size * t.grad_accum * t.seq_len)
    run_cfg = run_config(cfg, p.shape, p.steps, out / "runs" / run_name(p))
    return Forecast(fit_path, law, draws, sweep, p, run_cfg, _approach2(approach2, C, law), out)


def run_name(p: Plan) -> str:
    return f"C{p.compute:.3g}-L{p.shape.n_layer}-d{p.shape.d_model}".replace("+", "")


def _approach2(laws: tuple[PowerLaw, PowerLaw] | None, C: float, law: ChinchillaLaw) -> dict[str, Any] | None:
    """Approach 2's allocation for C, and approach 3's loss there: a second opinion on the run's size."""
    if laws is None:
        return None
    N, D = float(laws[0](C)), float(laws[1](C))
    return {"N_opt": N, "D_opt": D, "approach3_loss_there": float(law.loss(N, D))}


def run_record(p) -> dict[str, Any]:
    """The planned run's name, shape, size, tokens, FLOPs and steps, as forecast.json records them."""
    fields = {"n_layer": p.shape.n_layer, "d_model": p.shape.d_model, "N": p.N, "D": p.D, "C": p.C}
    return {"name": run_name(p), **fields, "steps": p.steps}


def train_run(f: Forecast, devices: list | None = None) -> dict[str, Any]:
    """Trains the planned run in ``out/runs/<name>`` under ``out``'s lock (a finished one is read back)."""
    p = f.plan
    with study_folder(f.out, "another forecast"):
        return train_once(f.run_cfg, run_record(p), devices=devices)


def document(f: Forecast, result: dict[str, Any] | None) -> dict[str, Any]:
    """forecast.json: the budget, the run's config, the prediction, and the actual loss once trained."""
    p = f.plan
    low, high = p.ci95
    actual = None
    if result is not None:
        loss = result["loss"] if math.isfinite(result["loss"]) else None  # None: diverged (JSON has no NaN)
        actual = {
            "loss": loss,
            "train_loss": result["train_loss"] if loss is not None else None,
            "diverged": result["diverged"],
            "relative_error": None if loss is None else (p.loss - loss) / loss,
            "in_ci95": loss is not None and low <= loss <= high,
        }
    return {
        "compute": p.compute,
        "fit": str(f.fit_path),
        "config": to_dict(f.run_cfg),
        "run": run_record(p),
        "predicted": {
            "loss": p.loss,
            "ci95": [low, high],
            "approach": 3,
            "N_opt": p.N_opt,
            "D_opt": p.D_opt,
            "frontier_loss": p.frontier_loss,
        },
        "approach2": f.approach2,
        "entropy_rate": f.sweep.entropy_rate,
        "actual": actual,
    }


def write(f: Forecast, doc: dict[str, Any]) -> list[Path]:
    """config.yaml, forecast.json and forecast.png in the forecast's folder; returns their paths."""
    from jaxllm.scaling.plots import plot_forecast  # matplotlib: slow to import, only here

    f.out.mkdir(parents=True, exist_ok=True)
    paths = [f.out / "config.yaml", f.out / FORECAST, f.out / "forecast.png"]
    save_config(f.run_cfg, paths[0])
    write_json(paths[1], doc)
    plot_forecast(load_runs(f.sweep.folder / "results.csv"), f.law, f.draws, doc, paths[2])
    return paths


def summary(doc: dict[str, Any]) -> str:
    """Two or three lines: the run, the prediction, and the score once trained."""
    r, pred = doc["run"], doc["predicted"]
    low, high = pred["ci95"]
    lines = [
        (
            f"forecast for C = {doc['compute']:.3g} FLOPs: {r['n_layer']}x{r['d_model']} model, N = {r['N']:,} "
            f"(approach 3's N_opt = {pred['N_opt']:,.0f}), D = {r['D']:,} tokens, {r['steps']} steps"
        ),
        f"predicted final loss {pred['loss']:.4f} nats/token, 95% interval [{low:.4f}, {high:.4f}]",
    ]
    rate = doc.get("entropy_rate")
    if rate is not None and min(pred["loss"], low) < rate:
        lines.append(
            f"warning: the prediction goes below the corpus's entropy rate {rate:.4f} nats/token, a loss no "
            "model can reach: the law is extrapolated past its validity (more budgets, or fit --fix-E)"
        )
    actual = doc["actual"]
    if actual is not None:
        if actual["loss"] is None:
            lines.append("actual: the run diverged (loss NaN/Inf)")
        else:
            inside = "inside" if actual["in_ci95"] else "outside"
            lines.append(
                f"actual final loss {actual['loss']:.4f}: predicted - actual = "
                f"{100 * actual['relative_error']:+.2f}% of it, {inside} the interval"
            )
    return "\n".join(lines)
