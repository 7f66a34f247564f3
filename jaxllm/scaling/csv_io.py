"""Runs from a CSV of training results: one row per run, columns chosen by name.

``scaling.py fit`` reads a sweep's results.csv (columns N, D, C, loss) or published data whose
columns have other names (``--params-column "Model Size"``); every bad cell is a one-line error
naming the file, line and column.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from jaxllm.core.errors import ConfigError, DataError
from jaxllm.scaling.laws import Runs, make_runs


def drop_highest_loss(runs: Runs, k: int) -> Runs:
    """``runs`` without its ``k`` highest-loss runs, order kept (published data has outliers)."""
    if k < 0:
        raise ConfigError(f"drop-highest-loss must be >= 0, got {k}")
    if k >= len(runs):
        raise ConfigError(f"drop-highest-loss {k} would leave no runs of {len(runs)}")
    keep = np.ones(len(runs), dtype=bool)
    keep[np.argsort(-runs.loss, kind="stable")[:k]] = False
    return runs.take(keep)


def load_runs(
    path: str | Path,
    params_column: str = "N",
    tokens_column: str | None = None,
    flops_column: str | None = None,
    loss_column: str = "loss",
    drop_highest: int = 0,
) -> Runs:
    """Runs from a CSV file, columns chosen by name; other columns are ignored.

    ``tokens_column``/``flops_column`` None means the default name (``D``/``C``) if the file has it;
    at least one must be present, and D = C / 6N when only FLOPs are given. A name given explicitly
    must exist. ``drop_highest`` drops that many highest-loss runs after reading.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            header = [h.strip() for h in reader.fieldnames or []]
            if not header:
                raise DataError(f"{path} is empty: expected a header with columns {params_column}, {loss_column}, ...")
            reader.fieldnames = header
            wanted = _choose_columns(path, header, params_column, tokens_column, flops_column, loss_column)
            columns: dict[str, list[float]] = {role: [] for role in wanted}
            for row in reader:
                for role, name in wanted.items():
                    columns[role].append(_parse_positive(row.get(name), name, reader.line_num, path))
    except FileNotFoundError:
        raise DataError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path} as CSV: {e}") from None
    if not columns["loss"]:
        raise DataError(f"{path} has a header but no rows")
    runs = make_runs(**{role: np.array(values) for role, values in columns.items()})
    return drop_highest_loss(runs, drop_highest)


def _choose_columns(
    path: Path, header: list[str], params: str, tokens: str | None, flops: str | None, loss: str
) -> dict[str, str]:
    """Map of role (N, D, C, loss) to column name, for the roles this file provides."""
    have = ", ".join(header)
    for name, flag in ((params, "--params-column"), (loss, "--loss-column")):
        if name not in header:
            raise ConfigError(f"{path} has no column '{name}' (it has: {have}); choose one with {flag}")
    for name, flag in ((tokens, "--tokens-column"), (flops, "--flops-column")):
        if name is not None and name not in header:
            raise ConfigError(f"{path} has no column '{name}' (it has: {have}); choose one with {flag}")
    wanted = {"N": params, "loss": loss}
    tokens = tokens if tokens is not None else ("D" if "D" in header else None)
    flops = flops if flops is not None else ("C" if "C" in header else None)
    if tokens is None and flops is None:
        raise ConfigError(
            f"{path} has neither a tokens column 'D' nor a FLOPs column 'C' (it has: {have}); "
            "choose one with --tokens-column or --flops-column"
        )
    if tokens is not None:
        wanted["D"] = tokens
    if flops is not None:
        wanted["C"] = flops
    return wanted


def _parse_positive(text: str | None, column: str, line: int, path: Path) -> float:
    """One CSV cell as a finite float > 0, or an error naming the file, line and column."""
    try:
        value = float(text)  # type: ignore[arg-type]  # None (short row) fails like text does
    except (TypeError, ValueError):
        raise DataError(f"{path} line {line}: column '{column}' is {text!r}, not a number") from None
    if not (np.isfinite(value) and value > 0):
        raise ConfigError(f"{path} line {line}: column '{column}' is {value:g}; it must be finite and > 0")
    return value
