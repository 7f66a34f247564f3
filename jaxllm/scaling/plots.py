"""PNG figures of scaling-law fits: IsoFLOP profiles, loss against N, D and C, and N_opt, D_opt against C.

Each figure is a matplotlib ``Figure`` saved through the Agg canvas: no display and no pyplot state,
so plotting from a script, a test or a headless machine behaves the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullLocator

from jaxllm.scaling.laws import ChinchillaLaw, Runs, lower_envelope
from jaxllm.scaling.report import ScalingFit

# Published exponents of N_opt ~ C^a, drawn as slopes for comparison (D_opt ~ C^(1-a)).
KAPLAN_A = 0.73
CHINCHILLA_A = 0.5
DPI = 130


def plot_all(runs: Runs, fit: ScalingFit, out_dir: Path, entropy_rate: float | None = None) -> list[Path]:
    """Draw every figure into ``out_dir``; returns the PNG paths. ``entropy_rate``: the true irreducible
    loss when known (a synthetic corpus), drawn beside approach 3's E on the IsoFLOP figure."""
    paths = [out_dir / "isoflop_profiles.png", out_dir / "loss_fits.png", out_dir / "compute_optimal.png"]
    plot_isoflop(runs, fit, paths[0], entropy_rate)
    plot_loss_fits(runs, fit, paths[1])
    plot_compute_optimal(runs, fit, paths[2])
    return paths


def plot_isoflop(runs: Runs, fit: ScalingFit, path: Path, entropy_rate: float | None = None) -> None:
    """Loss against N at each compute budget, the parabola through each profile and its minimum; with a
    known ``entropy_rate``, that floor and approach 3's fitted E as horizontal lines."""
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.add_subplot()
    norm = LogNorm(vmin=runs.C.min(), vmax=runs.C.max())
    cmap = colormaps["viridis"]
    in_profile = np.zeros(len(runs), dtype=bool)
    for p in fit.profiles:
        in_profile[p.runs] = True
        color = cmap(norm(p.C))
        N = runs.N[p.runs]
        ax.scatter(N, runs.loss[p.runs], color=color, s=16, zorder=2)
        grid = np.geomspace(N.min(), N.max(), 200)
        ax.plot(grid, p.loss_at(grid), color=color, lw=1.5, ls="-" if p.skipped is None else ":")
        if p.skipped is None:
            ax.plot(p.N_opt, p.loss_min, marker="*", ms=14, color=color, mec="black", zorder=3)
    ax.scatter(runs.N[~in_profile], runs.loss[~in_profile], color="0.8", s=10, zorder=1)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="compute budget C (FLOPs)")
    handles = [
        Line2D([], [], ls="", marker="o", color="0.3", label="run (colour: its budget)"),
        Line2D([], [], color="0.3", label="parabola in log N through one budget"),
        Line2D([], [], color="0.3", ls=":", label="parabola not used (not convex, or minimum outside sizes run)"),
        Line2D([], [], ls="", marker="*", ms=12, color="0.3", mec="black", label="its minimum: N_opt for that budget"),
        Line2D([], [], ls="", marker="o", color="0.8", label="run in no profile (too few model sizes at its budget)"),
    ]
    if entropy_rate is not None:
        ax.axhline(entropy_rate, color="black", lw=1.5, label=f"true entropy rate = {entropy_rate:.3f}")
        E = fit.approach3.E
        ax.axhline(E, color="tab:red", lw=1.5, ls="--", label=f"approach 3's fitted E = {E:.3f}")
        handles += ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model size N (parameters)")
    ax.set_ylabel("final loss (nats/token)")
    used = sum(p.skipped is None for p in fit.profiles)
    ax.set_title(f"IsoFLOP profiles (Chinchilla approach 2): {used} of {len(fit.profiles)} budgets used")
    ax.grid(True, which="major", alpha=0.3)
    fig.savefig(path, dpi=DPI)


def plot_loss_fits(runs: Runs, fit: ScalingFit, path: Path) -> None:
    """Three panels, loss against N, D and C in log-log, with Kaplan's fit through each envelope."""
    fig = Figure(figsize=(15, 5), layout="constrained")
    panels = (
        ("N", runs.N, "model size N (parameters)"),
        ("D", runs.D, "training tokens D"),
        ("C", runs.C, "training compute C (FLOPs)"),
    )
    for ax, (name, x, label) in zip(fig.subplots(1, 3), panels):
        ax.scatter(x, runs.loss, color="0.75", s=10, label="run")
        on = lower_envelope(x, runs.loss)
        envelope = f"envelope: best loss at <= {name} ({int(on.sum())} runs)"
        ax.scatter(x[on], runs.loss[on], color="black", s=14, label=envelope)
        grid = np.geomspace(x.min(), x.max(), 200)
        law = fit.kaplan.get(name)
        if law is not None:  # skipped when the envelope is a single run
            kaplan = f"Kaplan L = ({name}_c/{name})^α: α = {law.alpha:.3f}, {name}_c = {law.X_c:.3g}"
            ax.plot(grid, law(grid), color="tab:red", lw=2, label=kaplan)
        if name == "C":
            label3 = "approach 3 at compute-optimal N, D"
            ax.plot(grid, _optimal_loss(fit.approach3, grid), color="tab:blue", lw=2, ls="--", label=label3)
        _log_loss_axes(ax)
        ax.set_xlabel(label)
        ax.set_title(f"L({name})")
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("Loss against parameters, data and compute, with Kaplan power-law fits")
    fig.savefig(path, dpi=DPI)


