"""What may write a run directory, and when: one process at a time (a lock); a resumed run only under
the keys that leave its trajectory alone (:data:`FREE_KEYS`), unless asked (``run.allow_changes``);
fine-tuning only into a new folder or one holding the same fine-tuning run (which it then resumes)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

from jaxllm.core import fileio
from jaxllm.core.config import SFTConfig, load_config, read_history, to_dict
from jaxllm.core.errors import ConfigError
from jaxllm.train import checkpoint as ckpt

# The keys a resumed run may change, and why each leaves the run's trajectory (its data, its learning
# rates, its model and numerics) alone: they choose where and how the same steps are computed, what
# is reported and kept. Any other change is refused unless run.allow_changes=true, which records it.
FREE_KEYS = {
    "run.": "where the run lives, its compilation cache, this very switch",
    "log.": "what is reported, and how often",
    "eval.": "what is evaluated: evaluation reads the state, never changes it",
    "checkpoint.": "how often the state is saved, and how many checkpoints are kept",
    "dist.": "how processes find each other and split the host",
    "mesh.": "how the same step is split over devices (a run resumes on any mesh)",
    "pipeline.": "the pipeline's schedule of the same step",
    "model.remat": "recomputing activations in the backward pass",
    "model.scan_unroll": "unrolling the layer loop",
    "model.attention": "the kernel (and its block size) computing the same attention",
    "optim.shard_state": "where the optimizer state lives (ZeRO-1)",
    "data.cache_dir": "where the tokens are cached",
    "data.prefetch": "how many batches are built ahead (the same batches)",
    "train.steps": "how long the run goes on (the schedule is fitted to the new length from the resume on)",
}


def lock(run_dir: Path, holder: str):
    """The run directory's exclusive lock, held by process 0 (the one process that writes there); a
    second holder gets a one-line UserError."""
    return fileio.dir_lock(run_dir, holder) if jax.process_index() == 0 else contextlib.nullcontext()


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"section.key": value}`` of a config's :func:`to_dict`, nested sections included."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and key != "mesh.rules" else {key: v})
    return out


def trajectory_changes(saved: dict, current: Any) -> dict[str, list]:
    """``{"section.key": [saved, current]}`` for each key of ``current`` (a config) whose value differs
    from ``saved`` (the :func:`to_dict` of the config a run was written with) and that changes the
    run's trajectory (not one of :data:`FREE_KEYS`). Both sides are compared as JSON holds them
    (a checkpoint's record keeps tuples as lists)."""
    old, new = _flat(saved), _flat(json.loads(json.dumps(to_dict(current))))
    changes = {}
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or key.startswith(tuple(FREE_KEYS)):
            continue
        changes[key] = [old.get(key), new.get(key)]
    return changes


def shown(changes: dict[str, list], most: int = 4) -> str:
    """``optim.lr: 0.002 vs 0.001, ...``: every changed key on one line, the first ``most`` with values."""
    keys = list(changes)
    more = f", and {', '.join(keys[most:])}" if len(keys) > most else ""
    return ", ".join(f"{k}: {changes[k][0]!r} vs {changes[k][1]!r}" for k in keys[:most]) + more


def check_resume(run_dir: Path, saved: dict, cfg: Any) -> dict[str, list]:
    """The changes (:func:`trajectory_changes`) resuming ``run_dir`` under ``cfg`` makes to the run
    ``saved`` describes: ConfigError naming them unless ``run.allow_changes``, which accepts them."""
    changes = trajectory_changes(saved, cfg)
    if changes and not cfg.run.allow_changes:
        raise ConfigError(
            f"run.dir={str(run_dir)!r} holds a run of another config ({shown(changes)}); resuming would "
            "change its trajectory: rerun with its values, choose a new run.dir, or pass "
            "run.allow_changes=true to resume under the new ones (the change is recorded)"
        )
    return changes


@dataclass(frozen=True)
class Changes:
    """What a resumed run changes (``{"section.key": [saved, now]}``, accepted by ``run.allow_changes``)
    and the history of such changes its saved config already holds."""

    keys: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    def recorded(self, step: int, restored: bool) -> list[dict]:
        """The history to save with the config once the run resumes at ``step``: the earlier changes
        (those of steps past ``step`` were undone with the steps, as metrics.jsonl is cut back), then
        this resume's. A run that starts afresh has none."""
        if not restored:
            return []
        kept = [h for h in self.history if h["step"] < step]
        return kept + ([{"step": step, "changes": self.keys}] if self.keys else [])


def resume_changes(run_dir: Path, cfg: Any, saved: dict | None, config_file: Path) -> Changes:
    """What resuming ``run_dir`` under ``cfg`` changes of the run ``saved`` describes (None: no
    saved run, so nothing), under :func:`check_resume`'s rule, with the history ``config_file`` holds."""
    if saved is None:
        return Changes()
    return Changes(check_resume(run_dir, saved, cfg), read_history(config_file))


def check_finetune_dir(run_dir: Path, init_from: Path, cfg: SFTConfig) -> Changes:
    """``run_dir`` must be new (or empty), or hold a fine-tuning run of ``cfg`` (which then resumes,
    under :func:`check_resume`'s rule against the config of its newest readable checkpoint, else of
    its ``sft.yaml``); never ``init_from``, never another kind of run (ConfigError, before anything is
    written)."""
    if run_dir.resolve() == init_from.resolve():
        raise ConfigError(
            f"run.dir={str(run_dir)!r} is init.from: fine-tuning would overwrite the model it starts from; "
            "choose another run.dir"
        )
    if not run_dir.is_dir() or not [p for p in run_dir.iterdir() if p.name != ".lock"]:
        return Changes()
    if not (run_dir / "sft.yaml").is_file():
        raise ConfigError(
            f"run.dir={str(run_dir)!r} holds files but no fine-tuning run (no sft.yaml); choose a new folder"
        )
    saved = (ckpt.newest_meta(run_dir, cfg.checkpoint.keep) or {}).get("config")
    saved = saved or to_dict(load_config(str(run_dir / "sft.yaml"), cls=SFTConfig))
    return resume_changes(run_dir, cfg, saved, run_dir / "sft.yaml")


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


def check_checkpoints(run_dir: Path, key: str = "run.dir") -> None:
    """Refuses (ConfigError, before anything is written) a ``run_dir`` whose ``checkpoints`` is not a
    folder, or whose checkpoints folder holds something other than a folder under a step's name:
    a run would train without ever saving, and a save of that step would replace the user's file."""
    folder = Path(run_dir) / "checkpoints"
    if not (folder.exists() or folder.is_symlink()):
        return
    if not folder.is_dir():
        raise ConfigError(
            f"{key}={str(run_dir)!r} holds a file named checkpoints where its checkpoints folder belongs; "
            f"move that file away or choose another {key}"
        )
    steps = sorted((p for p in folder.iterdir() if p.name.isdigit() and not p.is_dir()), key=lambda p: int(p.name))
    if steps:
        raise ConfigError(
            f"{steps[0]} is a file, not a checkpoint: saving step {steps[0].name} would replace it; "
            f"move it out of {folder}"
        )
