"""Scaling laws: train IsoFLOP sweeps, fit Kaplan and Chinchilla laws, size a model for a FLOP budget.

  python scaling.py                                        the CPU-sized default: sweep, then fit, in runs/scaling
  python scaling.py sweep [CONFIG.yaml] [key=value ...] [--out DIR] [--fit]
                                                           IsoFLOP grid -> DIR/results.csv (resumable)
  python scaling.py fit RESULTS.csv [--out DIR]            fits -> DIR/fit.json, a table, PNG plots
  python scaling.py predict --fit fit.json --compute 1e21  compute-optimal N, D and loss, as JSON
  python scaling.py forecast --fit DIR/fit.json --compute C [--out RUN_DIR] [--train]
                                                           a sweep's next run: config, loss with interval, score
  python scaling.py depth [CONFIG.yaml] [key=value ...] [--out DIR]
                                                           depth x residual x pre/post-LN study + plots

The sweep lives in jaxllm/scaling/sweep.py, the depth study in jaxllm/scaling/depth.py (both run by
jaxllm/scaling/run_manager.py), the fits in jaxllm/scaling/laws.py, their intervals in bootstrap.py,
fit.json in report.py, forecasts in jaxllm/scaling/forecast.py, the figures in plots.py (all in jaxllm/scaling/).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from jaxllm.core.config import help_text, load_config
from jaxllm.core.errors import ArgumentParser, ConfigError, UserError, exit_on_user_error
from jaxllm.core.fileio import write_json
from jaxllm.scaling import report as report_lib
from jaxllm.scaling.csv_io import load_runs
from jaxllm.scaling.run_manager import Interrupted

CONFIGS = Path(__file__).parent / "configs"
SWEEP_CONFIG = CONFIGS / "scaling_cpu.yaml"
DEPTH_CONFIG = CONFIGS / "depth_cpu.yaml"
DEFAULT_OUT = Path("runs/scaling")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="scaling.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    _add_fit(commands)
    _add_predict(commands)
    _add_forecast(commands)
    _add_sweep(commands)
    _add_depth(commands)
    return parser


def _add_fit(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "fit",
        help="fit Kaplan and Chinchilla laws to a CSV of runs",
        description="Fit Kaplan's power laws and Chinchilla's three approaches to a CSV of final "
        "losses; write fit.json, print a table and draw PNG plots.",
    )
    p.add_argument("csv", type=Path, metavar="RESULTS.csv", help="one row per run")
    p.add_argument("--out", type=Path, help="folder for fit.json and the plots (default: the CSV's folder)")
    p.add_argument("--params-column", default="N", metavar="NAME", help="parameters column (default N)")
    p.add_argument("--tokens-column", metavar="NAME", help="training tokens column (default D, if present)")
    p.add_argument(
        "--flops-column", metavar="NAME", help="training FLOPs column (default C, if present); without tokens, D = C/6N"
    )
    p.add_argument("--loss-column", default="loss", metavar="NAME", help="final loss column, nats/token (default loss)")
    p.add_argument(
        "--drop-highest-loss",
        type=int,
        default=0,
        metavar="K",
        help="drop the K highest-loss runs (published data has outliers)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=100,
        metavar="B",
        help="bootstrap resamples for the 95%% intervals (default 100); 0 = none",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    starts = report_lib.STARTS
    p.add_argument(
        "--starts",
        choices=sorted(starts),
        default="paper",
        help=f"L-BFGS starting grid of approach 3: paper = Chinchilla's {len(starts['paper'])} starts, "
        f"coarse = {len(starts['coarse'])} (bootstrap refits always use coarse)",
    )
    p.add_argument(
        "--entropy-rate",
        type=float,
        metavar="RATE",
        help="the true irreducible loss in nats/token, when known (a synthetic corpus): reported beside approach 3's E",
    )
    p.add_argument(
        "--fix-E",
        action="store_true",
        help="fix approach 3's E at --entropy-rate and fit A, B, alpha, beta (a handful of budgets leaves "
        "E poorly determined)",
    )
    p.set_defaults(run=run_fit)


def _add_predict(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "predict",
        help="compute-optimal N, D and loss for a FLOP budget",
        description="Print, as JSON, the compute-optimal model size, tokens and predicted loss "
        "for a FLOP budget from a fit.json written by `scaling.py fit`.",
    )
    p.add_argument("--fit", type=Path, required=True, metavar="FIT.json", help="written by `scaling.py fit`")
    p.add_argument("--compute", type=float, required=True, metavar="C", help="training budget in FLOPs, e.g. 1e21")
    p.set_defaults(run=run_predict)


def _add_forecast(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "forecast",
        help="size, predict and optionally train a sweep's larger run",
        description="From a sweep's fit.json: the compute-optimal run for budget C (approach 3, "
        "shapes of the sweep's family, D = C / 6N), its predicted final loss with a "
        "bootstrap interval; config.yaml, forecast.json and forecast.png in RUN_DIR. "
        "With --train, train it and score the forecast.",
    )
    p.add_argument(
        "--fit",
        type=Path,
        required=True,
        metavar="DIR/fit.json",
        help="written by `scaling.py sweep --fit` (its sweep.json is read beside it)",
    )
    p.add_argument(
        "--compute", type=float, required=True, metavar="C", help="training budget in FLOPs, above the sweep's smallest"
    )
    p.add_argument("--out", type=Path, metavar="RUN_DIR", help="default: DIR/forecast-C<C>")
    p.add_argument("--train", action="store_true", help="train the run (resumable) and print predicted vs actual")
    p.set_defaults(run=run_forecast)


def _add_training_args(p: argparse.ArgumentParser, default_config: Path, default_out: Path) -> None:
    p.add_argument(
        "settings",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help=f"a config file (default {default_config.relative_to(Path(__file__).parent)}) and "
        "train.py-style overrides; --keys lists them all",
    )
    p.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    p.add_argument("--keys", action="store_true", help="list every config key with its default and exit")


def _add_sweep(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "sweep",
        help="train an IsoFLOP grid and write results.csv",
        description="For each budget C in sweep.budgets, train sweep.sizes model sizes N, each on "
        "D = C / 6N tokens (N: every weight matrix, output projection included), with train.py's code; write "
        "OUT/results.csv. Finished runs are skipped on a rerun.",
    )
    _add_training_args(p, SWEEP_CONFIG, DEFAULT_OUT)
    p.add_argument("--fit", action="store_true", help="then fit and plot the results, as `scaling.py fit` does")
    p.set_defaults(run=run_sweep)


def _add_depth(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "depth",
        help="the depth / residual / pre- vs post-LN study",
        description="Train stacks of depth.layers layers with and without residual connections, "
        "with pre- and post-LN; plot final loss and per-layer gradient norms "
        "against depth.",
    )
    _add_training_args(p, DEPTH_CONFIG, Path("runs/depth"))
    p.set_defaults(run=run_depth)


# --- sweep and depth ---------------------------------------------------------------------------------


def _load(settings: list[str], cls: type, default: Path):
    """The optional config path (first setting without '=') and key=value overrides, as train.py reads them."""
    path, overrides = (settings[0], settings[1:]) if settings and "=" not in settings[0] else (None, settings)
    return load_config(path, overrides, cls=cls, default=str(default))


def _bar(desc: str):
    """A tqdm bar over runs that starts at the runs already finished."""
    return lambda items, total, done: tqdm(
        items, desc=desc, total=total, initial=done, unit="run", dynamic_ncols=True, file=sys.stderr
    )


def run_sweep(args: argparse.Namespace) -> int:
    from jaxllm.scaling import sweep

    if args.keys:
        print(help_text(sweep.SweepConfig))
        return 0
    cfg = _load(args.settings, sweep.SweepConfig, SWEEP_CONFIG)
    check_kind(args.out, "sweep", "--out", also=("fit",))
    specs = sweep.sweep_plan(cfg)
    rate = sweep.entropy_rate(cfg.data.source)
    print(sweep.describe(specs, args.out), file=sys.stderr)
    if rate is not None:
        print(
            f"true entropy rate of {cfg.data.source}: {rate:.4f} nats/token (with {cfg.data.tokenizer} tokens)",
            file=sys.stderr,
        )
    try:
        sweep.run_sweep(cfg, specs, args.out, _bar("sweep"))
    except Interrupted as e:
        print(f"{e}; run the same command again to resume", file=sys.stderr)
        return 130
    csv_path = args.out / "results.csv"
    print(f"wrote {csv_path}")
    if not args.fit:
        return 0
    known = [] if rate is None else ["--entropy-rate", repr(rate)]
    # 30 resamples, not fit's 100: on 2 CPU cores the bootstrap would otherwise rival the sweep itself.
    fit_argv = ["fit", str(csv_path), "--out", str(args.out), "--bootstrap", "30", *known]
    return run_fit(build_parser().parse_args(fit_argv))


def run_depth(args: argparse.Namespace) -> int:
    from jaxllm.scaling import depth

    if args.keys:
        print(help_text(depth.DepthConfig))
        return 0
    cfg = _load(args.settings, depth.DepthConfig, DEPTH_CONFIG)
    check_kind(args.out, "depth study", "--out")
    specs = depth.depth_plan(cfg)
    print(f"depth study: {len(specs)} runs into {args.out}", file=sys.stderr)
    try:
        rows = depth.run_study(cfg, specs, args.out, _bar("depth"))
    except Interrupted as e:
        print(f"{e}; run the same command again to resume", file=sys.stderr)
        return 130
    print(depth.format_table(rows))
    for path in depth.write_outputs(rows, args.out):
        print(f"wrote {path}")
    return 0


# --- fit ---------------------------------------------------------------------------------------------


def run_fit(args: argparse.Namespace) -> int:
    settings = report_lib.FitSettings(
        csv=str(args.csv),
        drop_highest_loss=args.drop_highest_loss,
        resamples=args.bootstrap,
        seed=args.seed,
        starts=args.starts,
        entropy_rate=args.entropy_rate,
        fix_E=args.fix_E,
        columns={
            "params": args.params_column,
            "tokens": args.tokens_column,
            "flops": args.flops_column,
            "loss": args.loss_column,
        },
    )
    runs = load_runs(
        args.csv,
        args.params_column,
        args.tokens_column,
        args.flops_column,
        args.loss_column,
        drop_highest=args.drop_highest_loss,
    )
    settings.check_runs(runs)
    out_dir = args.out if args.out is not None else args.csv.parent
    check_kind(out_dir, "fit", "--out", also=("sweep",))  # sweep --fit writes its fit beside the runs
    _make_dir(out_dir)
    progress = lambda it: tqdm(it, desc="bootstrap", unit="resample", file=sys.stderr)
    fit, found, draws = report_lib.fit_with_intervals(runs, settings, progress)
    report = report_lib.fit_report(fit, found, draws, runs, settings)
    write_json(out_dir / "fit.json", report)
    print(report_lib.format_table(report))
    # Imported only to draw: matplotlib is slow to import, and predict and bad-input exits never draw.
    from jaxllm.scaling.plots import plot_all

    paths = plot_all(runs, fit, out_dir, args.entropy_rate)
    print(f"\nwrote {out_dir / 'fit.json'}")
    for path in paths:
        print(f"wrote {path}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.compute) and args.compute > 0):
        raise ConfigError(f"--compute must be a FLOP count > 0, got {args.compute:g}")
    law, approach2 = report_lib.laws_from_report(report_lib.read_fit(args.fit), args.fit)
    C = args.compute
    N_opt = float(law.optimal_N(C))
    D_opt = float(law.optimal_D(C))
    prediction = {"compute": C, "N_opt": N_opt, "D_opt": D_opt, "loss": float(law.loss(N_opt, D_opt))}
    if approach2 is not None:
        N_law, D_law = approach2
        prediction["approach2"] = {"N_opt": float(N_law(C)), "D_opt": float(D_law(C))}
    try:
        print(json.dumps(prediction, indent=2, allow_nan=False))
    except ValueError:  # a budget so large that N or D overflows a float
        raise ConfigError(f"--compute {C:g} is beyond what the fit can size (N or D overflows)") from None
    return 0


def run_forecast(args: argparse.Namespace) -> int:
    from jaxllm.scaling import forecast

    f = forecast.prepare(args.fit, args.compute, args.out)
    result = None
    if args.train:
        forecast.write(f, forecast.document(f, None))  # the prediction is on disk before the run starts
        print(forecast.summary(forecast.document(f, None)), file=sys.stderr)
        print(f"training {f.run_cfg.run.dir} ({f.plan.steps} steps)", file=sys.stderr)
        try:
            result = forecast.train_run(f)
        except Interrupted as e:
            print(f"{e}; run the same command again to resume", file=sys.stderr)
            return 130
    doc = forecast.document(f, result)
    paths = forecast.write(f, doc)
    print(forecast.summary(doc))
    for path in paths:
        print(f"wrote {path}")
    return 0


def check_kind(out: Path, kind: str, key: str, also: tuple[str, ...] = ()) -> None:
    """``run_dir.check_kind``, imported only here: it imports JAX, which fit and predict never need."""
    from jaxllm.train import run_dir

    run_dir.check_kind(out, kind, key, also)


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {path}: {e.strerror}") from None


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the CPU-sized default: sweep the built-in corpus, then fit and plot
        args = parser.parse_args(["sweep", "--fit"])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
