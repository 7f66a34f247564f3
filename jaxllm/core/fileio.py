"""Reading and writing the product's files: one helper per mechanism, every failure a one-line UserError.

- ``atomic_write``: write beside the target, then rename; a crash never leaves half a file.
- ``read_text`` / ``read_json`` / ``read_yaml`` / ``read_jsonl``: one reader per format; a missing
  file, bytes that are not UTF-8, a syntax error, a self-referencing YAML alias or the wrong
  top-level type is a :class:`DataError` naming the path, never a traceback.
- ``check_folder_path``: a folder the run will write (run.dir) is refused before any write when it
  is a file, lies under a file or is not writable.
- ``dir_lock``: an exclusive lock on a folder (a run directory, a sweep's output) held while one
  process writes there; the OS drops it when the process dies, so a crash never leaves it stuck.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from jaxllm.core.errors import DataError, UserError


def _os_error(action: str, path: Path, e: OSError) -> UserError:
    return UserError(f"cannot {action} {path}: {e.strerror or e}")


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it: once, at import, before any thread
    os.umask(umask)
    return umask


UMASK = _read_umask()


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~UMASK


def atomic_write(path: Path | str, data: str | bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, then renames it over ``path``. The file
    keeps the mode of the one it replaces; a new one gets the mode ``open`` would give it (0666
    less the umask), not the temporary file's private 0600."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _os_error("write", path, e) from None
    try:
        os.chmod(tmp, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _os_error("write", path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path | str, document: Any) -> None:
    """``document`` as indented JSON (no NaN: JSON has none), written atomically."""
    atomic_write(path, json.dumps(document, indent=2, allow_nan=False) + "\n")


def read_bytes(path: Path | str, what: str = "file") -> bytes:
    """The bytes of ``path``; ``what`` names it in errors (``"config file"``, ``"corpus"``)."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise DataError(f"{what} {path} is a folder, not a file") from None
    except OSError as e:
        raise _os_error(f"read {what}", path, e) from None


def decode_utf8(raw: bytes, path: Path | str, what: str = "file") -> str:
    """``raw`` as UTF-8 text; bytes that are not UTF-8 are refused, naming the file and the byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_text(path: Path | str, what: str = "file") -> str:
    """The UTF-8 text of ``path``."""
    return decode_utf8(read_bytes(path, what), path, what)


def read_json(path: Path | str, what: str = "JSON file", expect: type = dict) -> Any:
    """A JSON document whose top level is ``expect`` (``dict`` or ``list``)."""
    text = read_text(path, what)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except RecursionError:
        raise DataError(f"{what} {path} is nested too deeply to read") from None
    if not isinstance(doc, expect):
        raise DataError(f"{what} {path} must hold a JSON {'object' if expect is dict else expect.__name__}")
    return doc


def read_yaml(path: Path | str, what: str = "YAML file") -> dict:
    """A YAML mapping (safe loader: no Python tags); an empty file is ``{}``."""
    text = read_text(path, what)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DataError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise DataError(f"{what} {path} refers to itself (a recursive YAML alias)") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise DataError(f"{what} {path} must hold a mapping")
    if _contains_itself(doc, ()):
        raise DataError(f"{what} {path} refers to itself (a recursive YAML alias)")
    return doc


def _contains_itself(node: Any, ancestors: tuple[int, ...]) -> bool:
    """Whether a container holds itself at some depth (YAML anchors can make such a cycle)."""
    if not isinstance(node, (dict, list)):
        return False
    if id(node) in ancestors:
        return True
    children = node.values() if isinstance(node, dict) else node
    return any(_contains_itself(child, (*ancestors, id(node))) for child in children)


def read_jsonl(path: Path | str, what: str = "JSONL file", torn_tail_ok: bool = False) -> list[dict]:
    """One JSON object per line. With ``torn_tail_ok``, an unreadable *last* line (a write cut short by a
    crash) is dropped instead of refused; the caller decides whether to warn and rewrite the file."""
    return [record for _, record in read_jsonl_numbered(path, what, torn_tail_ok)]


def read_jsonl_numbered(
    path: Path | str, what: str = "JSONL file", torn_tail_ok: bool = False, max_line: int | None = None
) -> list[tuple[int, dict]]:
    """:func:`read_jsonl` with each record's line number, for errors about a record's content; a line
    longer than ``max_line`` characters (None: any length) is refused before it is parsed."""
    lines = read_text(path, what).splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        if max_line is not None and len(line) > max_line:
            raise DataError(f"{what} {path}:{n} holds {len(line):,} characters, above the {max_line:,} a record may")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if torn_tail_ok and n == len(lines):
                break
            raise DataError(f"{what} {path}:{n} is not valid JSON") from None
        except RecursionError:
            raise DataError(f"{what} {path}:{n} is nested too deeply to read") from None
        if not isinstance(record, dict):
            raise DataError(f"{what} {path}:{n} must be a JSON object")
        records.append((n, record))
    return records


def check_folder_path(path: Path | str, what: str) -> None:
    """Refuses, before anything is written, a ``path`` that cannot become a writable folder: an existing
    file, a file where a parent folder should be, or an existing folder this process may not write."""
    path = Path(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, a file"
        raise UserError(f"{what}={str(path)!r} {where}, not a folder; choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what}={str(path)!r}: {existing} is not writable by this user")


@contextlib.contextmanager
def dir_lock(directory: Path | str, holder: str = "another process") -> Iterator[None]:
    """Holds an exclusive, non-blocking lock on ``directory/.lock`` for the ``with`` body.

    A second process asking for it gets a one-line UserError naming ``holder`` and the folder."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        f = open(directory / ".lock", "w")  # noqa: SIM115 (held open for the lock's lifetime)
    except OSError as e:
        raise _os_error("lock", directory, e) from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{holder} is writing to {directory}; wait for it to finish or choose another folder"
            ) from None
        yield
