"""Corpus -> tokens on disk -> batches.

1. :func:`read_corpus` turns ``data.source`` into train and validation documents. The built-in
   corpus is the Python standard library's own ``.py`` sources (no download, ever); folders and
   globs are split by file (a hash of the path decides), a single file or document by its tail.
2. :func:`prepare` tokenizes once into ``train.bin`` / ``val.bin`` (uint16 or uint32 memmaps) in a
   cache directory keyed by the corpus (paths, sizes, mtimes), the tokenizer and the split.
3. :func:`train_batch` is a pure function of ``(seed, step, process)``: a resumed run and every host
   of a multi-host run draw exactly the rows an uninterrupted single-process run would.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxllm.core.errors import DataError
from jaxllm.core.fileio import decode_utf8, read_bytes, read_jsonl_numbered, write_json
from jaxllm.data import synthetic
from jaxllm.data import tokenizer as tokenizers

SEPARATOR = "\n"


@dataclass(frozen=True)
class Corpus:
    """Where the text comes from, without reading it: ``key`` changes whenever the text would."""

    source: str
    files: tuple[Path, ...]  # empty for synthetic sources
    key: str


@dataclass
class TokenData:
    train: np.ndarray  # [n_train] token ids, a read-only memmap
    val: np.ndarray  # [n_val]
    tokenizer: tokenizers.Tokenizer
    cache_dir: Path


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted, without its tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "idle_test", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):  # pruned as it goes: rglob visited every skipped tree (0.6 s)
        subfolders[:] = [d for d in subfolders if d not in skip]
        files += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts[-2:]))


def locate(source: str) -> Corpus:
    """Resolves ``data.source`` to its files (or a synthetic spec) and a cache key."""
    if source.startswith("synthetic:"):
        synthetic.parse(source)
        return Corpus(source, (), hashlib.sha256(source.encode()).hexdigest()[:16])
    if source == "stdlib":
        files = stdlib_files()
    elif Path(source).is_dir():
        files = _text_files(Path(source))
    elif Path(source).is_file():
        files = [Path(source)]
    else:
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.source={source!r}: no such file or folder, and no file matches it as a glob")
    if not files:
        raise DataError(f"data.source={source!r} holds no files")
    h = hashlib.sha256(source.encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return Corpus(source, tuple(files), h.hexdigest()[:16])


def _is_val(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000


def _split_docs(names: list[str], docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Whole documents to validation by a hash of their name; one document is split by its tail."""
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1 - val_fraction))
        return [docs[0][:cut]], [docs[0][cut:]]
    is_val = [_is_val(n, val_fraction) for n in names]
    if not any(is_val):  # small corpora: hold out the document whose hash is lowest
        is_val[min(range(len(names)), key=lambda i: zlib.crc32(names[i].encode()))] = True
    if all(is_val):
        is_val[0] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, record in read_jsonl_numbered(path, "corpus"):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: each line needs a string field 'text'")
        docs.append(record["text"])
    return docs


def read_corpus(corpus: Corpus, val_fraction: float) -> tuple[list[str], list[str]]:
    """The train and validation documents of a corpus (reads every file once)."""
    if corpus.source.startswith("synthetic:"):
        return _split_docs(["all"], [synthetic.sample_text(synthetic.parse(corpus.source))], val_fraction)
    if len(corpus.files) == 1 and corpus.files[0].suffix == ".jsonl":
        docs = _read_jsonl(corpus.files[0])
        names = [str(i) for i in range(len(docs))]
    else:
        names, docs = [], []
        for p in corpus.files:
            raw = read_bytes(p, "corpus file")
            if b"\0" in raw[:4096]:
                continue  # binary file in a folder
            names.append(p.as_posix())
            # refused, not decoded with replacement: a wrong encoding would silently train on U+FFFD
            docs.append(decode_utf8(raw, p, "corpus file"))
    docs_names = [(n, d) for n, d in zip(names, docs) if d.strip()]
    if not docs_names:
        raise DataError(f"data.source={corpus.source!r}: the corpus is empty")
    names, docs = [n for n, _ in docs_names], [d for _, d in docs_names]
    return _split_docs(names, docs, val_fraction)


