"""What may write a run directory, and when: one process at a time (a lock), and fine-tuning only into
a new folder or one holding the very same fine-tuning run (which it then resumes)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax

from jaxllm.core import fileio
from jaxllm.core.config import SFTConfig, load_config, to_dict
from jaxllm.core.errors import ConfigError

# Keys a resumed fine-tuning run may change: where and how it runs, how often it logs and saves, how long.
RESUMABLE_CHANGES = ("run.", "log.", "checkpoint.", "mesh.", "dist.", "train.steps")


def lock(run_dir: Path, holder: str):
    """The run directory's exclusive lock, held by process 0 (the one process that writes there); a
    second holder gets a one-line UserError."""
    return fileio.dir_lock(run_dir, holder) if jax.process_index() == 0 else contextlib.nullcontext()


def _flat(tree: dict) -> dict:
    """``{"section.key": value}`` of a config's :func:`to_dict`."""
    return {f"{section}.{k}": v for section, keys in tree.items() for k, v in keys.items()}


def check_finetune_dir(run_dir: Path, init_from: Path, cfg: SFTConfig) -> None:
    """``run_dir`` must be new (or empty), or hold a fine-tuning run of ``cfg`` (which then resumes);
    never ``init_from``, never another kind of run (ConfigError, before anything is written)."""
    if run_dir.resolve() == init_from.resolve():
        raise ConfigError(
            f"run.dir={str(run_dir)!r} is init.from: fine-tuning would overwrite the model it starts from; "
            "choose another run.dir"
        )
    if not run_dir.is_dir() or not [p for p in run_dir.iterdir() if p.name != ".lock"]:
        return
    if not (run_dir / "sft.yaml").is_file():
        raise ConfigError(
            f"run.dir={str(run_dir)!r} holds files but no fine-tuning run (no sft.yaml); choose a new folder"
        )
    saved = _flat(to_dict(load_config(str(run_dir / "sft.yaml"), cls=SFTConfig)))
    current = _flat(to_dict(cfg))
    diff = [
        k
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k) and not k.startswith(RESUMABLE_CHANGES)
    ]
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} vs {current.get(k)!r}" for k in diff[:4])
        raise ConfigError(
            f"run.dir={str(run_dir)!r} holds a fine-tuning run of another config ({shown}); choose a new folder"
        )


# What marks each kind of output folder: entries at its top that only that kind writes.
KINDS = {
    "training run": ("checkpoints", "metrics.jsonl"),
    "fine-tuning run": ("sft.yaml",),
    "sweep": ("sweep.json", "results.csv"),
    "depth study": ("depth.json", "depth.csv"),
    "fit": ("fit.json",),
    "forecast": ("forecast.json",),
}


def check_kind(directory: Path, kind: str, key: str, also: tuple[str, ...] = ()) -> None:
    """Refuses (ConfigError, before anything is written) a ``directory`` that holds another kind of
    output than ``kind`` (or the kinds in ``also``, which may share it): writing there would overwrite
    another command's files."""
    fileio.check_folder_path(directory, key)
    found = [k for k, marks in KINDS.items() if any((directory / m).exists() for m in marks)]
    other = [k for k in found if k not in (kind, *also)]
    if other:
        raise ConfigError(
            f"{key}={str(directory)!r} holds a {other[0]}, not a {kind}; writing there would overwrite it, "
            "choose another folder"
        )
