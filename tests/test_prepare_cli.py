"""The preparation command's promises beyond its bytes: a progress bar and a summary, ``--workers 1``
on one core (the tokenizer's Rust threads included), a BPE trained on a bounded sample."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_prepare import make_docs, write_jsonl

from jaxllm.data import open_dataset
from jaxllm.data import prepare as prep
from jaxllm.data import tokenizer as tokenizers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("cli") / "docs.jsonl", make_docs(300))


def test_the_command_shows_progress_and_a_summary_of_what_it_prepared(capsys, tmp_path, jsonl):
    assert prep.main(["--out", str(tmp_path / "ds"), "--workers", "1", "--val-fraction", "0.1", str(jsonl)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"300 docs .*MB/s, [\d.]+M tokens/s", err), err  # the bar's last state: every document
    ds = open_dataset(tmp_path / "ds")
    summary = err.strip().splitlines()[-1]
    train, val = (f"{s} {ds.num_documents(s):,} documents, {ds.num_tokens(s):,} tokens" for s in ("train", "val"))
    assert summary.startswith(f"prepared {tmp_path / 'ds'}: {train}; {val}; ") and "300 documents" in summary


THREADS_AFTER_PREPARE = """
import json, os, sys, threading
from jaxllm.data import tokenizer as tokenizers
from jaxllm.data.prepare import prepare

def threads():  # native threads: the process's, less Python's own (a progress bar's monitor)
    return len(os.listdir("/proc/self/task")) - threading.active_count()

source, out, tokenizer = sys.argv[1:]
before = threads()
prepare([source], out, tokenizer=tokenizer, workers=1, progress=False)
after = threads()
tokenizers.load(tokenizer).tok.encode_batch(["a few words"] * 256)  # the library's own default: every core
print(json.dumps({"before": before, "after": after, "unrestricted": threads()}))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: the tokenizer's default starts no extra thread")
def test_one_worker_starts_no_tokenizer_threads(tmp_path, jsonl):
    (tmp_path / "tok").mkdir()
    tokenizers.build("bpe", make_docs(200, seed=1), 300).save(tmp_path / "tok")
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-c", THREADS_AFTER_PREPARE, str(jsonl), str(tmp_path / "ds"), str(tmp_path / "tok")]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["after"] == counts["before"], counts  # encoded on this one thread
    assert counts["unrestricted"] > counts["after"], counts  # what the library would have started


def test_a_bpe_is_trained_on_the_first_documents_alone(tmp_path):
    first = make_docs(400, seed=5)
    for name, later in (("a", ["zebra quartz jigsaw " * 30] * 200), ("b", ["mellow fjord kiwi " * 30] * 200)):
        write_jsonl(tmp_path / f"{name}.jsonl", first + later)
        prep.prepare([str(tmp_path / f"{name}.jsonl")], str(tmp_path / name), tokenizer="bpe",
                     bpe_vocab_size=320, bpe_sample_mb=0.005, workers=1, progress=False)  # fmt: skip
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    whole = tokenizers.build("bpe", first + ["zebra quartz jigsaw " * 30] * 200, 320)
    assert whole._to_json() != open_dataset(tmp_path / "a").tokenizer._to_json()  # the later text would show
