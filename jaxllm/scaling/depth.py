"""The depth study: why deep transformers need residual connections, and where the LayerNorm goes.

Stacks of ``depth.layers`` blocks are trained four ways: with and without the residual stream
(``model.residual``), with pre-LN and post-LN (``model.norm_position``); same width, data, steps and
seed. Without residuals every block's output is the next block's only input, so the gradient
reaching layer 0 is a product of L Jacobians: it vanishes (or explodes) as L grows and the deep
stacks stop learning. With residuals each block adds to an identity path and the gradient reaches
every layer directly. Post-LN normalises after the addition, which rescales that identity path at
every block; its gradients fall off towards the input as depth grows, the reason pre-LN (GPT-2
onwards) trains deep stacks without a careful warm-up.

Figures: ``depth_loss.png`` (final validation loss, and the ratio of layer 0's to layer L-1's
gradient norm, against depth) and ``depth_grad_norms.png`` (per-layer gradient norms early in
training, one panel per variant, one line per depth). Per-layer norms come from
``metrics.jsonl``'s ``layer_grad_norms``, logged every ``log.every`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.core.config import Config, option, validate
from jaxllm.core.errors import ConfigError
from jaxllm.core.fileio import atomic_write, read_jsonl
from jaxllm.scaling.run_manager import run_in_order, study_folder, study_run_config, train_once, write_csv

# The first this share of logged steps is "early training", where vanishing gradients show before
# the optimizer has adapted to them.
EARLY_SHARE = 0.2
COLUMNS = (
    "variant",
    "residual",
    "norm_position",
    "n_layer",
    "loss",
    "train_loss",
    "diverged",
    "grad_first_layer",
    "grad_last_layer",
    "grad_ratio",
)


@dataclass(frozen=True)
class Variant:
    residual: bool
    norm_position: str

    @property
    def name(self) -> str:
        return f"{self.norm_position}-LN{'' if self.residual else ', no residual'}"

    @property
    def slug(self) -> str:
        return f"{self.norm_position}{'' if self.residual else '-nores'}"


VARIANTS = (Variant(True, "pre"), Variant(True, "post"), Variant(False, "pre"), Variant(False, "post"))


@dataclass
class DepthSection:
    layers: str = option("2,4,8,16,32", "stack depths to train, comma-separated")


@dataclass
class DepthConfig(Config):
    """Training sections (as train.py) plus ``depth``; model.n_layer/residual/norm_position are set per run."""

    depth: DepthSection = field(default_factory=DepthSection)


@dataclass(frozen=True)
class DepthRun:
    name: str
    variant: Variant
    n_layer: int


def parse_layers(text: str) -> list[int]:
    """``"2,4,8"`` -> sorted distinct positive depths."""
    try:
        layers = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise ConfigError(f"depth.layers={text!r} must be layer counts separated by commas, e.g. 2,4,8") from None
    if not layers or layers[0] <= 0:
        raise ConfigError(f"depth.layers={text!r}: every depth must be a positive layer count")
    return layers


def depth_plan(cfg: DepthConfig) -> list[DepthRun]:
    """Every (variant, depth) run, checked before anything trains: shallow stacks first."""
    layers = parse_layers(cfg.depth.layers)
    validate(cfg)
    return [DepthRun(f"{v.slug}-L{n}", v, n) for n in layers for v in VARIANTS]


def run_config(cfg: DepthConfig, run: DepthRun, run_dir: Path) -> Config:
    """The train.py config of one run: the run's depth, residual and norm position, set up as every
    study's run is (:func:`run_manager.study_run_config`)."""
    model = dataclasses.replace(
        cfg.model, n_layer=run.n_layer, residual=run.variant.residual, norm_position=run.variant.norm_position
    )
    return study_run_config(cfg, run_dir, cfg.train.steps, model)


def layer_norms(metrics_path: Path) -> dict[str, list[float]]:
    """Per-layer gradient norms from metrics.jsonl: mean over early logged steps, and the last logged."""
    records = read_jsonl(metrics_path, "metrics log") if metrics_path.is_file() else []  # absent: diverged at once
    logged = [r["layer_grad_norms"] for r in records if "layer_grad_norms" in r]
    if not logged:
        return {"grad_early": [], "grad_last": []}
    norms_stepsxL = np.array(logged)
    early = max(1, round(EARLY_SHARE * len(logged)))
    return {"grad_early": norms_stepsxL[:early].mean(axis=0).tolist(), "grad_last": norms_stepsxL[-1].tolist()}


def run_study(
    cfg: DepthConfig,
    runs: list[DepthRun],
    out: Path,
    progress: Callable[[list, int, int], Iterable] | None = None,
    devices: list | None = None,
) -> list[dict[str, Any]]:
    """Trains ``runs`` into ``out/runs`` on ``devices`` (default all; finished runs are skipped) under
    ``out``'s lock, and returns one row per run."""
    by_name = {r.name: r for r in runs}
    with study_folder(out, "another depth study") as runs_dir:
        results = run_in_order(
            list(by_name), runs_dir, lambda name: _train(cfg, by_name[name], runs_dir, devices), progress
        )
    return [_row(run, results[run.name]) for run in runs]


