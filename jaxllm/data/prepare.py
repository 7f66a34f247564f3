"""Preparing a corpus once: sources -> documents -> token shards, in parallel, resumable, in tasks.

    python -m jaxllm.data.prepare --out DIR [--tokenizer byte|char|bpe|PATH] [--workers N]
        [--task I --tasks N] SOURCE...

1. The sources expand to pieces grouped into parts of about ``part_mb`` of input
   (:mod:`jaxllm.data.sources`); the plan (inputs, options, parts) goes to ``DIR/parts/plan.json``.
2. The tokenizer is built once (a BPE is trained on the first ``bpe_sample_mb`` of training text)
   and saved as ``DIR/tokenizer.json``; every task builds the same one, the first saved wins.
3. Each part of this task (part p belongs to task p % tasks) is read one document at a time
   (:mod:`jaxllm.data.documents`), tokenized by ``workers`` processes in order
   (:mod:`jaxllm.data.encode`) and written as shards (:mod:`jaxllm.data.shard_writer`);
   ``parts/<p>.json`` records a finished part, so a rerun skips it (:mod:`jaxllm.data.dataset_dir`).
4. Whichever task finds every part finished writes ``index.json`` (read by :mod:`jaxllm.data.shards`):
   the same bytes whoever writes it, since the dataset is a function of the inputs and options alone.

Workers start by ``spawn``: a script that calls :func:`prepare` with more than one worker does so
under ``if __name__ == "__main__":``, as with any multiprocessing pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from jaxllm.core import signals
from jaxllm.core.errors import ConfigError
from jaxllm.core.fileio import write_json
from jaxllm.data import dataset_dir, encode
from jaxllm.data import tokenizer as tokenizers
from jaxllm.data.documents import documents
from jaxllm.data.shard_writer import SplitWriter
from jaxllm.data.shards import INDEX, SPLITS, token_dtype
from jaxllm.data.sources import expand, group

SHARD_TOKENS = 100_000_000  # ~200 MB of uint16 per shard
PART_MB = 256.0
CHUNK_CHARS, CHUNK_DOCS = 1 << 20, 1024  # one task for a worker: enough text to amortise the transfer


def _check_options(tokenizer: str, bpe_vocab_size: int, val_fraction: float, workers: int,
                   task: int, tasks: int, shard_tokens: int, part_mb: float, bpe_sample_mb: float) -> None:  # fmt: skip
    if tasks < 1:
        raise ConfigError(f"--tasks must be at least 1, got {tasks}")
    if not 0 <= task < tasks:
        raise ConfigError(f"--task {task} is outside --tasks {tasks}: tasks are numbered 0 to {tasks - 1}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 0 or shard_tokens < 1 or part_mb <= 0 or bpe_sample_mb <= 0:
        raise ConfigError("--workers must be >= 0 and --shard-tokens, --part-mb, --bpe-sample-mb positive")
    if tokenizer == "bpe" and bpe_vocab_size <= 256:
        raise ConfigError(f"--bpe-vocab-size must exceed the 256 byte ids, got {bpe_vocab_size}")


def _out_folder(out: str) -> Path:
    """``--out`` as a local path; a URL other than ``file://`` is refused (renames and hard links
    keep a preparation whole and resumable, which an object store does not offer)."""
    local = out.removeprefix("file://")
    if "://" in local:
        raise ConfigError(
            f"--out {out} is a URL: prepare into a local or shared-filesystem folder, then copy the "
            "finished folder there (gcloud storage cp -r, aws s3 cp --recursive); training reads it by URL"
        )
    return Path(local)


def _tokenizer_identity(spec: str) -> dict:
    if spec in ("byte", "char", "bpe"):
        return {"spec": spec}
    path = Path(spec) / tokenizers.FILENAME if Path(spec).is_dir() else Path(spec)
    tokenizers.build(spec, [], 0)  # refuses an unknown name or an unreadable file, before anything is written
    return {"spec": spec, "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _sample(parts: list, field: str, val_fraction: float, budget: int, with_val: bool) -> Iterator[str]:
    """The corpus's first ``budget`` characters of documents, in order (the last one cut)."""
    for i, part in enumerate(parts):
        for val, text in documents(part, field, val_fraction, first=i == 0):
            if val and not with_val:
                continue
            yield text[:budget]
            budget -= len(text)
            if budget <= 0:
                return


