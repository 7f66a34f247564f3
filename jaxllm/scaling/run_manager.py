"""Many training runs in one folder: the sweep, the depth study and a forecast's run share this.

A study owns ``OUT`` while it writes there (an exclusive lock, dropped by the OS if the process
dies). Every run is ``jaxllm.train.trainer.train`` (what train.py runs) in ``OUT/runs/<name>``, its
output in ``train.log`` there. ``result.json`` marks a finished run: a rerun reads it back, checked
against the config, and restarts an unfinished one from scratch (runs last minutes; their only
checkpoint is at the end).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from jaxllm.core.config import Config, to_dict
from jaxllm.core.errors import ConfigError
from jaxllm.core.fileio import atomic_write, dir_lock, read_json

RESULT = "result.json"


class Interrupted(Exception):
    """A run stopped on SIGINT/SIGTERM; its study stops too and resumes on the next invocation."""


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    """A study's table of runs: ``rows`` (dicts holding at least ``columns``) as CSV, replaced atomically;
    floats written exactly (repr), so a fit reads back the very numbers the runs produced."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([repr(r[c]) if isinstance(r[c], float) else r[c] for c in columns] for r in rows)
    atomic_write(path, buffer.getvalue())


def study_run_config(cfg: Config, run_dir: Path, steps: int, model: Any) -> Config:
    """The train.py config of one run of a study: ``cfg``'s training sections with ``model``, ``steps`` and
    ``run_dir``; evaluation, the only checkpoint and the loss plot at the end; no inner progress bar,
    samples or TensorBoard (the study has its own bar over runs)."""
    base = Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)})
    return dataclasses.replace(
        base,
        run=dataclasses.replace(cfg.run, dir=str(run_dir)),
        train=dataclasses.replace(cfg.train, steps=steps),
        model=model,
        eval=dataclasses.replace(cfg.eval, every=steps, sample_tokens=0),
        log=dataclasses.replace(cfg.log, progress=False, tensorboard=False),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=steps),
    )


@contextlib.contextmanager
def study_folder(out: Path, holder: str) -> Iterator[Path]:
    """Creates ``out/runs`` and holds ``out``'s lock for the body (``holder`` names the study in the
    refusal a second one gets); yields ``out/runs``."""
    with dir_lock(out, holder):
        runs = out / "runs"
        runs.mkdir(exist_ok=True)
        yield runs


def run_in_order(
    names: list[str],
    runs_dir: Path,
    train: Callable[[str], dict[str, Any]],
    progress: Callable[[list, int, int], Iterable] | None = None,
) -> dict[str, dict[str, Any]]:
    """``train(name)`` for every run, the finished ones (a ``result.json`` in ``runs_dir/<name>``) first;
    returns the results by name.

    ``progress(todo, total, done)`` wraps the loop over runs still to train (e.g. a tqdm bar that
    starts at ``done``); it may also be told the current run via ``set_postfix_str``.
    """
    finished = [n for n in names if (runs_dir / n / RESULT).is_file()]
    todo = [n for n in names if n not in finished]
    results = {n: train(n) for n in finished}  # read back (and checked against this config), not retrained
    loop = progress(todo, len(names), len(finished)) if progress else todo
    for name in loop:
        if hasattr(loop, "set_postfix_str"):
            loop.set_postfix_str(name)
        results[name] = train(name)
    return results


def train_once(
    cfg: Config,
    record: dict[str, Any],
    measure: Callable[[Path], dict[str, Any]] | None = None,
    devices: list | None = None,
) -> dict:
    """Trains ``cfg`` in ``cfg.run.dir`` (on ``devices``, default all) unless its ``result.json`` says that
    run is done; returns the result.

    The result is ``record`` plus the final validation ``loss`` (NaN and ``diverged`` when the loss
    became NaN/Inf), the last logged ``train_loss``, and whatever ``measure(run_dir)`` adds.
    A result written by a different config is an error, never silently reused.
    """
    from jaxllm.train.trainer import TrainingDiverged, train  # imports JAX: only when something will train

    run_dir = Path(cfg.run.dir)
    done = run_dir / RESULT
    settings = {k: v for k, v in to_dict(cfg).items() if k != "run"}
    if done.is_file():
        result = read_json(done, "run result")
        if result.get("config") != settings:
            raise ConfigError(f"{run_dir} holds a finished run of a different config; use a new --out folder")
        return result
    if run_dir.exists():  # an unfinished run: its only checkpoint would be at the end, so start afresh
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    result = {**record, "diverged": False}
    with (run_dir / "train.log").open("w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            summary = train(cfg, devices)
        except TrainingDiverged as e:
            print(f"error: {e}")
            summary = {"eval_loss": math.nan, "loss": math.nan}
            result["diverged"] = True
    if "interrupted" in summary:
        raise Interrupted(f"{run_dir} stopped by {summary['interrupted']}")
    result.update(loss=summary["eval_loss"], train_loss=summary.get("loss", math.nan), config=settings)
    if measure is not None:
        result.update(measure(run_dir))
    # Not write_json: a diverged run's loss is NaN, which strict JSON (and write_json) refuses.
    atomic_write(done, json.dumps(result, indent=1) + "\n")
    return result
