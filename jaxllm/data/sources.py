"""Documents from every kind of source, read one at a time: the inputs of :mod:`jaxllm.data.prepare`.

A source expands to *pieces*, slices of one input that can be read on their own:

    text       a text file, one document (a folder's or a glob's files)
    single     one document split by its tail for validation (a text file alone, ``synthetic:...``)
    jsonl      a byte range of a ``.jsonl`` file: the records whose line starts in it
    jsonl.gz / jsonl.zst   a whole compressed ``.jsonl`` file (a stream cannot be entered midway)
    parquet    a range of a ``.parquet`` file's row groups (pyarrow, by record batches)
    arrow      one arrow file of a ``datasets`` ``save_to_disk`` directory
    hub        one shard of a Hugging Face Hub dataset, streamed (``hf:NAME[:CONFIG][/SPLIT]``)

:func:`expand` turns sources into pieces; :func:`group` packs consecutive pieces into *parts* of about
``part_bytes`` of input, the unit a preparation task prepares and a rerun resumes from.
:func:`documents` reads a part's documents, each with its validation flag: a hash of the document's
identity (path and byte offset, line or row), so the split does not depend on how pieces are grouped.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

from jaxllm.core.errors import DataError
from jaxllm.core.fileio import read_json
from jaxllm.data import synthetic

JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst")


@dataclass(frozen=True)
class Piece:
    kind: str  # one of the kinds in the module docstring
    path: str  # a file, a Hub dataset's "name|config|split", or a synthetic spec
    start: int = 0  # byte offset (jsonl), first row group (parquet), shard (hub)
    stop: int = 0  # end of that range (exclusive)
    size: int = 0  # bytes of input, to group pieces into parts


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted, without its tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "idle_test", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):  # pruned as it goes: rglob would visit every skipped tree
        subfolders[:] = [d for d in subfolders if d not in skip]
        files += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts[-2:]))


def _file_pieces(path: Path, text_field: str, part_bytes: int) -> list[Piece]:
    """The pieces of one file, by its name's ending; any other file is a text document."""
    name, size = path.as_posix(), path.stat().st_size
    if name.endswith(".jsonl"):
        return [
            Piece("jsonl", name, a, min(a + part_bytes, size), min(part_bytes, size - a))
            for a in range(0, size, part_bytes)
        ]
    if name.endswith((".jsonl.gz", ".jsonl.zst")):
        return [Piece(name[name.rindex(".jsonl") + 1 :], name, size=size)]
    if name.endswith(".parquet"):
        return _parquet_pieces(path, text_field, part_bytes)
    return [Piece("text", name, size=size)] if size else []


def _parquet_pieces(path: Path, text_field: str, part_bytes: int) -> list[Piece]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path} is not a readable parquet file ({' '.join(str(e).split())[:160]})") from None
    _check_column(meta.schema.to_arrow_schema(), text_field, path)
    pieces, first, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size  # uncompressed: the work it takes
        if size >= part_bytes or g == meta.num_row_groups - 1:
            pieces.append(Piece("parquet", path.as_posix(), first, g + 1, size))
            first, size = g + 1, 0
    return pieces


