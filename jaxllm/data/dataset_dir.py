"""The dataset folder a preparation writes: its plan, who may write there, finished parts, the index.

``parts/plan.json`` pins a preparation's inputs, options and parts: a task that finds another plan
there stops, and a folder holding anything but a preparation's files is refused. ``parts/<p>.json``
records a finished part (its shards, with sizes and sha256 sums); :func:`finish` turns the records
into ``index.json`` once every part has one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from jaxllm.core.errors import DataError, UserError
from jaxllm.core.fileio import atomic_write, read_json, write_json
from jaxllm.data import tokenizer as tokenizers
from jaxllm.data.shard_writer import END_DTYPE
from jaxllm.data.shards import FORMAT, INDEX, SPLITS, token_dtype
from jaxllm.data.sources import Piece

OURS = re.compile(r"(index\.json|tokenizer(_config)?\.json|parts|(train|val)-\d{5}-\d{4}\.(bin|idx)|\..*\.tmp)")


def inputs(pieces: Iterable[Piece]) -> list[dict]:
    """Each input once: a file's path and size, a Hub dataset's name, a synthetic spec."""
    seen: dict[str, dict] = {}
    for p in pieces:
        if p.path not in seen:
            if p.kind == "hub":
                seen[p.path] = {"hub": p.path, "shards": p.stop}
            elif p.path.startswith("synthetic:"):
                seen[p.path] = {"synthetic": p.path}
            else:
                seen[p.path] = {"path": p.path, "bytes": os.path.getsize(p.path)}
    return list(seen.values())


def plan(parts: list[tuple[Piece, ...]], tokenizer: dict, options: dict) -> bytes:
    plan = {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "options": options,
        "inputs": inputs(p for part in parts for p in part),
        "parts": [[[p.kind, p.path, p.start, p.stop] for p in part] for part in parts],
    }
    return (json.dumps(plan, indent=1) + "\n").encode()


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None if ``path`` exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def claim(root: Path, plan: bytes) -> Path | None:
    """Makes ``root`` this preparation's folder, refusing a file, a folder of other files or another
    preparation's folder; returns the outermost folder this call created (None if ``root`` existed)."""
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file, not a folder")
    plan_path = root / "parts" / "plan.json"
    if plan_path.is_file():
        if plan_path.read_bytes() != plan:
            raise DataError(
                f"--out {root} holds a preparation of other sources or options; delete it or choose another folder"
            )
        return False
    others = (
        sorted(p.name for p in root.iterdir() if not OURS.fullmatch(p.name) or p.name == INDEX) if root.is_dir() else []
    )
    if others:
        raise DataError(f"--out {root} holds other files ({others[0]}, ...); choose a new or empty folder")
    created = _first_missing(root.absolute())
    try:
        (root / "parts").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {root}: {e.strerror}") from None
    atomic_write(plan_path, plan)
    return created


def unclaim(root: Path, created: Path) -> None:
    """Removes ``root`` and the folders above it up to ``created`` (what :func:`claim` made), each
    only while empty: a folder another preparation wrote into meanwhile stays."""
    shutil.rmtree(root, ignore_errors=True)
    folder = root.absolute().parent
    while created in (folder, *folder.parents):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def place_once(source: Path, target: Path) -> None:
    """Moves ``source`` to ``target`` unless a concurrent task put one there first (then keeps that)."""
    try:
        os.link(source, target)  # atomic: fails if the target exists
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links (a FUSE bucket mount): check, then rename
        if not target.exists():
            os.replace(source, target)


def part_done(root: Path, p: int, itemsize: int) -> bool:
    """Whether part ``p`` was finished and its shards are all there at their sizes."""
    meta = root / "parts" / f"{p:05d}.json"
    if not meta.is_file():
        return False
    shards = read_json(meta, "part record")["shards"]
    for s in (s for split in SPLITS for s in shards[split]):
        for suffix, size in ((".bin", s["tokens"] * itemsize), (".idx", s["documents"] * END_DTYPE.itemsize)):
            f = root / f"{s['name']}{suffix}"
            if not f.is_file() or f.stat().st_size != size:
                return False
    return True


def finish(root: Path, plan: bytes, n_parts: int, tok: tokenizers.Tokenizer) -> dict | None:
    """Writes ``index.json`` if every part is finished; returns the index (None if parts remain)."""
    metas = []
    for p in range(n_parts):
        if not (root / "parts" / f"{p:05d}.json").is_file():
            return None
        metas.append(read_json(root / "parts" / f"{p:05d}.json", "part record"))
    shards = {s: [sh for m in metas for sh in m["shards"][s]] for s in SPLITS}
    if not shards["train"]:
        raise DataError("the sources hold no training documents (empty files, or every document in validation)")
    planned = json.loads(plan)
    index = {
        "format": FORMAT,
        "dtype": token_dtype(tok.vocab_size),
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "tokenizer": {
            **planned["tokenizer"],
            "sha256": hashlib.sha256((root / tokenizers.FILENAME).read_bytes()).hexdigest(),
        },
        "options": planned["options"],
        "inputs": planned["inputs"],
        "splits": {
            s: {"documents": sum(x["documents"] for x in v), "tokens": sum(x["tokens"] for x in v), "shards": v}
            for s, v in shards.items()
        },
    }
    for stray in root.glob(".*.tmp"):  # left by an interrupted run; every part is finished now
        if stray.is_dir():
            shutil.rmtree(stray, ignore_errors=True)
        else:
            stray.unlink(missing_ok=True)
    write_json(root / INDEX, index)
    return index
