"""Preparing a corpus into shards: exact tokens, the same bytes whatever the workers or tasks, every
source kind, URLs."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from jaxllm.data import open_dataset
from jaxllm.data import tokenizer as tokenizers
from jaxllm.data.prepare import prepare

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "data",
    "flows",
    "into",
    "token",
    "shards,",
    "é",
    "ü",
    "字",
]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 60))) + ("\n" if i % 3 else "") for i in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    docs = make_docs(600)
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", docs), docs


SMALL = {"part_mb": 0.01, "shard_tokens": 3000, "progress": False}  # many parts and shards from a small corpus


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def split_documents(ds, split: str) -> list[list[int]]:
    return [ds.document(split, i).tolist() for i in range(ds.num_documents(split))]


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_prepared_tokens_are_each_documents_own_encoding_then_the_end_id(corpus, tmp_path, kind):
    path, docs = corpus
    prepare([str(path)], str(tmp_path / "ds"), tokenizer=kind, bpe_vocab_size=300, val_fraction=0.1, workers=1, **SMALL)
    ds = open_dataset(tmp_path / "ds")
    expected = [ds.tokenizer.encode_ordinary(d) for d in docs]
    train, val = split_documents(ds, "train"), split_documents(ds, "val")
    assert len(train) + len(val) == len(docs) and len(val) > 0
    ti = vi = 0  # each split keeps the corpus's order
    for e in expected:
        if ti < len(train) and train[ti] == e:
            ti += 1
        else:
            assert val[vi] == e
            vi += 1
    for split, split_docs in (("train", train), ("val", val)):
        stream = np.concatenate([np.array([*d, ds.eod_id]) for d in split_docs])
        np.testing.assert_array_equal(ds.windows(split, np.array([0]), ds.num_tokens(split))[0], stream)
    assert ds.eod_id == ds.tokenizer.eod_id and ds.eod_id not in np.concatenate([np.array(e) for e in expected])


def test_windows_across_shards_equal_the_split_stream(corpus, tmp_path):
    prepare([str(corpus[0])], str(tmp_path / "ds"), workers=1, **SMALL)
    ds = open_dataset(tmp_path / "ds")
    n = ds.num_tokens("train")
    stream = ds.windows("train", np.array([0]), n)[0]
    starts = np.random.default_rng(0).integers(0, n - 257, size=200)
    windows = ds.windows("train", starts, 257)
    assert len(ds.splits["train"].names) > 5
    np.testing.assert_array_equal(windows, stream[starts[:, None] + np.arange(257)])
    assert windows.dtype == np.int32


def test_workers_1_and_2_write_identical_bytes(corpus, tmp_path):
    for w in (1, 2):
        prepare([str(corpus[0])], str(tmp_path / f"w{w}"), tokenizer="bpe", bpe_vocab_size=300, workers=w, **SMALL)
    assert tree(tmp_path / "w1") == tree(tmp_path / "w2")


def test_two_tasks_run_as_two_commands_equal_one_task(corpus, tmp_path):
    prepare([str(corpus[0])], str(tmp_path / "one"), workers=1, **SMALL)
    prepare([str(corpus[0])], str(tmp_path / "two"), workers=1, task=1, tasks=2, **SMALL)
    with pytest.raises(Exception, match="unfinished preparation"):
        open_dataset(tmp_path / "two")  # incomplete until the last task finishes
    prepare([str(corpus[0])], str(tmp_path / "two"), workers=1, task=0, tasks=2, **SMALL)
    assert tree(tmp_path / "one") == tree(tmp_path / "two")


def test_rerun_of_a_finished_preparation_changes_nothing(corpus, tmp_path):
    prepare([str(corpus[0])], str(tmp_path / "ds"), workers=1, **SMALL)
    before = {p: q.stat().st_mtime_ns for p, q in ((p, tmp_path / "ds" / p) for p in tree(tmp_path / "ds"))}
    prepare([str(corpus[0])], str(tmp_path / "ds"), workers=1, **SMALL)
    assert before == {p: (tmp_path / "ds" / p).stat().st_mtime_ns for p in before}


def train_stream(ds) -> np.ndarray:
    return ds.windows("train", np.array([0]), ds.num_tokens("train"))[0]


def test_parquet_jsonl_gz_and_jsonl_zst_give_the_jsonl_tokens(corpus, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    zstandard = pytest.importorskip("zstandard")
    path, docs = corpus
    raw = path.read_bytes()
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), tmp_path / "d.parquet", row_group_size=50)
    prepare([str(path)], str(tmp_path / "ref"), val_fraction=0.0, workers=1, **SMALL)
    reference = train_stream(open_dataset(tmp_path / "ref"))
    for name in ("d.jsonl.gz", "d.jsonl.zst", "d.parquet"):
        prepare([str(tmp_path / name)], str(tmp_path / name.replace(".", "_")), val_fraction=0.0, workers=1, **SMALL)
        np.testing.assert_array_equal(train_stream(open_dataset(tmp_path / name.replace(".", "_"))), reference)


def test_a_datasets_save_to_disk_folder_is_a_source(corpus, tmp_path):
    datasets = pytest.importorskip("datasets")
    path, docs = corpus
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    prepare([str(tmp_path / "saved")], str(tmp_path / "ds"), val_fraction=0.0, workers=1, **SMALL)
    prepare([str(path)], str(tmp_path / "ref"), val_fraction=0.0, workers=1, **SMALL)
    np.testing.assert_array_equal(
        train_stream(open_dataset(tmp_path / "ds")), train_stream(open_dataset(tmp_path / "ref"))
    )


def test_a_folder_gives_one_document_per_file_and_a_lone_file_splits_by_its_tail(tmp_path):
    docs = make_docs(5, seed=1)
    (tmp_path / "folder").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "folder" / f"{i}.txt").write_text(d, encoding="utf-8")
    prepare([str(tmp_path / "folder")], str(tmp_path / "a"), val_fraction=0.0, workers=1, progress=False)
    ds = open_dataset(tmp_path / "a")
    assert [ds.tokenizer.decode(ids) for ids in split_documents(ds, "train")] == docs
    text = "".join(docs)
    prepare(
        [str(tmp_path / "folder" / "0.txt"), "synthetic:markov:tokens=2000"],
        str(tmp_path / "b"),
        val_fraction=0.25,
        workers=1,
        progress=False,
    )
    ds = open_dataset(tmp_path / "b")
    cut = int(len(docs[0]) * 0.75)
    assert ds.tokenizer.decode(ds.document("train", 0)) == docs[0][:cut]
    assert ds.tokenizer.decode(ds.document("val", 0)) == docs[0][cut:]
    assert ds.num_documents("train") == ds.num_documents("val") == 2 and len(text) > cut


def test_an_fsspec_url_reads_the_same_tokens(corpus, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    prepare([str(corpus[0])], str(tmp_path / "ds"), val_fraction=0.1, workers=1, **SMALL)
    local = open_dataset(tmp_path / "ds")
    fs = fsspec.filesystem("memory")
    for name, data in tree(tmp_path / "ds").items():
        fs.pipe(f"/prepared/{name}", data)
    starts = np.random.default_rng(1).integers(0, local.num_tokens("train") - 65, size=50)
    for url in ("memory://prepared", f"file://{tmp_path / 'ds'}"):
        remote = open_dataset(url, verify=True)
        assert remote.fingerprint == local.fingerprint
        np.testing.assert_array_equal(remote.windows("train", starts, 65), local.windows("train", starts, 65))
        assert split_documents(remote, "val") == split_documents(local, "val")
    fs.rm("/prepared", recursive=True)


def test_every_built_tokenizer_has_an_end_of_document_id(tmp_path):
    byte = tokenizers.build("byte", [], 0)
    assert (byte.eod_id, byte.vocab_size) == (256, 257)
    char = tokenizers.build("char", iter(["ab", "ca"]), 0)
    assert (char.chars, char.eod_id, char.vocab_size) == ("abc", 3, 4)
    bpe = tokenizers.build("bpe", iter(make_docs(50)), 280)
    assert bpe.decode([bpe.eod_id]) == tokenizers.EOD and bpe.eod_id == bpe.vocab_size - 1 <= 279
    bpe.save(tmp_path)
    assert tokenizers.build(str(tmp_path / "tokenizer.json"), [], 0).eod_id == bpe.eod_id  # found, not appended


def test_automatic_vocab_size_is_the_tokenizers_rounded_up_to_64():
    from jaxllm.core.config import load_config, resolve_model

    model = load_config(None).model
    assert [resolve_model(model, v, 16).vocab_size for v in (64, 65, 257, 50257)] == [64, 128, 320, 50304]
