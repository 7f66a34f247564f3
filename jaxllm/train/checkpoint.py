"""Checkpoints through orbax: the train state (params, optimizer state, step, RNG) plus a JSON record
of the model shape, the data position, the state's layout and a checksum of every array.

Restoring takes the *target* shardings, so a checkpoint written under one mesh resumes under any
other. Saving is collective: in a multi-host run every process calls :meth:`Checkpointer.save`.

Recovery never guesses. A checkpoint whose layout differs from the run's (another model shape,
another optimizer) is refused with the differing keys, and left where it is; only a checkpoint that
cannot be read or whose arrays fail their checksums is set aside (renamed ``corrupt-<step>[-n]``) for
the one before it. Only finite state is written, so every kept checkpoint is one a run can resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxllm.core.config import ModelConfig
from jaxllm.core.errors import ConfigError, UserError


class NonFiniteState(Exception):
    """The state to save holds a NaN or an infinity; nothing was written."""


# --------------------------------------------------------------------------- integrity


def _words_u32(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (1- and 2-byte elements widened, 8-byte ones split in two)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprint(leaves: list) -> tuple[jax.Array, jax.Array]:
    """``(all float leaves finite, uint32 checksum per leaf)``, computed where the arrays live.

    The checksum is sum(word_i * (2i + 1)) mod 2^32: exact in any reduction order (so any mesh gives
    the same value), and changed by any flipped bit or swapped pair of words."""
    finite = jnp.array(True)
    sums = []
    for x in leaves:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            finite &= jnp.all(jnp.isfinite(x))
        w = _words_u32(x).reshape(-1)
        sums.append(jnp.sum(w * (2 * jnp.arange(w.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32))
    return finite, jnp.stack(sums) if sums else jnp.zeros((0,), jnp.uint32)


def fingerprint(tree: Any) -> tuple[bool, list[int]]:
    """Whether every floating-point array of ``tree`` is finite, and the checksum of each leaf."""
    finite, sums = jax.device_get(_fingerprint(jax.tree.leaves(tree)))
    return bool(finite), [int(s) for s in sums]


def _key(k: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey (dataclass and namedtuple fields)
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _name(path: tuple) -> str:
    return ".".join(_key(k) for k in path)


def layout(tree: Any) -> dict[str, list]:
    """``{"params.wte.embedding": [[V, D], "float32"], ...}``: every leaf's name, shape and dtype."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_name(path): [list(x.shape), str(x.dtype)] for path, x in flat}


def intact(state: Any, meta: dict) -> bool:
    """Whether every array of ``state`` matches the checksum saved beside it, matched by name: a state
    restored for inference is a plain dict whose leaves come in another order than the train state's.
    A checkpoint without its checksums is not intact."""
    if "checksums" not in meta or "layout" not in meta:
        return False
    saved = dict(zip(meta["layout"], meta["checksums"]))
    return dict(zip(layout(state), fingerprint(state)[1])) == saved


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def layout_difference(saved: dict[str, list], current: dict[str, list]) -> str:
    """One line naming the leaves that differ between two :func:`layout` s ('' when none do)."""
    only_saved = sorted(set(saved) - set(current))
    only_current = sorted(set(current) - set(saved))
    changed = [
        f"{k} {tuple(saved[k][0])} {saved[k][1]} vs {tuple(current[k][0])} {current[k][1]}"
        for k in sorted(set(saved) & set(current))
        if list(saved[k]) != list(current[k])
    ]
    parts = [
        f"only in the checkpoint: {_few(only_saved)}" if only_saved else "",
        f"only in this run: {_few(only_current)}" if only_current else "",
        f"changed: {_few(changed)}" if changed else "",
    ]
    return "; ".join(p for p in parts if p)


# --------------------------------------------------------------------------- the checkpoints