def _train(cfg: DepthConfig, run: DepthRun, runs_dir: Path, devices: list | None) -> dict[str, Any]:
    record = {
        "variant": run.variant.name,
        "residual": run.variant.residual,
        "norm_position": run.variant.norm_position,
        "n_layer": run.n_layer,
    }
    measure = lambda run_dir: layer_norms(run_dir / "metrics.jsonl")
    return train_once(run_config(cfg, run, runs_dir / run.name), record, measure, devices)


def _row(run: DepthRun, result: dict[str, Any]) -> dict[str, Any]:
    early = result["grad_early"]
    first, last = (early[0], early[-1]) if early else (math.nan, math.nan)
    return {
        "variant": run.variant.name,
        "residual": run.variant.residual,
        "norm_position": run.variant.norm_position,
        "n_layer": run.n_layer,
        "loss": result["loss"],
        "train_loss": result["train_loss"],
        "diverged": result["diverged"],
        "grad_first_layer": first,
        "grad_last_layer": last,
        "grad_ratio": first / last if last > 0 else math.nan,
        "grad_early": early,
        "grad_last": result["grad_last"],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Final loss and the layer-0 / layer-(L-1) gradient ratio per variant and depth."""
    lines = [f"{'variant':<22}{'layers':>7}{'val loss':>10}{'grad L0':>11}{'grad L-1':>11}{'L0/(L-1)':>10}"]
    for r in rows:
        loss = "diverged" if r["diverged"] else f"{r['loss']:.4f}"
        lines.append(
            f"{r['variant']:<22}{r['n_layer']:>7}{loss:>10}{r['grad_first_layer']:>11.3g}"
            f"{r['grad_last_layer']:>11.3g}{r['grad_ratio']:>10.3g}"
        )
    return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """depth.csv, depth.json and the two figures; returns their paths."""
    write_csv(out / "depth.csv", COLUMNS, rows)
    atomic_write(out / "depth.json", json.dumps(rows, indent=1) + "\n")  # NaN kept: a diverged run's loss
    paths = [out / "depth.csv", out / "depth.json", out / "depth_loss.png", out / "depth_grad_norms.png"]
    plot_loss(rows, paths[2])
    plot_grad_norms(rows, paths[3])
    return paths


# --- figures -----------------------------------------------------------------------------------------

STYLE = {
    "pre-LN": ("tab:blue", "-"),
    "post-LN": ("tab:orange", "-"),
    "pre-LN, no residual": ("tab:blue", "--"),
    "post-LN, no residual": ("tab:orange", "--"),
}


def plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: final validation loss against depth per variant (x: diverged). Right: gradient norm of
    layer 0 over layer L-1 early in training, against depth (1 = the gradient reaches the input
    layer undiminished)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5), layout="constrained")
    ax_loss, ax_ratio = fig.subplots(1, 2)
    top = max((r["loss"] for r in rows if math.isfinite(r["loss"])), default=1.0)
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v.name]
        color, ls = STYLE[v.name]
        L = [r["n_layer"] for r in mine]
        ax_loss.plot(L, [r["loss"] for r in mine], color=color, ls=ls, marker="o", label=v.name)
        bad = [r["n_layer"] for r in mine if r["diverged"]]
        ax_loss.scatter(bad, [top] * len(bad), color=color, marker="x", s=60)
        ax_ratio.plot(L, [r["grad_ratio"] for r in mine], color=color, ls=ls, marker="o", label=v.name)
    for ax in (ax_loss, ax_ratio):
        ax.set_xscale("log", base=2)
        depths = sorted({r["n_layer"] for r in rows})
        ax.set_xticks(depths, labels=[str(n) for n in depths])
        ax.set_xlabel("layers")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=9)
    ax_loss.set_ylabel("final validation loss (nats/token)")
    ax_loss.set_title("Final loss against depth (x: diverged)")
    ax_ratio.set_yscale("log")
    ax_ratio.axhline(1.0, color="0.5", lw=1)
    ax_ratio.set_ylabel("grad norm of layer 0 / grad norm of layer L-1")
    ax_ratio.set_title(f"Does the gradient reach the first layer? (first {EARLY_SHARE:.0%} of training)")
    fig.suptitle("Depth study: same width, data and steps; residual connections and LayerNorm position varied")
    fig.savefig(path, dpi=120)


def plot_grad_norms(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per variant: gradient norm of each layer (x: layer index, input side left) early in
    training, one line per depth, on a shared log scale."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9), layout="constrained")
    axes = fig.subplots(2, 2, sharey=True).ravel()
    depths = sorted({r["n_layer"] for r in rows})
    cmap = colormaps["viridis"]
    for ax, v in zip(axes, VARIANTS):
        for r in (r for r in rows if r["variant"] == v.name and r["grad_early"]):
            color = cmap(depths.index(r["n_layer"]) / max(len(depths) - 1, 1))
            label = f"{r['n_layer']} layers" + (" (diverged)" if r["diverged"] else "")
            ax.plot(np.arange(r["n_layer"]), r["grad_early"], color=color, marker=".", label=label)
        ax.set_yscale("log")
        ax.set_title(v.name)
        ax.set_xlabel("layer (0 = next to the embedding)")
        ax.set_ylabel("gradient norm of the layer's weights")
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"Per-layer gradient norms, mean over the first {EARLY_SHARE:.0%} of logged steps")
    fig.savefig(path, dpi=120)
