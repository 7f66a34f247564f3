"""Bad input to preparation and reading: one line on stderr, exit 2, nothing half-written, no finished shard damaged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_prepare import SMALL, make_docs, tree, write_jsonl

from jaxllm.core.errors import DataError, exit_on_user_error
from jaxllm.data import open_dataset, shards
from jaxllm.data import prepare as prep

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, main, *argv: str) -> str:
    """Runs a command line in-process; returns its one stderr line after checking exit status 2."""
    assert exit_on_user_error(main)(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def prepare_cli(capsys, out: Path, *argv: str) -> str:
    err = run_cli(capsys, prep.main, "--out", str(out), "--workers", "1", "--quiet", *argv)
    assert not out.exists()  # refused before anything was written
    return err


@pytest.fixture
def jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "ok.jsonl", make_docs(40))


def test_a_missing_or_empty_source_is_refused(capsys, tmp_path):
    assert "no such file or folder" in prepare_cli(capsys, tmp_path / "o", str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    assert "holds no documents" in prepare_cli(capsys, tmp_path / "o", str(tmp_path / "empty"))
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n')
    assert "no training documents" in prepare_cli(capsys, tmp_path / "o", str(tmp_path / "blank.jsonl"))


def test_a_parquet_file_without_the_text_column_is_refused(capsys, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "t.parquet")
    err = prepare_cli(capsys, tmp_path / "o", str(tmp_path / "t.parquet"))
    assert "no column 'text'" in err and "content" in err and "--text-field" in err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"[1, 2]", "is not a JSON object"),
        (b'{"body": "x"}', "has no string field 'text'"),
        (b"{oops", "not valid JSON"),
    ],
)
def test_a_bad_jsonl_line_is_named_by_its_byte_offset(capsys, tmp_path, jsonl, line, message):
    good = jsonl.read_bytes()
    (tmp_path / "bad.jsonl").write_bytes(good + line + b"\n")
    err = prepare_cli(capsys, tmp_path / "o", str(tmp_path / "bad.jsonl"))
    assert "bad.jsonl" in err and f"the line at byte {len(good)}" in err and message in err


def test_bytes_that_are_not_utf8_are_named_by_file_and_offset(capsys, tmp_path, jsonl):
    good = jsonl.read_bytes()
    (tmp_path / "bad.jsonl").write_bytes(good + b'{"text": "caf\xe9"}\n')
    err = prepare_cli(capsys, tmp_path / "o", str(tmp_path / "bad.jsonl"))
    assert "bad.jsonl is not UTF-8" in err and f"byte {len(good) + 13}" in err
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("fine")
    (tmp_path / "t" / "b.txt").write_bytes(b"abc\xff")
    assert "b.txt is not UTF-8 text (byte 3" in prepare_cli(capsys, tmp_path / "o", str(tmp_path / "t"))


@pytest.mark.parametrize(
    ("task", "tasks", "message"),
    [(2, 2, "--task 2 is outside --tasks 2"), (-1, 2, "--task -1 is outside"), (0, 0, "--tasks must be at least 1")],
)
def test_a_task_outside_the_tasks_is_refused(capsys, tmp_path, jsonl, task, tasks, message):
    assert message in prepare_cli(capsys, tmp_path / "o", "--task", str(task), "--tasks", str(tasks), str(jsonl))


def test_an_output_url_is_refused_before_anything_is_written(capsys, tmp_path, jsonl, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    err = run_cli(capsys, prep.main, "--out", "gs://bucket/ds", "--workers", "1", str(jsonl))
    assert "--out gs://bucket/ds is a URL" in err and sorted(os.listdir(tmp_path)) == before


def test_a_file_url_output_is_its_local_folder(tmp_path, jsonl):
    prep.prepare([str(jsonl)], f"file://{tmp_path / 'ds'}", workers=1, progress=False)
    assert open_dataset(tmp_path / "ds").num_documents("train") > 0


def test_a_refused_preparation_removes_the_folders_it_created(capsys, tmp_path):
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n')
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other").mkdir()  # as if another preparation wrote beside this one
    out = tmp_path / "kept" / "new" / "deeper" / "ds"
    assert "no training documents" in prepare_cli(capsys, out, str(tmp_path / "blank.jsonl"))
    assert sorted(os.listdir(tmp_path / "kept")) == ["other"]


def test_an_output_folder_holding_other_files_or_another_preparation_is_refused(capsys, tmp_path, jsonl):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    assert "holds other files (notes.txt" in run_cli(capsys, prep.main, "--out", str(tmp_path / "o"), str(jsonl))
    assert sorted(os.listdir(tmp_path / "o")) == ["notes.txt"]
    prep.prepare([str(jsonl)], str(tmp_path / "ds"), workers=1, progress=False)
    before = tree(tmp_path / "ds")
    err = run_cli(capsys, prep.main, "--out", str(tmp_path / "ds"), "--tokenizer", "char", str(jsonl))
    assert "holds a preparation of other sources or options" in err and tree(tmp_path / "ds") == before


def test_a_bad_document_midway_leaves_finished_parts_whole_and_no_index(capsys, tmp_path):
    docs = make_docs(300)
    write_jsonl(tmp_path / "a.jsonl", docs)
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "fine"}\n[]\n')
    with pytest.raises(DataError, match="is not a JSON object"):
        prep.prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], str(tmp_path / "o"), workers=1, **SMALL)
    names = os.listdir(tmp_path / "o")
    assert "index.json" not in names and not [n for n in names if n.endswith(".tmp")]
    assert "unfinished preparation" in run_cli(capsys, shards.main, str(tmp_path / "o"))
    prep.prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "ref"), workers=1, **SMALL)
    finished = {n: b for n, b in tree(tmp_path / "o").items() if n.endswith((".bin", ".idx"))}
    assert finished and all(tree(tmp_path / "ref")[n] == b for n, b in finished.items())


@pytest.fixture
def prepared(tmp_path, jsonl) -> Path:
    prep.prepare([str(jsonl)], str(tmp_path / "ds"), workers=1, val_fraction=0.2, progress=False)
    return tmp_path / "ds"


def test_a_truncated_shard_is_refused(capsys, prepared):
    shard = prepared / "train-00000-0000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    assert "train-00000-0000.bin is " in run_cli(capsys, shards.main, str(prepared))


def test_an_edited_shard_is_refused_at_its_end_and_by_verify(capsys, prepared):
    shard = prepared / "train-00000-0000.bin"
    ids = np.fromfile(shard, np.uint16)
    ids[3] ^= 1
    ids.tofile(shard)
    open_dataset(prepared)  # same size, still ends a document: only the checksum sees it
    assert "was changed after preparation" in run_cli(capsys, shards.main, str(prepared), "--verify")
    ids[-1] = 65
    ids.tofile(shard)
    assert "does not end a document" in run_cli(capsys, shards.main, str(prepared))


def test_an_index_that_does_not_match_its_shards_is_refused(capsys, prepared):
    index = json.loads((prepared / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["tokens"] += 1
    (prepared / "index.json").write_text(json.dumps(index))
    assert "the index says" in run_cli(capsys, shards.main, str(prepared))
    (prepared / "index.json").write_text("{}")
    assert "not a jaxllm prepared-dataset index" in run_cli(capsys, shards.main, str(prepared))


def test_a_swapped_tokenizer_is_refused(capsys, prepared):
    from jaxllm.data.tokenizer import ByteTokenizer

    (prepared / "tokenizer.json").write_text(ByteTokenizer()._to_json())
    assert "is not the tokenizer the index names" in run_cli(capsys, shards.main, str(prepared))


def test_an_unreachable_url_is_one_line(capsys):
    pytest.importorskip("aiohttp")
    assert "cannot read" in run_cli(capsys, shards.main, "http://127.0.0.1:9/dataset")
    assert "cannot open" in run_cli(capsys, shards.main, "nosuchprotocol://bucket/dataset")


@pytest.mark.slow
def test_an_unreachable_hub_dataset_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}  # as unreachable as the Hub gets
    cmd = [sys.executable, "-m", "jaxllm.data.prepare", "--out", str(tmp_path / "o"), "hf:nobody/no-such-dataset"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: hf:nobody/no-such-dataset: cannot open the Hub dataset")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_the_uninterrupted_bytes(tmp_path):
    write_jsonl(tmp_path / "big.jsonl", make_docs(20_000, seed=3))
    args = [str(tmp_path / "big.jsonl"), "--tokenizer", "bpe", "--bpe-vocab-size", "400", "--workers", "2"]
    args += ["--part-mb", "0.05", "--shard-tokens", "20000", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "jaxllm.data.prepare", *args, "--out"]
    subprocess.run([*cmd, str(tmp_path / "ref")], check=True, env=env)
    proc = subprocess.Popen([*cmd, str(tmp_path / "o")], env=env)
    while not (tmp_path / "o" / "parts" / "00003.json").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "o" / "index.json").exists()  # killed midway
    with pytest.raises(DataError, match="unfinished preparation"):
        open_dataset(tmp_path / "o")
    subprocess.run([*cmd, str(tmp_path / "o")], check=True, env=env)
    assert tree(tmp_path / "o") == tree(tmp_path / "ref")