@dataclasses.dataclass(frozen=True)
class Found:
    """One checkpoint as :meth:`Checkpointer.newest_first` read it: its state and meta when intact,
    else what is wrong: ``unreadable`` (the type of the error reading it) or ``corrupt`` (read, but
    its arrays' checksums differ from those saved with it)."""

    step: int
    state: Any = None
    meta: dict | None = None
    unreadable: str = ""
    corrupt: bool = False

    @property
    def intact(self) -> bool:
        return not (self.unreadable or self.corrupt)


# Orbax splits the writing of every replicated array among its replicas, compiling a slicing program
# per array shape, which makes a small state's first save several times slower; below this many
# bytes per replica the compilation costs more than the split saves.
REPLICA_PARALLEL_MIN_BYTES = 16 << 20


def use_replica_parallel_writes_for_large_arrays_only() -> None:
    """Registers orbax's jax.Array handler with :data:`REPLICA_PARALLEL_MIN_BYTES` (process-wide:
    orbax's standard handler reads its type handlers from the global registry)."""
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def _drop_closed_loop_reports() -> None:
    """Installs (once) a ``sys.unraisablehook`` that drops one report: ``RuntimeError('Event loop is
    closed')`` with no object, which tensorstore raises from its writer threads for every write still
    in flight when a failed save's event loop has closed (dozens of tracebacks for one full disk).
    The failure itself reaches the user once, as save()'s or wait()'s one line; every other
    unraisable exception goes to the hook that was there."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(unraisable) -> None:
        e = unraisable.exc_value
        if unraisable.object is None and isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook


class Checkpointer:
    """``run_dir/checkpoints/<step>/{state,meta}``, keeping the newest ``keep``."""

    def __init__(self, run_dir: Path, keep: int):
        self.directory = (Path(run_dir) / "checkpoints").absolute()
        # orbax logs each failure of its background writers with a traceback (absl, asyncio); a failed
        # write reaches the user once, as the one-line UserError of save() or wait().
        for name in ("absl", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        _drop_closed_loop_reports()
        self.failed = False
        use_replica_parallel_writes_for_large_arrays_only()
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
                item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            )
        except OSError as e:
            raise UserError(f"cannot write checkpoints to {self.directory}: {e.strerror or e}") from None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Writes ``state`` (with its layout and checksums added to ``meta``); refuses non-finite state."""
        finite, sums = fingerprint(state)
        if not finite:
            raise NonFiniteState(f"the state at step {step} is not finite")
        meta = {**meta, "layout": layout(state), "checksums": sums}
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        except Exception as e:  # noqa: BLE001  (an earlier asynchronous save's failure surfaces here too)
            raise self._write_error(e) from None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001  (as above)
            raise self._write_error(e) from None

    def _write_error(self, e: Exception) -> UserError:
        """One line for a failed write: the OS's reason (full disk, read-only) when tensorstore gives it."""
        self.failed = True
        code = re.search(r"os_error_code='(\d+)'", str(e))
        reason = (
            os.strerror(int(code.group(1))) if code else getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        )
        return UserError(f"cannot write checkpoints to {self.directory}: {reason}")

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def newest_meta(self) -> dict | None:
        """The record saved with the newest readable checkpoint (None: none is readable)."""
        for step in reversed(self.steps()):
            try:
                return self.read_meta(step)
            except Exception:  # noqa: BLE001, S112  (unreadable: restore_latest reports it and falls back)
                continue
        return None

    def newest_first(self, read: Callable[[int, dict], Any]) -> Iterator[Found]:
        """Every checkpoint, newest first, read by ``read(step, meta)`` and checked against its checksums:
        what both training's restore and ``jaxllm.load`` walk until the first intact one. A ConfigError
        from ``read`` (a checkpoint of another config) is raised, not reported as damage."""
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
                state = read(step, meta)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001  (orbax raises many types for a damaged directory)
                yield Found(step, unreadable=type(e).__name__)
                continue
            yield Found(step, state, meta) if intact(state, meta) else Found(step, corrupt=True)

    def restore_latest(self, abstract_state: Any, model: ModelConfig) -> tuple[Any, dict] | None:
        """The newest intact checkpoint as ``(state, meta)``, or None when the run has none yet.

        A checkpoint of another layout (model shape, optimizer) is refused (ConfigError), nothing
        moved; a damaged one is set aside and the one before it used. When checkpoints were written
        but none is intact the run stops (UserError) rather than start over."""
        set_aside = []
        for found in self.newest_first(lambda step, meta: self._restore(step, meta, abstract_state, model)):
            if found.intact:
                return found.state, found.meta
            why = (
                f"is unreadable ({found.unreadable})"
                if found.unreadable
                else "fails its integrity check (its arrays' checksums differ from those saved with it)"
            )
            set_aside.append(self._set_aside(found.step, why))
        earlier = sorted(p.name for p in self.directory.glob("corrupt-*")) if self.directory.is_dir() else []
        if set_aside or earlier:
            raise UserError(
                f"no intact checkpoint in {self.directory} (set aside: {', '.join(set_aside or earlier)}); "
                "to start this run over, move those folders out of checkpoints/"
            )
        return None

    def _restore(self, step: int, meta: dict, abstract_state: Any, model: ModelConfig) -> Any:
        """Checkpoint ``step``'s state in ``abstract_state``'s tree and shardings; raises ConfigError if
        it is another config's."""
        check_same_model(meta.get("model", {}), model, self.directory)
        saved = meta.get("layout") or layout(self.manager.item_metadata(step)["state"])
        diff = layout_difference(saved, layout(abstract_state))
        if diff:
            raise ConfigError(
                f"checkpoint {step} in {self.directory} was written by another configuration ({diff}); "
                "run with the config it was written with, or choose another run.dir"
            )
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
            "state"
        ]

    def _set_aside(self, step: int, why: str) -> str:
        """Renames checkpoint ``step`` to a ``corrupt-<step>`` name no earlier one holds (kept for
        inspection, out of the way of the step that will be saved again under its number)."""
        target, n = self.directory / f"corrupt-{step}", 1
        while target.exists():
            n += 1
            target = self.directory / f"corrupt-{step}-{n}"
        print(f"warning: checkpoint {step} {why}; moved to {target}, using the previous one", file=sys.stderr)
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        self.manager.reload()
        return target.name

    def restore_single_device(self, step: int) -> Any:
        """The saved state tree onto one device, whatever mesh wrote it (for inference)."""
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        saved = self.manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        return restored

    def close(self) -> None:
        """Waits for the last save; after a failed one, removes what it left half-written."""
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):  # the failure, if any, is being raised by wait()
                self.manager.close()
            if self.failed and jax.process_index() == 0:
                self._discard_unfinished()

    def _discard_unfinished(self) -> None:
        """Removes orbax's temporary folders of unfinished saves (``<step>.orbax-checkpoint-tmp...``):
        never a checkpoint a run could restore, and on a full disk the space the next save needs."""
        for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
            if tmp.name.split(".", 1)[0].isdigit():
                shutil.rmtree(tmp, ignore_errors=True)


SHAPE_KEYS = (
    "arch",
    "n_layer",
    "d_model",
    "n_head",
    "n_kv_head",
    "d_ff",
    "vocab_size",
    "max_seq_len",
    "tie_embeddings",
    "norm_position",
    "adapter_dim",
    "prompt_tokens",
)


def newest_meta(run_dir: Path, keep: int) -> dict | None:
    """The record saved with ``run_dir``'s newest readable checkpoint (None: it holds none); reads only."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not (ckpt_dir.is_dir() and any(ckpt_dir.iterdir())):
        return None
    checker = Checkpointer(Path(run_dir), keep)
    try:
        return checker.newest_meta()
    finally:
        checker.close()


def check_same_model(saved: dict, model: ModelConfig, where: Path) -> None:
    current = dataclasses.asdict(model)
    diff = [f"{k}: {saved.get(k)!r} vs {current[k]!r}" for k in SHAPE_KEYS if k in saved and saved[k] != current[k]]
    if diff:
        raise ConfigError(
            f"{where} holds a checkpoint of a different model ({'; '.join(diff)}); choose another run.dir or delete it"
        )


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restoring onto a (possibly new) mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
