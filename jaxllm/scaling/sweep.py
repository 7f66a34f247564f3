"""IsoFLOP sweeps: for each compute budget C, several model sizes N, each trained on D = C / (6 N) tokens.

Counting. N is the N of the FLOP count, ``flops.param_counts(...)["matmul"]``: every weight matrix
that multiplies activations, the output projection included (PaLM's and Chinchilla's 6 N D), and
the budget is C = 6 N D with that same N, so ``results.csv`` satisfies D = C / (6 N) exactly and
`scaling.py fit` sees the numbers the runs were planned with. Kaplan's non-embedding count, which
leaves the output projection out, is the ``N_nonembed`` column. For byte-level models a few dozen
wide the output projection (256 x d_model) is as large as the blocks: counted Kaplan's way, the
smallest models would get that compute for free and every IsoFLOP profile would favour them. The
attention term of PaLM's count (12 L D T per token, :mod:`jaxllm.model.flops`) is not in C; the
``C_palm`` column has it.

Planning. Each budget trains ``sweep.sizes`` consecutive shapes of the ladder ``sweep.shapes``,
centred on the N where D / N = ``sweep.tokens_per_param`` (Chinchilla's ~20), so that the loss
minimum falls inside the sizes run. Steps = D / (batch_size x grad_accum x seq_len), rounded; the
recorded D is the tokens actually trained and C = 6 N D from it. The learning-rate schedule spans
exactly those steps (the optimizer's schedule length is ``train.steps``), with
``min(optim.warmup_steps, steps / 10)`` warmup.

Running. ``jaxllm.scaling.run_manager`` trains each run in ``OUT/runs/<name>`` under ``OUT``'s lock and
skips finished ones on a rerun. ``results.csv`` is rewritten after every run, so an interrupted
sweep still leaves its finished rows; ``sweep.json`` beside it records the config, which is how a
forecast (``jaxllm.scaling.forecast``) builds a larger run of the same family.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxllm.core.config import Config, ModelConfig, option, resolve_model, to_dict, validate
from jaxllm.core.errors import ConfigError
from jaxllm.core.fileio import write_json
from jaxllm.data import synthetic
from jaxllm.model import flops
from jaxllm.scaling.laws import FLOPS_PER_PARAM_TOKEN, MIN_PROFILE_SIZES
from jaxllm.scaling.run_manager import run_in_order, study_folder, study_run_config, train_once, write_csv

HEAD_SIZE = 8  # every shape of the ladder uses heads of 8 dimensions: n_head = d_model / 8
MIN_STEPS = 20  # fewer optimizer steps than this is warm-up only, not a trained model
COLUMNS = (
    "name",
    "budget",
    "n_layer",
    "d_model",
    "n_head",
    "N",
    "N_nonembed",
    "N_total",
    "D",
    "C",
    "C_palm",
    "steps",
    "loss",
    "train_loss",
)


@dataclass
class SweepSection:
    budgets: str = option("6e10,2e11,6e11", "compute budgets C = 6 N D in FLOPs, comma-separated")
    sizes: int = option(5, "model sizes per budget (consecutive shapes of the ladder); >= 5 for an IsoFLOP parabola")
    tokens_per_param: float = option(
        300.0,
        "each budget's sizes are centred on the N with D / N = this "
        "(Chinchilla: 20; byte-level models of ~10k parameters want far more)",
    )
    shapes: str = option(
        "2x8,1x16,2x16,3x16,2x24,2x32,3x32,2x48,2x64,3x64,4x96,4x128",
        "the model shapes, n_layer x d_model, comma-separated; n_head = d_model / 8",
    )


@dataclass
class SweepConfig(Config):
    """Training sections (as train.py) plus ``sweep``; the model shape and steps are set per run."""

    sweep: SweepSection = field(default_factory=SweepSection)


@dataclass(frozen=True)
class Shape:
    n_layer: int
    d_model: int

    @property
    def n_head(self) -> int:
        return self.d_model // HEAD_SIZE


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid. ``D`` = steps x tokens_per_step, ``C`` = 6 ``N`` ``D``."""

    name: str
    budget: float  # the budget asked for, FLOPs
    shape: Shape
    N: int  # parameters of the FLOP count: weight matrices, output projection included
    N_nonembed: int  # Kaplan's: without token and position embeddings (and a tied output projection)
    N_total: int
    steps: int
    D: int  # tokens trained
    C: float  # FLOPs, 6 N D
    C_palm: float  # FLOPs by PaLM's count: flops_per_token x D


# --- the grid, as pure functions ---------------------------------------------------------------------


