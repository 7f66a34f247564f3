"""``data.source`` / ``data.mixture`` -> prepared datasets -> the run's :class:`~jaxllm.data.batches.TrainData`.

Training reads prepared datasets only (token shards and an index, :mod:`jaxllm.data.prepare`). A source
is either one already, a directory holding ``index.json`` or a URL that fsspec opens (``gs://``,
``s3://``, ``memory://``, ``file://``), or a corpus that :func:`prepare_into_cache` prepares once into
``data.cache_dir`` (the built-in ``stdlib`` and ``synthetic:...`` corpora, a text file, folder, glob
or ``.jsonl``), in a folder keyed by the corpus's identity (paths, sizes, mtimes), the tokenizer and
the split, so an edited corpus is prepared again.

Every source of a run has the run's tokenizer (``data.tokenizer``): a dataset prepared with another,
or a mixture whose sources differ, is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from jaxllm.core.config_schema import DataConfig
from jaxllm.core.errors import ConfigError, DataError
from jaxllm.data import mixture, synthetic
from jaxllm.data import sources as inputs
from jaxllm.data import tokenizer as tokenizers
from jaxllm.data.batches import Source, TrainData
from jaxllm.data.prepare import PART_MB, prepare
from jaxllm.data.shards import INDEX, open_dataset

SMALL = 32_000_000  # bytes of input below which preparing in this process beats starting workers


def identity(source: str) -> tuple[str, int]:
    """``(key, bytes)`` of a corpus: the key changes whenever its text would (its files' paths, sizes
    and modification times; a synthetic or Hub source's name), and the input's size in bytes."""
    h = hashlib.sha256(source.encode())
    if source.startswith("synthetic:"):
        return h.hexdigest()[:16], synthetic.parse(source).tokens
    if source.startswith("hf:"):  # streamed from the Hub: counted as large
        return h.hexdigest()[:16], SMALL
    size = 0
    for path in dict.fromkeys(p.path for p in inputs.expand([source], "text", int(PART_MB * 1e6))):
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        size += st.st_size
    return h.hexdigest()[:16], size


def is_prepared(source: str) -> bool:
    """A URL, or a local directory holding a prepared dataset (complete or not)."""
    if "://" in source:
        return True
    path = Path(source)
    return path.is_dir() and ((path / INDEX).is_file() or (path / "parts").is_dir())


def sources(d: DataConfig) -> list[tuple[float, str]]:
    """``(weight, source)`` of every source of the run: ``data.mixture``'s, else ``data.source`` alone."""
    return mixture.parse(d.mixture) if d.mixture.strip() else [(1.0, d.source)]


def _cache_root(cache_dir: str) -> Path:
    return Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxllm"


def _tokenizer_key(spec: str) -> str:
    if spec in ("byte", "char", "bpe"):
        return spec
    return hashlib.sha256(tokenizers.load(spec)._to_json().encode()).hexdigest()[:16]


def cache_folder(source: str, d: DataConfig, key: str | None = None) -> Path:
    """Where ``source`` (a corpus, not a prepared dataset) is prepared with ``d``'s tokenizer and split;
    ``key``: the corpus's :func:`identity` key, when already known."""
    spec = f"{key or identity(source)[0]}|{_tokenizer_key(d.tokenizer)}|{d.bpe_vocab_size}|{d.val_fraction}"
    return _cache_root(d.cache_dir) / "prepared" / hashlib.sha256(spec.encode()).hexdigest()[:20]


def prepare_into_cache(d: DataConfig) -> list[str]:
    """Prepares every source of ``d`` that is a corpus into the cache (once; a finished one is kept);
    returns where each source's prepared dataset is, in the order of :func:`sources`."""
    locations = []
    for _, source in sources(d):
        if is_prepared(source):
            locations.append(source)
            continue
        key, size = identity(source)
        folder = cache_folder(source, d, key)
        if not (folder / INDEX).is_file():
            prepare(
                [source],
                str(folder),
                tokenizer=d.tokenizer,
                bpe_vocab_size=d.bpe_vocab_size,
                val_fraction=d.val_fraction,
                workers=1 if size < SMALL else 0,  # 0: every core
                progress=False,
            )
        locations.append(str(folder))
    return locations


def check_tokenizer(name: str, tok: tokenizers.Tokenizer, d: DataConfig) -> None:
    """Refuses a dataset prepared with another tokenizer than ``data.tokenizer``."""
    spec = d.tokenizer
    if spec in ("byte", "char", "bpe"):
        if tok.kind != spec:
            raise DataError(
                f"{name} was prepared with a {tok.kind} tokenizer but data.tokenizer={spec}; "
                f"set data.tokenizer to {tok.kind} (or to the dataset's tokenizer.json)"
            )
        return
    expected = tokenizers.build(spec, [], d.bpe_vocab_size)
    if expected._to_json() != tok._to_json():
        raise DataError(f"{name} was prepared with another tokenizer than data.tokenizer={spec}")


def open_sources(d: DataConfig, locations: list[str]) -> list[Source]:
    """Every source of the run, opened from its prepared ``locations`` (:func:`prepare_into_cache`'s)
    and checked (one tokenizer for all, the run's)."""
    opened: list[Source] = []
    for (weight, source), location in zip(sources(d), locations, strict=True):
        ds = open_dataset(location)
        check_tokenizer(source, ds.tokenizer, d)
        if opened and ds.tokenizer._to_json() != opened[0].dataset.tokenizer._to_json():
            raise ConfigError(
                f"data.mixture: {source} was prepared with another tokenizer than {opened[0].name}; "
                "a mixture's sources must share one tokenizer"
            )
        opened.append(Source(source, ds, weight))
    return opened


def load(d: DataConfig, seq_len: int, seed: int) -> TrainData:
    """The run's data, the corpora among its sources prepared into the cache first."""
    return TrainData(open_sources(d, prepare_into_cache(d)), seq_len, seed)