def _tokenizer(root: Path, spec: str, parts: list, options: dict) -> tokenizers.Tokenizer:
    """``root``'s tokenizer, built and saved there first if it has none (the first saved wins)."""
    if not (root / tokenizers.FILENAME).is_file():
        if spec == "char":  # every character of the corpus needs an id
            texts: Iterable[str] = _sample(parts, options["text_field"], options["val_fraction"], 1 << 62, True)
        elif spec == "bpe":
            budget = int(options["bpe_sample_mb"] * 1e6)
            texts = _sample(parts, options["text_field"], options["val_fraction"], budget, False)
        else:
            texts = []
        tok = tokenizers.build(spec, texts, options.get("bpe_vocab_size", 0))
        with tempfile.TemporaryDirectory(
            dir=root, prefix=".tokenizer.", suffix=".tmp", ignore_cleanup_errors=True
        ) as tmp:
            tok.save(Path(tmp))
            for name in tokenizers.FILES:  # tokenizer.json last: it marks the set
                if (Path(tmp) / name).is_file():
                    dataset_dir.place_once(Path(tmp) / name, root / name)
    return tokenizers.load(root)


class Stats:
    """Documents, bytes and tokens this run has prepared, for the progress bar and the summary."""

    def __init__(self) -> None:
        self.docs = self.nbytes = self.tokens = self.parts = 0
        self.t0 = time.perf_counter()

    def rates(self) -> str:
        s = max(time.perf_counter() - self.t0, 1e-9)
        return f"{self.nbytes / 1e6 / s:.1f} MB/s, {self.tokens / 1e6 / s:.2f}M tokens/s"


def _chunks(docs: Iterator[tuple[bool, str]]) -> Iterator[tuple[list[bool], list[str]]]:
    flags: list[bool] = []
    texts: list[str] = []
    size = 0
    for val, text in docs:
        flags.append(val)
        texts.append(text)
        size += len(text)
        if size >= CHUNK_CHARS or len(texts) >= CHUNK_DOCS:
            yield flags, texts
            flags, texts, size = [], [], 0
    if texts:
        yield flags, texts


def _prepare_part(
    root: Path, p: int, part: tuple, pool: encode.Pool, options: dict, dtype: str, stats: Stats, bar
) -> None:
    """Tokenizes part ``p`` into its shards, then records it in ``parts/<p>.json``."""
    writers = {s: SplitWriter(root, s, p, dtype, options["shard_tokens"]) for s in SPLITS}
    docs = documents(part, options["text_field"], options["val_fraction"], first=p == 0)
    try:
        for flags, (ids, lengths, nbytes) in pool.map(_chunks(docs)):
            val_C = np.array(flags)
            if not val_C.any():
                writers["train"].add(ids, lengths)
            else:
                val_tokens = np.repeat(val_C, lengths)
                for split, docs_C, tokens in (("train", ~val_C, ~val_tokens), ("val", val_C, val_tokens)):
                    if docs_C.any():
                        writers[split].add(ids[tokens], lengths[docs_C])
            stats.docs, stats.nbytes, stats.tokens = (
                stats.docs + len(flags),
                stats.nbytes + nbytes,
                stats.tokens + len(ids),
            )
            bar.update(len(flags))
            signals.check("preparing the data")  # the shards so far are aborted below
            bar.set_postfix_str(stats.rates(), refresh=False)
        for w in writers.values():
            w.close_shard()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    write_json(root / "parts" / f"{p:05d}.json", {"part": p, "shards": {s: w.shards for s, w in writers.items()}})
    stats.parts += 1


def _run(root: Path, todo: list, options: dict, dtype: str, workers: int, progress: bool, stats: Stats) -> None:
    from tqdm import tqdm

    pool = encode.Pool(str(root), dtype, workers)
    bar = tqdm(unit=" docs", disable=not progress, file=sys.stderr, mininterval=0.5, desc=f"preparing {root}")
    with contextlib.closing(pool), bar:
        for p, part in todo:
            _prepare_part(root, p, part, pool, options, dtype, stats, bar)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _summary(out: str, index: dict | None, stats: Stats, task: int, tasks: int) -> str:
    run = f"this run: {stats.parts} parts, {stats.docs:,} documents, {stats.nbytes / 1e6:.1f} MB ({stats.rates()})"
    if index is None:
        return f"task {task} of {tasks} done, {run}; index.json is written by the last task to finish"
    train, val = index["splits"]["train"], index["splits"]["val"]
    return (
        f"prepared {out}: train {train['documents']:,} documents, {train['tokens']:,} tokens; "
        f"val {val['documents']:,} documents, {val['tokens']:,} tokens; "
        f"{len(train['shards']) + len(val['shards'])} shards; {run}"
    )