def parse_budgets(text: str) -> list[float]:
    """``"1e11,3e11"`` -> sorted budgets; each must be a number > 0, and distinct."""
    try:
        budgets = sorted(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"sweep.budgets={text!r} must be FLOP counts separated by commas, e.g. 1e11,3e11") from None
    if not budgets or not all(math.isfinite(c) and c > 0 for c in budgets):
        raise ConfigError(f"sweep.budgets={text!r}: every budget must be a finite FLOP count > 0")
    if len(set(budgets)) != len(budgets):
        raise ConfigError(f"sweep.budgets={text!r} lists a budget twice")
    return budgets


def parse_shapes(text: str) -> list[Shape]:
    """``"2x64,4x128"`` -> shapes; d_model must be a positive multiple of the head size."""
    shapes = []
    for item in text.split(","):
        layers, _, width = item.strip().partition("x")
        if not (layers.isdigit() and width.isdigit() and int(layers) > 0 and int(width) > 0):
            raise ConfigError(f"sweep.shapes: {item!r} must look like n_layer x d_model, e.g. 2x64")
        if int(width) % HEAD_SIZE:
            raise ConfigError(f"sweep.shapes: d_model {width} of {item!r} is not a multiple of head size {HEAD_SIZE}")
        shapes.append(Shape(int(layers), int(width)))
    if len(set(shapes)) != len(shapes):
        raise ConfigError(f"sweep.shapes={text!r} lists a shape twice")
    return shapes


def shaped(base: ModelConfig, shape: Shape) -> ModelConfig:
    """``base`` with the shape's depth, width and heads; MLP width and key/value heads follow (0 = automatic)."""
    return dataclasses.replace(
        base, n_layer=shape.n_layer, d_model=shape.d_model, n_head=shape.n_head, d_ff=0, n_kv_head=0
    )


def shape_model(base: ModelConfig, shape: Shape, vocab_size: int, seq_len: int) -> ModelConfig:
    """:func:`shaped`, with the sizes that depend on the tokenizer and context resolved (for counting)."""
    return resolve_model(shaped(base, shape), vocab_size, seq_len)


