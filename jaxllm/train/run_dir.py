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
