"""``python -m jaxllm.evaluate PATH --tasks T1,T2 ...``: lm-evaluation-harness tasks on a jaxllm run or a
Hugging Face directory, scored by jaxllm's own forward pass and KV-cache decoding.

    python -m jaxllm.evaluate PATH --tasks hellaswag,arc_easy [--include-path DIR] [--num-fewshot K]
        [--limit N] [--batch-size B] [--out FILE]

Prints the harness's table and writes its results JSON (default ``PATH/lm_eval_results.json``).
The harness is the optional extra ``eval`` (``pip install -e ".[eval]"``); the backend is
:mod:`jaxllm.infer.harness`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxllm.core.errors import ArgumentParser, ConfigError, exit_on_user_error

INSTALL = 'lm-evaluation-harness is not installed; install it with: pip install -e ".[eval]" (or pip install lm_eval)'
RESULTS = "lm_eval_results.json"


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m jaxllm.evaluate", description="Score a model on lm-evaluation-harness tasks.")
    p.add_argument("path", help="a jaxllm run directory or a Hugging Face model directory")
    p.add_argument("--tasks", required=True, help="comma-separated task names (the harness's, or --include-path's)")
    p.add_argument("--include-path", default=None, help="a directory of local task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt; default: the task's")
    p.add_argument("--limit", type=int, default=None, help="examples per task; default: all")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--out", default=None, help=f"results JSON; default PATH/{RESULTS}")
    return p


@exit_on_user_error
def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print(f"error: {INSTALL}", file=sys.stderr)
        return 2
    from jaxllm.core.fileio import atomic_write
    from jaxllm.evals import lm as eval_lm
    from jaxllm.evals import tasks as eval_tasks
    from jaxllm.infer import harness

    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks or args.batch_size <= 0 or (args.limit is not None and args.limit <= 0):
        raise ConfigError("--tasks needs a task name, --batch-size and --limit positive numbers")
    out = Path(args.out) if args.out else Path(args.path) / RESULTS
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a directory; give a file name")
    manager = eval_tasks.task_manager(tasks, args.include_path)
    eval_tasks.fetch(tasks, manager)
    _, backend = harness.load(args.path)
    lm = eval_lm.JaxllmLM(backend, args.batch_size)
    results = eval_tasks.evaluate(lm, tasks, manager, args.num_fewshot, args.limit)
    print(eval_tasks.table(results))
    atomic_write(out, eval_tasks.to_json(results))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
