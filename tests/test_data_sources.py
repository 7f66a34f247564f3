"""Training's sources: prepared datasets read in place (local or a URL), corpora prepared into the
cache once, one tokenizer for every source; bad sources refused in one line before run.dir exists."""

from __future__ import annotations

import importlib.util
import os

import fsspec
import numpy as np
import pytest
from conftest import TINY, corpus_text

import train
from jaxllm.core.config import load_config
from jaxllm.core.errors import ConfigError, DataError
from jaxllm.data import corpus as data_lib
from jaxllm.data import sampling
from jaxllm.data.prepare import prepare
from jaxllm.data.tokenizer import CharTokenizer

SEQ, SEED = 16, 0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny corpus prepared with byte and with char tokens: ``{"byte": DIR, "char": DIR}``."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "corpus.txt").write_text(corpus_text())
    out = {}
    for kind in ("byte", "char"):
        prepare(
            [str(root / "corpus.txt")], str(root / kind), tokenizer=kind, val_fraction=0.1, workers=1, progress=False
        )
        out[kind] = root / kind
    return out


def data_cfg(tmp_path, *overrides: str):
    return load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", *overrides]).data


def load(d):
    return data_lib.load(d, SEQ, SEED)


def test_a_corpus_is_prepared_into_the_cache_once(tmp_path, corpus):
    d = data_cfg(tmp_path, f"data.source={corpus}")
    first = load(d)
    index = data_lib.cache_folder(str(corpus), d) / "index.json"
    stamp = index.stat().st_mtime_ns
    again = load(d)
    assert index.stat().st_mtime_ns == stamp  # opened, not prepared again
    np.testing.assert_array_equal(first.rows(3, 1, 4), again.rows(3, 1, 4))


def test_an_edited_corpus_is_prepared_again(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first version of the corpus\n" * 200)
    d = data_cfg(tmp_path, f"data.source={path}")
    before = data_lib.cache_folder(str(path), d)
    load(d)
    path.write_text("a second, edited text here\n" * 200)  # same length: only the mtime tells
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    data = load(d)
    assert data_lib.cache_folder(str(path), d) != before
    assert data.tokenizer.decode(data.sources[0].dataset.document("train", 0)[:27]) == "a second, edited text here\n"


def test_a_prepared_directory_is_read_in_place(tmp_path, prepared):
    data = load(data_cfg(tmp_path, f"data.source={prepared['byte']}"))
    assert not (tmp_path / "cache").exists()
    starts = sampling.window_starts(np.arange(4), data.n_windows[0], SEQ, SEED, source=0)
    ds = data.sources[0].dataset
    np.testing.assert_array_equal(data.rows(0, 1, 4)[0], ds.windows("train", starts, SEQ + 1))


def test_a_url_reads_the_same_batches_as_the_directory(tmp_path, prepared):
    local = load(data_cfg(tmp_path, f"data.source={prepared['byte']}"))
    mem = fsspec.filesystem("memory")
    for f in prepared["byte"].rglob("*"):
        if f.is_file():
            mem.pipe(f"/ds/{f.relative_to(prepared['byte']).as_posix()}", f.read_bytes())
    for url in ("memory://ds", f"file://{prepared['byte']}"):
        remote = load(data_cfg(tmp_path, f"data.source={url}"))
        np.testing.assert_array_equal(remote.rows(2, 2, 4, process=1, processes=2), local.rows(2, 2, 4, 1, 2))
        np.testing.assert_array_equal(remote.eval_rows(1, 2, 4), local.eval_rows(1, 2, 4))


def test_a_dataset_prepared_with_another_tokenizer_is_refused(tmp_path, prepared):
    with pytest.raises(DataError, match="was prepared with a char tokenizer but data.tokenizer=byte"):
        load(data_cfg(tmp_path, f"data.source={prepared['char']}", "data.tokenizer=byte"))
    assert load(data_cfg(tmp_path, f"data.source={prepared['char']}", "data.tokenizer=char")).tokenizer.kind == "char"


def test_a_tokenizer_file_must_be_the_datasets_own(tmp_path, prepared):
    own = load(
        data_cfg(tmp_path, f"data.source={prepared['char']}", f"data.tokenizer={prepared['char']}/tokenizer.json")
    )
    assert own.tokenizer.kind == "char"
    (tmp_path / "other").mkdir()
    CharTokenizer("abc").save(tmp_path / "other")
    with pytest.raises(DataError, match="another tokenizer than data.tokenizer="):
        load(
            data_cfg(tmp_path, f"data.source={prepared['char']}", f"data.tokenizer={tmp_path / 'other'}/tokenizer.json")
        )


def test_a_mixture_of_tokenizers_is_refused(tmp_path, prepared):
    mix = f"data.mixture=0.5:{prepared['char']},0.5:{prepared['byte']}"
    with pytest.raises((ConfigError, DataError), match="tokenizer"):
        load(data_cfg(tmp_path, mix, "data.tokenizer=char"))


def test_a_mixture_reads_each_source(tmp_path, prepared, corpus):
    d = data_cfg(tmp_path, f"data.mixture=3:{prepared['byte']},1:{corpus}")  # a prepared dataset and a corpus
    data = load(d)
    assert [s.name for s in data.sources] == [str(prepared["byte"]), str(corpus)]
    assert [s.weight for s in data.sources] == [3.0, 1.0]
    assert set(data.epochs(10, 1, 8)) == {str(prepared["byte"]), str(corpus)}


def refusal(tmp_path, capsys, *overrides: str) -> str:
    """``train.py`` with ``overrides``: exits 2 with one line on stderr, and never creates run.dir."""
    args = TINY + [f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}", *overrides]
    code = train.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert not (tmp_path / "run").exists()
    return lines[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.tokenizer=byte", "data.source={char}"], "prepared with a char tokenizer"),
        (["data.source=memory://nowhere/dataset"], "memory://nowhere/dataset"),
        (["data.source=file:///nonexistent/dataset"], "/nonexistent/dataset"),
        pytest.param(
            ["data.source=http://127.0.0.1:9/dataset"],
            "cannot read",
            marks=pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="fsspec's http needs aiohttp"),
        ),
        (["data.mixture=0.5:{byte},0:{byte}"], "weight of"),
        (["data.mixture=0.5:{byte},-2:{byte}"], "weight of"),
        (["data.mixture=1:{byte},1:{char}"], "tokenizer"),
    ],
    ids=[
        "tokenizer",
        "memory_url",
        "file_url",
        "unreachable_url",
        "zero_weight",
        "negative_weight",
        "mixed_tokenizers",
    ],
)
def test_bad_sources_exit_2_in_one_line_before_run_dir_exists(tmp_path, capsys, prepared, overrides, message):
    paths = {k: str(v) for k, v in prepared.items()}
    line = refusal(tmp_path, capsys, *(o.format(**paths) for o in overrides))
    assert message in line, line


def test_a_bad_corpus_is_refused_in_one_line_and_leaves_nothing_in_the_cache(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a fine document"}\n{"text": "another"}\n[1, 2]\n')
    line = refusal(tmp_path, capsys, f"data.source={tmp_path / 'bad.jsonl'}")
    assert "bad.jsonl" in line and "is not a JSON object" in line, line
    assert not (tmp_path / "cache").exists()  # no half-prepared dataset for a later run to trip on