def _cache_root(cache_dir: str) -> Path:
    return Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxllm"


def _write_tokens(path: Path, ids: np.ndarray, vocab_size: int) -> None:
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # unique: several processes may write at once
    ids.astype(dtype).tofile(tmp)
    tmp.replace(path)


def _read_tokens(path: Path, vocab_size: int) -> np.ndarray:
    dtype = np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(
            f"cached tokens {path} cannot be read ({e.strerror}); delete {path.parent} to tokenize again"
        ) from None
    if size % dtype.itemsize:
        raise DataError(
            f"cached tokens {path} are damaged ({size} bytes is not a whole number of tokens); "
            f"delete {path.parent} to tokenize again"
        )
    return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)  # no memmap of an empty file


def prepare(
    source: str, tokenizer: str, val_fraction: float, bpe_vocab_size: int = 4096, cache_dir: str = ""
) -> TokenData:
    """Tokenizes the corpus once (cached on disk) and returns memmapped train/val token arrays."""
    corpus = locate(source)
    spec = tokenizer
    if spec not in ("byte", "char", "bpe"):
        spec = hashlib.sha256(tokenizers.load(spec)._to_json().encode()).hexdigest()[:16]
    key = hashlib.sha256(f"{corpus.key}|{spec}|{bpe_vocab_size}|{val_fraction}".encode()).hexdigest()[:20]
    folder = _cache_root(cache_dir) / "tokens" / key
    done = folder / "done.json"
    if not done.is_file():
        train_docs, val_docs = read_corpus(corpus, val_fraction)
        tok = tokenizers.build(tokenizer, train_docs, bpe_vocab_size)
        folder.mkdir(parents=True, exist_ok=True)
        train_ids = tok.encode_array(SEPARATOR.join(train_docs))
        val_ids = tok.encode_array(SEPARATOR.join(val_docs))
        tok.save(folder)
        _write_tokens(folder / "train.bin", train_ids, tok.vocab_size)
        _write_tokens(folder / "val.bin", val_ids, tok.vocab_size)
        info = {"source": source, "tokenizer": tokenizer, "train_tokens": len(train_ids), "val_tokens": len(val_ids)}
        write_json(done, info)
    tok = tokenizers.load(folder)
    return TokenData(
        _read_tokens(folder / "train.bin", tok.vocab_size),
        _read_tokens(folder / "val.bin", tok.vocab_size),
        tok,
        folder,
    )


def check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    if len(tokens) < seq_len + 2:
        raise DataError(
            f"the {split} split has {len(tokens)} tokens, fewer than train.seq_len+2={seq_len + 2}; "
            "use a larger corpus, a shorter train.seq_len or a different data.val_fraction"
        )


def train_batch(
    tokens: np.ndarray,
    seed: int,
    step: int,
    accum: int,
    batch_size: int,
    seq_len: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """This process's rows of step ``step``'s global batch: int32 ``[accum, batch_size / process_count, seq_len+1]``.

    Windows start at offsets drawn from a generator seeded by ``(seed, step)`` alone, so the batch
    does not depend on history (exact resume) or on how many processes share it (exact multi-host).
    """
    rng = np.random.default_rng([seed, step])
    starts_AxB = rng.integers(0, len(tokens) - seq_len - 1, size=(accum, batch_size))
    per = batch_size // process_count
    local_AxB = starts_AxB[:, process_index * per : (process_index + 1) * per]
    offsets = np.arange(seq_len + 1)
    return np.asarray(tokens[local_AxB[..., None] + offsets], dtype=np.int32)


def eval_batch(
    tokens: np.ndarray,
    index: int,
    n_batches: int,
    batch_size: int,
    seq_len: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """Batch ``index`` of ``n_batches`` evenly spaced windows over the split: int32 ``[batch_size / process_count, seq_len+1]``."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, n_batches * batch_size).astype(np.int64)
    rows = starts[index * batch_size : (index + 1) * batch_size]
    per = batch_size // process_count
    rows = rows[process_index * per : (process_index + 1) * per]
    return np.asarray(tokens[rows[:, None] + np.arange(seq_len + 1)], dtype=np.int32)
