"""Checkpoints through orbax: the train state (params, optimizer state, step, RNG) plus a JSON record
of the model shape and the data position.

Restoring takes the *target* shardings, so a checkpoint written under one mesh resumes under any
other. Saving is collective: in a multi-host run every process calls :meth:`Checkpointer.save`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxllm.config import ModelConfig
from jaxllm.errors import ConfigError


class Checkpointer:
    """``run_dir/checkpoints/<step>/{state,meta}``, keeping the newest ``keep``."""

    def __init__(self, run_dir: Path, keep: int):
        self.directory = (Path(run_dir) / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_model(self, model: ModelConfig) -> None:
        """Refuses (ConfigError) a run directory whose newest readable checkpoint is another model."""
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception:  # noqa: BLE001, S112  (unreadable: restore_latest reports it and falls back)
                continue
            check_same_model(meta.get("model", {}), model, self.directory)
            return

    def restore_latest(self, abstract_state: Any, model: ModelConfig) -> tuple[Any, dict] | None:
        """The newest readable checkpoint as ``(state, meta)``, or None when there is none.

        A checkpoint of a different model shape is refused (ConfigError); an unreadable newest
        checkpoint is reported and the one before it used.
        """
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001  (orbax raises many types for a damaged directory)
                self._set_aside(step, e)
                continue
            check_same_model(meta.get("model", {}), model, self.directory)
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
            except Exception as e:  # noqa: BLE001  (as above)
                self._set_aside(step, e)
                continue
            return restored["state"], meta
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        """Renames an unreadable checkpoint to ``corrupt-<step>`` (kept for inspection, out of the way
        of the step that will be saved again under its number)."""
        target = self.directory / f"corrupt-{step}"
        print(
            f"warning: checkpoint {step} is unreadable ({type(error).__name__}); moved to {target}, "
            "using the previous one",
            file=sys.stderr,
        )
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        self.manager.reload()

    def restore_single_device(self, step: int) -> Any:
        """The saved state tree onto one device, whatever mesh wrote it (for inference)."""
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        saved = self.manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


SHAPE_KEYS = ("arch", "n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size", "max_seq_len", "tie_embeddings", "norm_position")


def check_same_model(saved: dict, model: ModelConfig, where: Path) -> None:
    current = dataclasses.asdict(model)
    diff = [f"{k}: {saved.get(k)!r} vs {current[k]!r}" for k in SHAPE_KEYS if k in saved and saved[k] != current[k]]
    if diff:
        raise ConfigError(
            f"{where} holds a checkpoint of a different model ({'; '.join(diff)}); "
            "choose another run.dir or delete it"
        )


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restoring onto a (possibly new) mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
