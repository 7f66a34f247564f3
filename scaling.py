"""Scaling laws: train IsoFLOP sweeps, fit Kaplan and Chinchilla laws, size a model for a FLOP budget.

  python scaling.py                                        the CPU-sized default: sweep, then fit, in runs/scaling
  python scaling.py sweep [CONFIG.yaml] [key=value ...] [--out DIR] [--fit]
                                                           IsoFLOP grid -> DIR/results.csv (resumable)
  python scaling.py fit RESULTS.csv [--out DIR]            fits -> DIR/fit.json, a table, PNG plots
  python scaling.py predict --fit fit.json --compute 1e21  compute-optimal N, D and loss, as JSON
  python scaling.py depth [CONFIG.yaml] [key=value ...] [--out DIR]
                                                           depth x residual x pre/post-LN study + plots

The sweep lives in jaxllm/sweep.py, the depth study in jaxllm/depth.py, the fits in
jaxllm/scaling_laws.py, the figures in jaxllm/scaling_plots.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jaxllm import scaling_laws as sl
from jaxllm.config import help_text, load_config
from jaxllm.errors import ConfigError, DataError, UserError, exit_on_user_error

STARTS = {"paper": sl.PAPER_STARTS, "coarse": sl.BOOTSTRAP_STARTS}
PERCENTILES = (2.5, 97.5)
CONFIGS = Path(__file__).parent / "configs"
SWEEP_CONFIG = CONFIGS / "scaling_cpu.yaml"
DEPTH_CONFIG = CONFIGS / "depth_cpu.yaml"
DEFAULT_OUT = Path("runs/scaling")
APPROACH3_KEYS = ("E", "A", "B", "alpha", "beta", "a", "b", "G")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become one ``error: ...`` line and exit 2, like every UserError."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scaling.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_fit(commands)
    _add_predict(commands)
    _add_sweep(commands)
    _add_depth(commands)
    return parser


def _add_fit(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("fit", help="fit Kaplan and Chinchilla laws to a CSV of runs",
                            description="Fit Kaplan's power laws and Chinchilla's three approaches to a CSV of final "
                                        "losses; write fit.json, print a table and draw PNG plots.")
    p.add_argument("csv", type=Path, metavar="RESULTS.csv", help="one row per run")
    p.add_argument("--out", type=Path, help="folder for fit.json and the plots (default: the CSV's folder)")
    p.add_argument("--params-column", default="N", metavar="NAME", help="parameters column (default N)")
    p.add_argument("--tokens-column", metavar="NAME", help="training tokens column (default D, if present)")
    p.add_argument("--flops-column", metavar="NAME",
                   help="training FLOPs column (default C, if present); without tokens, D = C/6N")
    p.add_argument("--loss-column", default="loss", metavar="NAME", help="final loss column, nats/token (default loss)")
    p.add_argument("--drop-highest-loss", type=int, default=0, metavar="K",
                   help="drop the K highest-loss runs (published data has outliers)")
    p.add_argument("--bootstrap", type=int, default=100, metavar="B",
                   help="bootstrap resamples for the 95%% intervals (default 100); 0 = none")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--starts", choices=sorted(STARTS), default="paper",
                   help=f"L-BFGS starting grid of approach 3: paper = Chinchilla's {len(sl.PAPER_STARTS)} starts, "
                        f"coarse = {len(sl.BOOTSTRAP_STARTS)} (bootstrap refits always use coarse)")
    p.add_argument("--entropy-rate", type=float, metavar="H",
                   help="the true irreducible loss in nats/token, when known (a synthetic corpus): "
                        "reported beside approach 3's E")
    p.set_defaults(run=run_fit)


def _add_predict(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("predict", help="compute-optimal N, D and loss for a FLOP budget",
                            description="Print, as JSON, the compute-optimal model size, tokens and predicted loss "
                                        "for a FLOP budget from a fit.json written by `scaling.py fit`.")
    p.add_argument("--fit", type=Path, required=True, metavar="FIT.json", help="written by `scaling.py fit`")
    p.add_argument("--compute", type=float, required=True, metavar="C", help="training budget in FLOPs, e.g. 1e21")
    p.set_defaults(run=run_predict)


def _add_training_args(p: argparse.ArgumentParser, default_config: Path, default_out: Path) -> None:
    p.add_argument("settings", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help=f"a config file (default {default_config.relative_to(Path(__file__).parent)}) and "
                        "train.py-style overrides; --keys lists them all")
    p.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    p.add_argument("--keys", action="store_true", help="list every config key with its default and exit")


def _add_sweep(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("sweep", help="train an IsoFLOP grid and write results.csv",
                            description="For each budget C in sweep.budgets, train sweep.sizes model sizes N, each on "
                                        "D = C / 6N tokens (N non-embedding), with train.py's code; write "
                                        "OUT/results.csv. Finished runs are skipped on a rerun.")
    _add_training_args(p, SWEEP_CONFIG, DEFAULT_OUT)
    p.add_argument("--fit", action="store_true", help="then fit and plot the results, as `scaling.py fit` does")
    p.set_defaults(run=run_sweep)


def _add_depth(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("depth", help="the depth / residual / pre- vs post-LN study",
                            description="Train stacks of depth.layers layers with and without residual connections, "
                                        "with pre- and post-LN; plot final loss and per-layer gradient norms "
                                        "against depth.")
    _add_training_args(p, DEPTH_CONFIG, Path("runs/depth"))
    p.set_defaults(run=run_depth)


# --- sweep and depth ---------------------------------------------------------------------------------


def _load(settings: list[str], cls: type, default: Path):
    """The optional config path (first setting without '=') and key=value overrides, as train.py reads them."""
    path, overrides = (settings[0], settings[1:]) if settings and "=" not in settings[0] else (None, settings)
    return load_config(path, overrides, cls=cls, default=str(default))


def _bar(desc: str):
    """A tqdm bar over runs that starts at the runs already finished."""
    return lambda items, total, done: tqdm(items, desc=desc, total=total, initial=done, unit="run",
                                          dynamic_ncols=True, file=sys.stderr)


def run_sweep(args: argparse.Namespace) -> int:
    from jaxllm import sweep

    if args.keys:
        print(help_text(sweep.SweepConfig))
        return 0
    cfg = _load(args.settings, sweep.SweepConfig, SWEEP_CONFIG)
    specs = sweep.sweep_plan(cfg)
    H = sweep.entropy_rate(cfg.data.source)
    print(sweep.describe(specs, args.out), file=sys.stderr)
    if H is not None:
        print(f"true entropy rate of {cfg.data.source}: {H:.4f} nats/token (with {cfg.data.tokenizer} tokens)",
              file=sys.stderr)
    try:
        sweep.run_sweep(cfg, specs, args.out, _bar("sweep"))
    except sweep.Interrupted as e:
        print(f"{e}; run the same command again to resume", file=sys.stderr)
        return 130
    csv_path = args.out / "results.csv"
    print(f"wrote {csv_path}")
    if not args.fit:
        return 0
    known = [] if H is None else ["--entropy-rate", repr(H)]
    # 30 resamples, not fit's 100: on 2 CPU cores the bootstrap would otherwise rival the sweep itself.
    fit_argv = ["fit", str(csv_path), "--out", str(args.out), "--bootstrap", "30", *known]
    return run_fit(build_parser().parse_args(fit_argv))


def run_depth(args: argparse.Namespace) -> int:
    from jaxllm import depth, sweep

    if args.keys:
        print(help_text(depth.DepthConfig))
        return 0
    cfg = _load(args.settings, depth.DepthConfig, DEPTH_CONFIG)
    specs = depth.depth_plan(cfg)
    print(f"depth study: {len(specs)} runs into {args.out}", file=sys.stderr)
    try:
        rows = depth.run_study(cfg, specs, args.out, _bar("depth"))
    except sweep.Interrupted as e:
        print(f"{e}; run the same command again to resume", file=sys.stderr)
        return 130
    print(depth.format_table(rows))
    for path in depth.write_outputs(rows, args.out):
        print(f"wrote {path}")
    return 0


# --- fit ---------------------------------------------------------------------------------------------


def run_fit(args: argparse.Namespace) -> int:
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    runs = sl.load_runs(args.csv, args.params_column, args.tokens_column, args.flops_column, args.loss_column,
                        drop_highest=args.drop_highest_loss)
    out_dir = args.out if args.out is not None else args.csv.parent
    _make_dir(out_dir)
    fit = sl.fit_all(runs, STARTS[args.starts])
    intervals = {}
    if args.bootstrap:
        intervals = sl.bootstrap(
            runs, lambda r: sl.fit_all(r, sl.BOOTSTRAP_STARTS).parameters(), args.bootstrap, args.seed, PERCENTILES,
            progress=lambda it: tqdm(it, desc="bootstrap", unit="resample", file=sys.stderr),
        )
        for name, alloc in (("approach1", fit.approach1), ("approach2", fit.approach2)):
            if alloc is not None:  # one point per budget: resample the budgets, not the runs
                intervals.update(sl.bootstrap_allocation(alloc, name, args.bootstrap, args.seed, PERCENTILES))
    report = fit_report(fit, intervals, runs, args)
    _write_json_atomically(out_dir / "fit.json", report)
    print(format_table(report))
    # Imported only to draw: matplotlib is slow to import, and predict and bad-input exits never draw.
    from jaxllm.scaling_plots import plot_all

    paths = plot_all(runs, fit, out_dir, args.entropy_rate)
    print(f"\nwrote {out_dir / 'fit.json'}")
    for path in paths:
        print(f"wrote {path}")
    return 0


def fit_report(
    fit: sl.ScalingFit, intervals: dict[str, sl.Interval], runs: sl.Runs, args: argparse.Namespace
) -> dict[str, Any]:
    """The fit.json document: per approach its parameters with 95% intervals, and the exponents a, b."""

    def entry(name: str, value: float) -> dict[str, Any]:
        interval = intervals.get(name)
        return {"value": value, "ci95": None if interval is None else [interval.low, interval.high]}

    def samples(prefix: str) -> int:
        return max((iv.samples for name, iv in intervals.items() if name.startswith(prefix)), default=0)

    params = fit.parameters()
    kaplan = {}
    for x in "NDC":
        law = fit.kaplan.get(x)
        kaplan[f"L({x})"] = {"skipped": fit.skipped[f"kaplan_{x}"]} if law is None else {
            "law": f"L = ({x}_c / {x})^alpha", "alpha": entry(f"kaplan_{x}.alpha", law.alpha),
            "X_c": entry(f"kaplan_{x}.X_c", law.X_c), "envelope_runs": law.points,
            "bootstrap_fits": samples(f"kaplan_{x}.")}
    report: dict[str, Any] = {
        "data": {"csv": str(args.csv), "runs": len(runs), "dropped_highest_loss": args.drop_highest_loss,
                 "columns": {"params": args.params_column, "tokens": args.tokens_column,
                             "flops": args.flops_column, "loss": args.loss_column}},
        "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "percentiles": list(PERCENTILES),
                      "starts": len(sl.BOOTSTRAP_STARTS)},
        "kaplan": kaplan,
    }
    for name, alloc, how in (("approach1", fit.approach1, "lowest-loss run of each budget"),
                             ("approach2", fit.approach2, "vertex of a parabola in log N per budget")):
        if alloc is None:
            report[name] = {"skipped": fit.skipped[name]}
            continue
        report[name] = {
            "method": how, "law": "N_opt = N_coefficient * C^a, D_opt = D_coefficient * C^b",
            "a": entry(f"{name}.a", alloc.a), "b": entry(f"{name}.b", alloc.b),
            "N_coefficient": alloc.N_opt.coefficient, "D_coefficient": alloc.D_opt.coefficient,
            "budgets": [{"C": c, "N_opt": n, "D_opt": d} for c, n, d in zip(alloc.C, alloc.N, alloc.D)],
            "bootstrap_fits": samples(f"{name}."),
        }
    report["approach2_profiles"] = [
        {"C": p.C, "runs": len(p.runs), "N_opt": p.N_opt, "D_opt": p.D_opt, "loss_min": p.loss_min,
         "skipped": p.skipped}
        for p in fit.profiles
    ]
    report["approach3"] = {
        "law": "L = E + A / N^alpha + B / D^beta; N_opt = G (C/6)^a, D_opt = C / (6 N_opt)",
        **{key: entry(f"approach3.{key}", params[f"approach3.{key}"]) for key in APPROACH3_KEYS},
        "huber_objective": fit.objective, "starts": len(STARTS[args.starts]),
        "bootstrap_fits": samples("approach3."),
    }
    if args.entropy_rate is not None:
        E = params["approach3.E"]
        report["approach3"]["true_entropy_rate"] = args.entropy_rate
        report["approach3"]["E_minus_entropy_rate"] = E - args.entropy_rate
    return _finite(report)


def format_table(report: dict[str, Any]) -> str:
    """The fitted numbers of a fit.json document as an aligned text table."""
    data = report["data"]
    dropped = f", {data['dropped_highest_loss']} highest-loss dropped" if data["dropped_highest_loss"] else ""
    lines = [(f"{data['runs']} runs from {data['csv']}{dropped}; "
              f"95% intervals from {report['bootstrap']['resamples']} bootstrap resamples"), "",
             f"{'fit':<14}{'parameter':<11}{'value':>12}   95% interval"]

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
        H, gap = a3["true_entropy_rate"], a3["E_minus_entropy_rate"]
        lines.append(f"{'':<14}{'true H':<11}{_num(H):>12}   E - H = {gap:+.4f} nats/token ({gap / H:+.1%})")
    used = sum(p["skipped"] is None for p in report["approach2_profiles"])
    lines.append(f"\nIsoFLOP profiles: {used} of {len(report['approach2_profiles'])} budgets used by approach 2")
    return "\n".join(lines)


# --- predict -----------------------------------------------------------------------------------------


def run_predict(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.compute) and args.compute > 0):
        raise ConfigError(f"--compute must be a FLOP count > 0, got {args.compute:g}")
    report = _read_fit(args.fit)
    law, approach2 = _laws_from_report(report, args.fit)
    C = args.compute
    N_opt = float(law.optimal_N(C))
    D_opt = float(law.optimal_D(C))
    prediction: dict[str, Any] = {"compute": C, "N_opt": N_opt, "D_opt": D_opt, "loss": float(law.loss(N_opt, D_opt))}
    if approach2 is not None:
        N_law, D_law = approach2
        prediction["approach2"] = {"N_opt": float(N_law(C)), "D_opt": float(D_law(C))}
    print(json.dumps(prediction, indent=2))
    return 0


def _read_fit(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} as JSON: {e}") from None


def _laws_from_report(
    report: dict[str, Any], path: Path
) -> tuple[sl.ChinchillaLaw, tuple[sl.PowerLaw, sl.PowerLaw] | None]:
    """Approach 3's law, and approach 2's N_opt and D_opt power laws (None if skipped), from fit.json."""
    try:
        law = sl.ChinchillaLaw(**{k: float(report["approach3"][k]["value"]) for k in ("E", "A", "B", "alpha", "beta")})
        a2 = report.get("approach2", {})
        approach2 = None
        if "a" in a2:
            approach2 = (sl.PowerLaw(float(a2["a"]["value"]), float(a2["N_coefficient"])),
                         sl.PowerLaw(float(a2["b"]["value"]), float(a2["D_coefficient"])))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError(f"{path} is not a fit written by `scaling.py fit`: no approach3 E, A, B, alpha, beta") from None
    return law, approach2


# --- files -------------------------------------------------------------------------------------------


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {path}: {e.strerror}") from None


def _write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    """Write to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, indent=2, allow_nan=False)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def _finite(value: Any) -> Any:
    """The document with non-finite floats as None: JSON has no inf or NaN (a law with alpha <= 0)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the CPU-sized default: sweep the built-in corpus, then fit and plot
        args = parser.parse_args(["sweep", "--fit"])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