def plot_compute_optimal(runs: Runs, fit: ScalingFit, path: Path) -> None:
    """N_opt and D_opt against C: approaches 1-3, with Kaplan's and Chinchilla's slopes for reference."""
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    C = np.geomspace(runs.C.min() / 3, runs.C.max() * 3, 200)
    C_mid = float(np.exp(np.mean(np.log(runs.C))))
    ax_N, ax_D = fig.subplots(1, 2)
    _allocation_panel(ax_N, "N", "model size N_opt (parameters)", fit, C, C_mid, KAPLAN_A, CHINCHILLA_A)
    _allocation_panel(ax_D, "D", "training tokens D_opt (tokens)", fit, C, C_mid, 1 - KAPLAN_A, 1 - CHINCHILLA_A)
    fig.suptitle("How to split a FLOP budget C = 6ND (reference slopes pinned to approach 3 at the data's mid budget)")
    fig.savefig(path, dpi=DPI)


def _allocation_panel(
    ax: Axes, name: str, label: str, fit: ScalingFit, C: np.ndarray, C_mid: float, kaplan: float, chinchilla: float
) -> None:
    """N_opt (``name`` "N") or D_opt ("D") against budgets C [K] on one axes."""
    for alloc, marker, color, title in (
        (fit.approach1, "s", "tab:orange", "approach 1 (best run per budget)"),
        (fit.approach2, "o", "tab:green", "approach 2 (IsoFLOP minima)"),
    ):
        if alloc is None:
            continue
        points, power = (alloc.N, alloc.N_opt) if name == "N" else (alloc.D, alloc.D_opt)
        ax.scatter(alloc.C, points, marker=marker, color=color, s=30, zorder=3, label=title)
        ax.plot(C, power(C), color=color, lw=1.5, label=f"  fit: {name}_opt ~ C^{power.exponent:.3f}")
    law = fit.approach3
    optimal, exponent = (law.optimal_N, law.a) if name == "N" else (law.optimal_D, law.b)
    ax.plot(C, optimal(C), color="tab:blue", lw=2, label=f"approach 3 (parametric law): {name}_opt ~ C^{exponent:.3f}")
    # A published exponent is only a slope; pinning it to approach 3 mid-range makes slopes comparable.
    anchor = optimal(C_mid)
    for slope, ls, who in ((kaplan, ":", "Kaplan et al. 2020"), (chinchilla, "-.", "Chinchilla")):
        reference = anchor * (C / C_mid) ** slope
        ax.plot(C, reference, color="0.4", ls=ls, lw=1.5, label=f"{who} slope: {name} ~ C^{slope:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(f"compute-optimal {label}")
    ax.set_title(f"Compute-optimal {'model size' if name == 'N' else 'training tokens'} against budget")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def _optimal_loss(law: ChinchillaLaw, C: np.ndarray) -> np.ndarray:
    """Loss of the law at its compute-optimal N and D for each budget in C [K]."""
    return law.loss(law.optimal_N(C), law.optimal_D(C))


def _log_loss_axes(ax: Axes) -> None:
    """Log-log axes with evenly spaced, plainly labelled loss ticks: losses span well under a decade,
    where a log axis would label only one or two values."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10]))  # 0.1, 0.2 or 0.5 apart: "%.1f" is exact
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax.set_ylabel("final loss (nats/token)")
    ax.grid(True, which="both", alpha=0.3)


def plot_forecast(runs: Runs, law: ChinchillaLaw, draws: list[ChinchillaLaw], forecast: dict, path: Path) -> None:
    """Loss against compute: the sweep's runs, approach 3's compute-optimal frontier extended to the
    forecast's budget with the band of its bootstrap refits, the predicted loss of the forecast run
    with its interval, and its actual loss once trained."""
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.add_subplot()
    run, predicted, actual = forecast["run"], forecast["predicted"], forecast["actual"]
    C = np.geomspace(runs.C.min() / 2, max(run["C"], runs.C.max()) * 2, 200)
    band = np.percentile([_optimal_loss(d, C) for d in draws], [2.5, 97.5], axis=0)
    ax.fill_between(C, band[0], band[1], color="tab:blue", alpha=0.15, label="95% band of the bootstrap refits")
    ax.plot(C, _optimal_loss(law, C), color="tab:blue", lw=2, label="approach 3 at compute-optimal N, D")
    points = ax.scatter(runs.C, runs.loss, c=runs.N, cmap="viridis", norm=LogNorm(), s=18, zorder=3, label="sweep run")
    fig.colorbar(points, ax=ax, label="model size N (parameters)")
    low, high = predicted["ci95"]
    ax.errorbar(
        [run["C"]],
        [predicted["loss"]],
        yerr=[[predicted["loss"] - low], [high - predicted["loss"]]],
        fmt="o",
        color="tab:red",
        capsize=5,
        ms=8,
        zorder=4,
        label=f"forecast {run['n_layer']}x{run['d_model']}: {predicted['loss']:.4f} [{low:.4f}, {high:.4f}]",
    )
    if actual is not None and actual["loss"] is not None:
        ax.scatter(
            [run["C"]],
            [actual["loss"]],
            marker="*",
            s=220,
            color="black",
            zorder=5,
            label=f"actual: {actual['loss']:.4f} ({100 * actual['relative_error']:+.2f}% predicted - actual)",
        )
    _log_loss_axes(ax)
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=8))
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_title(f"Forecast at C = {forecast['compute']:.3g} FLOPs from the sweep's fit")
    ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=DPI)