def prepare(
    sources: list[str],
    out: str,
    tokenizer: str = "byte",
    bpe_vocab_size: int = 4096,
    val_fraction: float = 0.0005,
    workers: int = 0,
    text_field: str = "text",
    task: int = 0,
    tasks: int = 1,
    progress: bool = True,
    bpe_sample_mb: float = 64.0,
    shard_tokens: int = SHARD_TOKENS,
    part_mb: float = PART_MB,
) -> None:
    """Prepares this task's share of ``sources`` into the dataset folder ``out`` (see the module
    docstring); ``workers=0`` uses every core. Bad input is a one-line UserError, raised before
    anything is written where it can be (sources, options), else with no shard left half-written."""
    _check_options(tokenizer, bpe_vocab_size, val_fraction, workers, task, tasks, shard_tokens, part_mb, bpe_sample_mb)
    root = _out_folder(out)
    part_bytes = int(part_mb * 1e6)
    parts = group(expand(list(sources), text_field, part_bytes), part_bytes)
    options = {
        "val_fraction": val_fraction,
        "text_field": text_field,
        "shard_tokens": shard_tokens,
        "part_mb": part_mb,
        **({"bpe_vocab_size": bpe_vocab_size, "bpe_sample_mb": bpe_sample_mb} if tokenizer == "bpe" else {}),
    }
    plan = dataset_dir.plan(parts, _tokenizer_identity(tokenizer), options)
    created = dataset_dir.claim(root, plan)
    if (root / INDEX).is_file():
        if progress:
            print(f"{out} is already prepared from these sources and options", file=sys.stderr)
        return
    stats = Stats()
    try:
        tok = _tokenizer(root, tokenizer, parts, options)
        dtype = token_dtype(tok.vocab_size)
        todo = [
            p for p in range(task, len(parts), tasks) if not dataset_dir.part_done(root, p, np.dtype(dtype).itemsize)
        ]
        if todo:
            _run(root, [(p, parts[p]) for p in todo], options, dtype, workers or _cores(), progress, stats)
        index = dataset_dir.finish(root, plan, len(parts), tok)
    except BaseException:
        if created is not None and tasks == 1 and not any(root.glob("*.bin")):
            dataset_dir.unclaim(root, created)  # no shard finished: leave no trace of this run
        raise
    if progress:
        print(_summary(out, index, stats, task, tasks), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from jaxllm.core.errors import ArgumentParser

    parser = ArgumentParser(prog="python -m jaxllm.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="text files, folders, globs, .jsonl(.gz/.zst), .parquet, a datasets save_to_disk folder, "
        "hf:NAME[:CONFIG][/SPLIT], stdlib, synthetic:...",
    )
    parser.add_argument("--out", required=True, help="the dataset folder to write (new, empty, or this preparation's)")
    parser.add_argument(
        "--tokenizer", default="byte", help="byte | char | bpe (trained on a sample) | a tokenizer.json or its folder"
    )
    parser.add_argument(
        "--bpe-vocab-size", type=int, default=4096, help="vocabulary of a trained BPE (its end id comes on top)"
    )
    parser.add_argument(
        "--bpe-sample-mb", type=float, default=64.0, help="the BPE trains on the first this many MB of training text"
    )
    parser.add_argument("--val-fraction", type=float, default=0.0005, help="share of documents held out for validation")
    parser.add_argument("--workers", type=int, default=0, help="tokenizing processes, one core each; 0 = every core")
    parser.add_argument("--text-field", default="text", help="the text's field (jsonl) or column (parquet, datasets)")
    parser.add_argument(
        "--task", type=int, default=0, help="this task's number, 0 to --tasks - 1 (a SLURM array index)"
    )
    parser.add_argument("--tasks", type=int, default=1, help="how many tasks share the preparation")
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=SHARD_TOKENS,
        help="tokens per shard (a shard ends at the first document end past it)",
    )
    parser.add_argument(
        "--part-mb", type=float, default=PART_MB, help="input per part, the unit of tasks and of resuming"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    a = parser.parse_args(argv)
    prepare(a.sources, a.out, a.tokenizer, a.bpe_vocab_size, a.val_fraction, a.workers, a.text_field, a.task, a.tasks,
            not a.quiet, a.bpe_sample_mb, a.shard_tokens, a.part_mb)  # fmt: skip
    return 0


if __name__ == "__main__":
    from jaxllm.core.errors import exit_on_user_error

    raise SystemExit(exit_on_user_error(main)())
