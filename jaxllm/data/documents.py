"""Reading a part's documents one at a time (the pieces of :mod:`jaxllm.data.sources`).

Each reader yields ``(identity, text)``: the identity names where the document came from (a path,
with the byte offset of a ``.jsonl`` line, a compressed file's line number, a table's row), and a
hash of it decides whether the document goes to validation. Bad content is a one-line DataError
naming the file and the place: bytes that are not UTF-8 (their byte offset), a line that is not a
JSON object or lacks the text field.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterator

from jaxllm.core.errors import DataError
from jaxllm.core.fileio import decode_utf8, read_bytes
from jaxllm.data import synthetic
from jaxllm.data.sources import Piece, is_val, open_hub

Docs = Iterator[tuple[str, str]]


def _record(line: bytes, field: str, path: str, offset: int, where: str) -> str | None:
    """The text of one JSON line; ``offset`` is the line's first byte, for a UTF-8 error."""
    if not line.strip():
        return None
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {offset + e.start}: {e.reason})") from None
    try:
        record = json.loads(decoded)
    except (json.JSONDecodeError, RecursionError):
        raise DataError(f"{path}: {where} is not valid JSON") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where} is not a JSON object")
    text = record.get(field)
    if not isinstance(text, str):
        raise DataError(f"{path}: {where} has no string field {field!r}; name the text field with --text-field")
    return text if text.strip() else None


def _text(piece: Piece, field: str) -> Docs:
    raw = read_bytes(piece.path, "source file")
    if b"\0" in raw[:4096]:
        return  # a binary file in a folder of text
    text = decode_utf8(raw, piece.path, "source file")
    if text.strip():
        yield piece.path, text


def _jsonl_range(piece: Piece, field: str) -> Docs:
    """The records whose line starts in ``[piece.start, piece.stop)``."""
    with open(piece.path, "rb") as f:
        pos = piece.start
        if pos:  # skip the line that began in the previous range
            f.seek(pos - 1)
            pos += len(f.readline()) - 1
        while pos < piece.stop:
            line = f.readline()
            if not line:
                break
            text = _record(line, field, piece.path, pos, f"the line at byte {pos}")
            if text is not None:
                yield f"{piece.path}:{pos}", text
            pos += len(line)


def _open_compressed(piece: Piece):
    if piece.kind == "jsonl.gz":
        return gzip.open(piece.path, "rb")
    import zstandard

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(piece.path, "rb"), closefd=True))


def _jsonl_compressed(piece: Piece, field: str) -> Docs:
    import zstandard

    pos = 0
    try:
        with _open_compressed(piece) as f:
            for n, line in enumerate(f, start=1):
                text = _record(line, field, piece.path, pos, f"line {n}")
                if text is not None:
                    yield f"{piece.path}:{n}", text
                pos += len(line)
    except (EOFError, OSError, zstandard.ZstdError) as e:
        raise DataError(f"{piece.path} cannot be decompressed after byte {pos} ({e})") from None


def _strings(texts: list, path: str, first_row: int) -> Docs:
    for i, text in enumerate(texts):
        if isinstance(text, str) and text.strip():
            yield f"{path}:{first_row + i}", text


def _parquet(piece: Piece, field: str) -> Docs:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(piece.path)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(piece.start))
    for batch in pf.iter_batches(batch_size=1024, row_groups=range(piece.start, piece.stop), columns=[field]):
        yield from _strings(_column(batch, 0, piece.path, row), piece.path, row)
        row += batch.num_rows


def _column(batch, index: int, path: str, row: int) -> list:
    try:
        return batch.column(index).to_pylist()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: a text in rows {row}-{row + batch.num_rows} is not UTF-8 ({e.reason})") from None


def _arrow(piece: Piece, field: str) -> Docs:
    import pyarrow as pa

    with pa.memory_map(piece.path) as source:
        row = 0
        for batch in pa.ipc.open_stream(source):
            yield from _strings(_column(batch, batch.schema.get_field_index(field), piece.path, row), piece.path, row)
            row += batch.num_rows


def _hub(piece: Piece, field: str) -> Docs:
    name, config, split = piece.path.split("|")
    shard = open_hub(name, config or None, split).shard(num_shards=piece.stop, index=piece.start)
    where = f"hf:{name} shard {piece.start}"
    try:
        for i, record in enumerate(shard):
            text = record.get(field)
            if not isinstance(text, str):
                raise DataError(f"{where}: record {i} has no string field {field!r}; name it with --text-field")
            if text.strip():
                yield f"hf:{name}:{config}/{split}:{piece.start}:{i}", text
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (network and format errors of datasets/huggingface_hub)
        raise DataError(f"{where}: cannot read ({' '.join(str(e).split())[:200]})") from None


def single_text(piece: Piece) -> str:
    if piece.path.startswith("synthetic:"):
        return synthetic.sample_text(synthetic.parse(piece.path))
    return decode_utf8(read_bytes(piece.path, "source file"), piece.path, "source file")


READERS: dict[str, Callable[[Piece, str], Docs]] = {
    "text": _text,
    "jsonl": _jsonl_range,
    "jsonl.gz": _jsonl_compressed,
    "jsonl.zst": _jsonl_compressed,
    "parquet": _parquet,
    "arrow": _arrow,
    "hub": _hub,
}


def documents(
    part: tuple[Piece, ...], field: str, val_fraction: float, first: bool = False
) -> Iterator[tuple[bool, str]]:
    """``(is_val, text)`` for every document of a part, in order. A single document is split by its
    tail; with ``first`` (the corpus's first part) its first document goes to validation whatever
    its hash, so that a small corpus has a validation split."""
    for piece in part:
        if piece.kind == "single":
            text = single_text(piece)
            cut = int(len(text) * (1 - val_fraction))
            yield from ((v, t) for v, t in ((False, text[:cut]), (True, text[cut:])) if t)
        else:
            for identity, text in READERS[piece.kind](piece, field):
                yield (first and val_fraction > 0) or is_val(identity, val_fraction), text
                first = False
        first = False