def _check_column(schema, text_field: str, path: Path | str) -> None:
    import pyarrow as pa

    if text_field not in schema.names:
        raise DataError(
            f"{path} has no column {text_field!r} (its columns: {', '.join(schema.names)}); "
            "name the text column with --text-field"
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {text_field!r} holds {kind}, not text; name the text column with --text-field")


def _saved_dataset_pieces(folder: Path, text_field: str) -> list[Piece]:
    """The arrow files of a ``datasets`` ``save_to_disk`` directory (a DatasetDict: its train split)."""
    import pyarrow as pa

    if (folder / "dataset_dict.json").is_file():
        splits = read_json(folder / "dataset_dict.json", "dataset dict").get("splits") or []
        if not splits:
            raise DataError(f"{folder}/dataset_dict.json names no splits")
        folder = folder / ("train" if "train" in splits else splits[0])
    files = [folder / f["filename"] for f in read_json(folder / "state.json", "dataset state").get("_data_files", [])]
    for f in files:
        try:
            with pa.memory_map(str(f)) as source:
                _check_column(pa.ipc.open_stream(source).schema, text_field, f)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{f} is not a readable arrow file ({' '.join(str(e).split())[:160]})") from None
    return [Piece("arrow", f.as_posix(), size=f.stat().st_size) for f in files]


def parse_hub(source: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][/SPLIT]`` (NAME may be ``org/name``) -> (name, config, split)."""
    spec = source[len("hf:") :]
    name, _, config = spec.partition(":")
    split = "train"
    if config and "/" in config:
        config, split = config.split("/", 1)
    elif name.count("/") == 2:
        name, split = name.rsplit("/", 1)
    if not name:
        raise DataError(f"{source!r}: write a Hub dataset as hf:NAME[:CONFIG][/SPLIT]")
    return name, config or None, split


def open_hub(name: str, config: str | None, split: str):
    """The Hub dataset, streamed: nothing is downloaded before it is read."""
    try:
        import datasets
    except ImportError:
        raise DataError("hf: sources need the datasets library: pip install datasets") from None
    import huggingface_hub.utils

    datasets.logging.set_verbosity_error()  # the retries' warnings would bury the one-line error
    huggingface_hub.utils.logging.set_verbosity_error()
    datasets.logging.disable_progress_bar()
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001  (datasets and huggingface_hub raise many types: network, auth, names)
        raise DataError(f"hf:{name}: cannot open the Hub dataset ({' '.join(str(e).split())[:200]})") from None


def _hub_pieces(source: str, part_bytes: int) -> list[Piece]:
    name, config, split = parse_hub(source)
    ds = open_hub(name, config, split)
    n = getattr(ds, "num_shards", None) or ds.n_shards
    key = f"{name}|{config or ''}|{split}"
    return [Piece("hub", key, i, n, part_bytes) for i in range(n)]


def _source_files(source: str) -> list[Path]:
    path = Path(source)
    if source == "stdlib":
        return stdlib_files()
    if path.is_dir():
        return _folder_files(path)
    if path.is_file():
        return [path]
    files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"source {source!r}: no such file or folder, and no file matches it as a glob")
    return files


def _source_pieces(source: str, text_field: str, part_bytes: int) -> list[Piece]:
    if source.startswith("synthetic:"):
        return [Piece("single", source, size=synthetic.parse(source).tokens)]
    if source.startswith("hf:"):
        return _hub_pieces(source, part_bytes)
    if Path(source).is_dir() and (
        (Path(source) / "state.json").is_file() or (Path(source) / "dataset_dict.json").is_file()
    ):
        return _saved_dataset_pieces(Path(source), text_field)
    pieces = [p for f in _source_files(source) for p in _file_pieces(f, text_field, part_bytes)]
    if len(pieces) == 1 and pieces[0].kind == "text":  # one document: its tail is the validation split
        pieces = [Piece("single", pieces[0].path, size=pieces[0].size)]
    if not pieces:
        raise DataError(f"source {source!r} holds no documents (only empty files)")
    return pieces


def expand(sources: list[str], text_field: str, part_bytes: int) -> list[Piece]:
    """Every source's pieces, in order; a missing or empty source is a DataError."""
    if not sources:
        raise DataError("no source given: name text files, folders, globs, .jsonl(.gz/.zst), .parquet or hf:NAME")
    return [p for s in sources for p in _source_pieces(s, text_field, part_bytes)]


def group(pieces: list[Piece], part_bytes: int) -> list[tuple[Piece, ...]]:
    """Consecutive pieces packed into parts of at most ``part_bytes`` of input (a larger piece alone)."""
    parts: list[tuple[Piece, ...]] = []
    current: list[Piece] = []
    size = 0
    for piece in pieces:
        if current and size + piece.size > part_bytes:
            parts.append(tuple(current))
            current, size = [], 0
        current.append(piece)
        size += piece.size
    return [*parts, tuple(current)] if current else parts


def is_val(identity: str, val_fraction: float) -> bool:
    return zlib.crc32(identity.encode()) % 10_000 < val_fraction * 10_000
