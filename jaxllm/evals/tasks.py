"""lm-evaluation-harness tasks: which exist (the registry, local task files), running them on an ``LM``
(``lm_eval.simple_evaluate``), and their scores, table and results JSON."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from jaxllm.core.errors import ConfigError, DataError


class _NoCliHint(logging.Filter):
    """Drops the harness's warning, at every task with its own loader (every local task file here),
    about a flag of the harness's command line, which this command does not have."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def task_manager(tasks: list[str], include_path: str | None):
    """The harness's ``TaskManager`` that knows every one of ``tasks``: the local task files of
    ``include_path`` alone when they define them all (no scan of the built-in registry), else with
    the registry (HellaSwag, ARC, ...). A task file that does not parse, or a task neither knows,
    is a one-line DataError."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    task_log = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _NoCliHint) for f in task_log.filters):
        task_log.addFilter(_NoCliHint())

    if include_path is not None:
        root = Path(include_path)
        if not root.is_dir():
            raise DataError(f"--include-path {include_path!r} is not a directory of task files")
        for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
            try:
                load_yaml(path, resolve_func=False)
            except Exception as e:  # noqa: BLE001  (yaml and lm_eval raise many kinds)
                raise DataError(f"task file {path} does not parse: {' '.join(str(e).split())[:200]}") from None
        local = TaskManager(include_path=str(root), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DataError(
            f"unknown task {', '.join(unknown)}: not in the harness's registry"
            + (f" nor in {include_path}" if include_path else " (local task files: --include-path DIR)")
        )
    return manager


def fetch(tasks: list[str], manager) -> None:
    """Reads every task's documents (a registry task downloads its data set once, into the Hugging
    Face cache), so that one that cannot be fetched is refused before a model is loaded or trained:
    a one-line DataError."""
    from lm_eval.tasks import get_task_dict

    with _unreachable_is_data_error(tasks):
        get_task_dict(tasks, manager)


@contextlib.contextmanager
def _unreachable_is_data_error(tasks: list[str]):
    try:
        yield
    except ConnectionError as e:
        raise DataError(
            f"the documents of task {', '.join(tasks)} could not be fetched ({' '.join(str(e).split())[:160]}); "
            "run where the network is, from the Hugging Face cache (HF_DATASETS_OFFLINE=1), "
            "or on local task files (--include-path)"
        ) from None


def evaluate(lm, tasks: list[str], manager, num_fewshot: int | None = None, limit: int | None = None,
             log_samples: bool = False, bootstrap_iters: int = 100000) -> dict:  # fmt: skip
    """``lm_eval.simple_evaluate`` of ``tasks`` on ``lm``: the harness's results document."""
    import lm_eval

    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive number of examples per task, got {limit}")
    with _unreachable_is_data_error(tasks):
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
        )


def scores(results: dict) -> dict[str, float]:
    """``{"task/metric": value}`` of a results document: the metrics each task declares (those of
    ``higher_is_better``), not their standard errors or the count of documents."""
    flat = {}
    for task, metrics in results["results"].items():
        declared = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            name = key.split(",")[0]  # "acc,none" -> "acc": the filter is the task's only one here
            if name in declared and isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{task}/{name}"] = float(value)
    return flat


def table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


def to_json(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
