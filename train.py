"""Pre-train a transformer language model.

    python train.py [CONFIG.yaml] [section.key=value ...]

With no config, ``configs/tiny.yaml``. ``--help`` lists every key with its default and meaning.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jaxllm.core import signals
from jaxllm.core.config import help_text, load_config, validate
from jaxllm.core.errors import UserError, exit_on_user_error
from jaxllm.plan import hardware

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
USAGE = "usage: python train.py [CONFIG.yaml] [section.key=value ...] [--plan TARGET [--search] [--plan-out FILE]]"


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """The optional config path (first argument without '=') and the overrides."""
    if argv and "=" not in argv[0]:
        return argv[0], argv[1:]
    return None, argv


def plan_flags(argv: list[str]) -> tuple[list[str], dict | None]:
    """Takes out ``--plan TARGET``, ``--search`` and ``--plan-out FILE``: the rest, and the flags (None: no plan)."""
    rest, flags, args = [], {"target": None, "search": False, "out": None}, iter(argv)
    for arg in args:
        if arg in ("--plan", "--plan-out"):
            value = next(args, None)
            if value is None or value.startswith("--"):
                raise UserError(f"{arg} needs a value; {USAGE}")
            flags["target" if arg == "--plan" else "out"] = value
        elif arg == "--search":
            flags["search"] = True
        else:
            rest.append(arg)
    if flags["target"] is None and (flags["search"] or flags["out"]):
        raise UserError(f"--search and --plan-out go with --plan TARGET; {USAGE}")
    return rest, flags if flags["target"] is not None else None


def run_plan(cfg, target: str, search: bool, out: str | None) -> int:
    """``--plan``: compile the step for TARGET, print the table (``--plan-out``: also as JSON); no training."""
    parsed = hardware.parse_target(target)
    if parsed.platform != "gpu":  # compiled on this host's CPU backend (libtpu needs no TPU backend)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxllm.plan import planner as plan
    from jaxllm.plan import report

    result = plan.run(cfg, parsed, search)
    print(report.search_table(result) if search else report.table(result))
    if out:
        report.write(result, out)
    return 0


def run_training(cfg) -> int:
    """Trains (or resumes) ``cfg``; the exit status: 0, or 128 + the signal that stopped the run."""
    validate(cfg)  # every check that needs no device or data, so a bad config exits before JAX starts
    from jaxllm.train import run_dir

    run_dir.check_kind(Path(cfg.run.dir), "training run", "run.dir")
    run_dir.check_checkpoints(Path(cfg.run.dir))
    import jax

    from jaxllm.train.trainer import train

    signals.check("importing JAX")

    summary = train(cfg)
    if "interrupted" in summary:
        print(f"stopped by {summary['interrupted']} at step {summary['step']}; checkpoint saved", file=sys.stderr)
        return 128 + summary["signal"]  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    if jax.process_index() == 0:  # one line per run, not per host
        print(f"done: step {summary['step']}, final eval loss {summary['eval_loss']:.4f}, run in {cfg.run.dir}")
    return 0


@exit_on_user_error
def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        defaults = load_config(None, default=str(DEFAULT_CONFIG))  # what a bare `python train.py` runs
        print(
            f"{USAGE}\n\nConfig keys (value without a CONFIG: {DEFAULT_CONFIG.name}'s, meaning):\n"
            f"{help_text(values=defaults)}"
        )
        return 0
    argv, plan_args = plan_flags(argv)
    path, overrides = split_args(argv)
    cfg = load_config(path, overrides, default=str(DEFAULT_CONFIG))
    if plan_args is not None:
        return run_plan(cfg, **plan_args)

    with signals.deferred():  # from here on a SIGINT / SIGTERM stops the run at its next safe point
        return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