def size_window(N_ladder: list[int], centre: float, sizes: int) -> range:
    """Indices of ``sizes`` consecutive ladder entries (sorted by N) centred in log N on ``centre``.

    At the ends of the ladder the window slides inwards rather than shrinking.
    """
    if sizes > len(N_ladder):
        raise ConfigError(f"sweep.sizes={sizes} but the ladder sweep.shapes has only {len(N_ladder)} shapes")
    nearest = min(range(len(N_ladder)), key=lambda i: abs(math.log(N_ladder[i] / centre)))
    first = min(max(nearest - (sizes - 1) // 2, 0), len(N_ladder) - sizes)
    return range(first, first + sizes)


def plan(
    budgets: list[float],
    ladder: list[tuple[Shape, ModelConfig]],
    sizes: int,
    tokens_per_param: float,
    tokens_per_step: int,
    seq_len: int,
) -> list[RunSpec]:
    """The grid: per budget, ``sizes`` shapes around sqrt(C / (6 tokens_per_param)), smallest budget first."""
    if sizes < MIN_PROFILE_SIZES:
        raise ConfigError(
            f"sweep.sizes={sizes}: an IsoFLOP parabola needs at least {MIN_PROFILE_SIZES} sizes per budget"
        )
    if tokens_per_param <= 0:
        raise ConfigError(f"sweep.tokens_per_param must be > 0, got {tokens_per_param}")
    counted = sorted(((flops.param_counts(m), shape, m) for shape, m in ladder), key=lambda t: t[0]["matmul"])
    N_ladder = [c["matmul"] for c, _, _ in counted]
    if len(set(N_ladder)) != len(N_ladder):
        raise ConfigError("sweep.shapes has two shapes with the same number of parameters")
    specs = []
    for budget in budgets:
        centre = math.sqrt(budget / (FLOPS_PER_PARAM_TOKEN * tokens_per_param))  # C = 6 N (r N)
        for i in size_window(N_ladder, centre, sizes):
            counts, shape, model_cfg = counted[i]
            N = counts["matmul"]
            steps = round(budget / (FLOPS_PER_PARAM_TOKEN * N) / tokens_per_step)
            if steps < MIN_STEPS:
                raise ConfigError(
                    f"budget {budget:g} FLOPs gives the {shape.n_layer}x{shape.d_model} model (N={N}) only {steps} "
                    f"steps of {tokens_per_step} tokens; raise the budget or shrink the batch (at least {MIN_STEPS})"
                )
            D = steps * tokens_per_step
            specs.append(
                RunSpec(
                    name=f"C{budget:.3g}-L{shape.n_layer}-d{shape.d_model}".replace("+", ""),
                    budget=budget,
                    shape=shape,
                    N=N,
                    N_nonembed=counts["non_embedding"],
                    N_total=counts["total"],
                    steps=steps,
                    D=D,
                    C=FLOPS_PER_PARAM_TOKEN * N * D,
                    C_palm=flops.flops_per_token(model_cfg, seq_len) * D,
                )
            )
    return specs


def run_config(cfg: Config, shape: Shape, steps: int, run_dir: Path) -> Config:
    """The train.py config of one run: ``cfg`` with the run's shape, steps and directory, set up as every
    study's run is (:func:`run_manager.study_run_config`), and warm-up capped at a tenth of the steps."""
    run = study_run_config(cfg, run_dir, steps, shaped(cfg.model, shape))
    return dataclasses.replace(
        run, optim=dataclasses.replace(cfg.optim, warmup_steps=min(cfg.optim.warmup_steps, steps // 10))
    )


# --- running -----------------------------------------------------------------------------------------


def vocab_size(cfg: Config) -> int:
    """The tokenizer's vocabulary for ``cfg.data`` (prepares the corpus once; cached afterwards)."""
    from jaxllm.data import corpus as data_lib

    return data_lib.load(cfg.data, cfg.train.seq_len, cfg.train.seed).tokenizer.vocab_size


def sweep_plan(cfg: SweepConfig) -> list[RunSpec]:
    """The grid of ``cfg``, checked (config, budgets, shapes, steps) before anything trains or writes."""
    s, t = cfg.sweep, cfg.train
    budgets, shapes = parse_budgets(s.budgets), parse_shapes(s.shapes)
    validate(cfg)
    vocab = vocab_size(cfg)
    ladder = [(shape, shape_model(cfg.model, shape, vocab, t.seq_len)) for shape in shapes]
    for _, m in ladder:
        validate(dataclasses.replace(cfg, model=m))
    return plan(budgets, ladder, s.sizes, s.tokens_per_param, t.batch_size * t.grad_accum * t.seq_len, t.seq_len)


def entropy_rate(source: str) -> float | None:
    """The true entropy rate (nats per character) of a synthetic source, None for real text."""
    return synthetic.entropy_rate(synthetic.parse(source)) if source.startswith("synthetic:") else None


def run_sweep(
    cfg: SweepConfig,
    specs: list[RunSpec],
    out: Path,
    progress: Callable[[list, int, int], Iterable] | None = None,
    devices: list | None = None,
) -> list[dict[str, Any]]:
    """Trains ``specs`` (from :func:`sweep_plan`) into ``out``, skipping finished runs; writes and returns
    the rows of results.csv. ``progress`` wraps the loop over runs, as in :func:`run_manager.run_in_order`."""
    with study_folder(out, "another sweep") as runs_dir:
        write_json(
            out / "sweep.json",
            {
                "runs": len(specs),
                "entropy_rate": entropy_rate(cfg.data.source),
                "counting": "N = flops.param_counts()['matmul'], C = 6 N D",
                "config": to_dict(cfg),
            },
        )
        by_name = {s.name: s for s in specs}
        rows: dict[str, dict[str, Any]] = {}

        def train_and_record(name: str) -> dict[str, Any]:
            spec = by_name[name]
            run_cfg = run_config(cfg, spec.shape, spec.steps, runs_dir / name)
            rows[name] = _row(spec, train_once(run_cfg, _record(spec), devices=devices))
            _write_results(out / "results.csv", [rows[s.name] for s in specs if s.name in rows])
            return rows[name]

        run_in_order(list(by_name), runs_dir, train_and_record, progress)
    return [rows[s.name] for s in specs]


def _record(spec: RunSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "budget": spec.budget,
        "n_layer": spec.shape.n_layer,
        "d_model": spec.shape.d_model,
        "n_head": spec.shape.n_head,
        "N": spec.N,
        "N_nonembed": spec.N_nonembed,
        "N_total": spec.N_total,
        "D": spec.D,
        "C": spec.C,
        "C_palm": spec.C_palm,
        "steps": spec.steps,
    }


def _row(spec: RunSpec, result: dict[str, Any]) -> dict[str, Any]:
    return {**_record(spec), "loss": result["loss"], "train_loss": result["train_loss"]}


def _write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    """results.csv; a diverged run (loss NaN) is left out, as no fit could use it."""
    write_csv(path, COLUMNS, [r for r in rows if math.isfinite(r["loss"])])


def describe(specs: list[RunSpec], out: Path) -> str:
    """A few lines on the grid, printed before it runs."""
    lines = [f"sweep: {len(specs)} runs into {out}; N = weight-matrix parameters (output projection in), C = 6 N D"]
    for budget in sorted({s.budget for s in specs}):
        row = [s for s in specs if s.budget == budget]
        sizes = ", ".join(f"{s.shape.n_layer}x{s.shape.d_model} N={s.N / 1e3:.0f}k {s.steps} steps" for s in row)
        lines.append(f"  C={budget:.2g}: {sizes}")
    return "\n".join(lines)
