"""Preparing a generated corpus with a BPE tokenizer.json: throughput, peak memory, workers' scaling.

    python bench/data_prepare.py [--sizes-mb 100 1000] [--workers 2] [--data-dir /tmp/jaxllm-bench-prepare]

For each size: a corpus of FineWeb-like jsonl documents (Zipf-distributed pseudo-words, ~4 kB per
document, 100 MB per file), generated once into ``--data-dir``; a byte-level BPE of 8192 ids trained
on its first 20 MB and saved as ``tokenizer.json``. Then, one after the other:

- ``python -m jaxllm.data.prepare --workers W --tokenizer tokenizer.json`` (and ``--workers 1`` on the
  first size): wall time from start to exit and the peak resident memory of the whole process tree
  (the command and its workers, summed; sampled every 20 ms);
- the reference: Hugging Face ``tokenizers``' ``encode_batch`` (and ``encode_batch_fast``, which prepare
  uses, without offsets) over the same documents in batches of
  1024, on the same number of cores (``RAYON_NUM_THREADS=W``), in a fresh process; only the encode
  calls are timed (reading the documents is not).

MB are the documents' UTF-8 megabytes (1e6 bytes). Prints a markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FILE_MB = 100


def generate(folder: Path, size_mb: int, seed: int = 0) -> int:
    """Writes ``size_mb`` MB of jsonl documents into ``folder`` (once); returns their text bytes."""
    meta = folder / "meta.json"
    if meta.is_file():
        return json.loads(meta.read_text())["text_bytes"]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    lengths = rng.integers(2, 11, size=30_000)
    words = np.array(["".join(rng.choice(letters, n, p=None)) for n in lengths])
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1  # Zipf, as words in text
    weights /= weights.sum()
    total, k = 0, 0
    while total < size_mb * 1e6:
        with open(folder / f"part-{k:03d}.jsonl", "w", encoding="utf-8") as f:
            written = 0
            while written < FILE_MB * 1e6 and total + written < size_mb * 1e6:
                idx = rng.choice(len(words), size=1_000_000, p=weights)
                text = " ".join(words[idx])
                cuts = np.cumsum(rng.integers(200, 1200, size=2000)) * 6  # ~700 words per document
                for a, b in zip(np.r_[0, cuts[:-1]], cuts):
                    if a >= len(text):
                        break
                    doc = text[a:b].strip().capitalize() + "."
                    f.write(json.dumps({"text": doc}) + "\n")
                    written += len(doc.encode())
        total, k = total + written, k + 1
    meta.write_text(json.dumps({"text_bytes": total}))
    return total


def documents(folder: Path):
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def train_tokenizer(folder: Path, corpus: Path) -> Path:
    if not (folder / "tokenizer.json").is_file():
        sys.path.insert(0, str(ROOT))
        from jaxllm.data import tokenizer as tokenizers

        def sample():
            n = 0
            for doc in documents(corpus):
                yield doc
                n += len(doc)
                if n > 20e6:
                    return

        folder.mkdir(parents=True, exist_ok=True)
        tokenizers.build("bpe", sample(), 8192).save(folder)
    return folder / "tokenizer.json"


def tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_prepare(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    import psutil

    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "jaxllm.data.prepare", "--quiet", "--workers", str(workers)]
    cmd += ["--tokenizer", str(tokenizer), "--out", str(out), str(corpus)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    ps, peak = psutil.Process(proc.pid), 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # the usage includes the workers it reaped
        if pid:
            break
        peak = max(peak, tree_rss(ps))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"prepare exited {proc.returncode}")
    tokens = json.loads((out / "index.json").read_text())
    n_tokens = sum(tokens["splits"][s]["tokens"] for s in ("train", "val"))
    cpu = usage.ru_utime + usage.ru_stime
    return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": peak / 1e6, "tokens": n_tokens}


def best(runs: list[dict]) -> dict:
    """The fastest of repeated runs (the machine is shared: slower ones waited for other work)."""
    return min(runs, key=lambda r: r["seconds"])


def hf_baseline(corpus: Path, tokenizer: Path, workers: int) -> dict:
    """Seconds of ``encode_batch`` (and ``_fast``) over the corpus on ``workers`` rayon threads, in a fresh process."""
    env = {**os.environ, "RAYON_NUM_THREADS": str(workers), "TOKENIZERS_PARALLELISM": "true", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, __file__, "--hf-baseline", str(corpus), str(tokenizer)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _hf_baseline_main(corpus: Path, tokenizer: Path) -> None:
    """Prints the seconds of ``encode_batch`` and of ``encode_batch_fast`` (no offsets) over the corpus."""
    sys.path.insert(0, str(ROOT))
    from jaxllm.data import tokenizer as tokenizers

    tok = tokenizers.load(tokenizer).tok
    seconds = {"encode_batch": 0.0, "encode_batch_fast": 0.0}
    batches = documents(corpus)
    while batch := [doc for _, doc in zip(range(1024), batches)]:
        for name in seconds:
            t0 = time.perf_counter()
            getattr(tok, name)(batch, add_special_tokens=False)
            seconds[name] += time.perf_counter() - t0
    print(json.dumps(seconds))


def measure(size_mb: int, data_dir: Path, workers: int, compare_one: bool, repeats: int) -> dict:
    corpus = data_dir / f"corpus_{size_mb}mb"
    t0 = time.perf_counter()
    text_bytes = generate(corpus, size_mb)
    tokenizer = train_tokenizer(data_dir / "tokenizer", data_dir / f"corpus_{min(size_mb, FILE_MB)}mb")
    print(f"{size_mb} MB corpus and tokenizer ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    runs: dict[str, list] = {}
    row = {"size_mb": size_mb, "text_mb": text_bytes / 1e6, "workers": workers, "load_before": os.getloadavg()[0]}
    mb = text_bytes / 1e6
    for _ in range(repeats):  # interleaved, so that a burst of other work hits every kind alike
        runs.setdefault("prepare", []).append(run_prepare(corpus, tokenizer, data_dir / "out", workers))
        runs.setdefault("hf", []).append(hf_baseline(corpus, tokenizer, workers))
        if compare_one:
            runs.setdefault("one", []).append(run_prepare(corpus, tokenizer, data_dir / "out", 1))
    run = best(runs["prepare"])
    row.update({k: run[k] for k in ("seconds", "cpu_seconds", "peak_rss_mb", "tokens")})
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs["prepare"])
    row["mb_per_s"] = mb / run["seconds"]
    row["hf_mb_per_s"] = mb / min(h["encode_batch"] for h in runs["hf"])
    row["hf_fast_mb_per_s"] = mb / min(h["encode_batch_fast"] for h in runs["hf"])
    if compare_one:
        one = best(runs["one"])
        row.update({"one_worker_mb_per_s": mb / one["seconds"], "one_worker_cpu_seconds": one["cpu_seconds"]})
        row["one_worker_peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs["one"])
    row["load_after"] = os.getloadavg()[0]
    subprocess.run(["rm", "-rf", str(data_dir / "out")], check=True)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| corpus | workers | prepare MB/s | HF encode_batch MB/s | ratio | HF encode_batch_fast MB/s | ratio"
        + " | peak RSS (tree) | CPU s | 1 worker MB/s | 1 worker CPU s | 2 vs 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        one = r.get("one_worker_mb_per_s")
        lines.append(
            f"| {r['text_mb']:.0f} MB | {r['workers']} | {r['mb_per_s']:.2f} | {r['hf_mb_per_s']:.2f} | "
            f"{r['mb_per_s'] / r['hf_mb_per_s']:.0%} | {r['hf_fast_mb_per_s']:.2f} | "
            f"{r['mb_per_s'] / r['hf_fast_mb_per_s']:.0%} | {r['peak_rss_mb']:.0f} MB | {r['cpu_seconds']:.1f} | "
            + (
                f"{one:.2f} | {r['one_worker_cpu_seconds']:.1f} | {r['mb_per_s'] / one:.2f}x |"
                if one
                else "- | - | - |"
            )
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--hf-baseline":
        _hf_baseline_main(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/jaxllm-bench-prepare"))
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind; the fastest counts")
    parser.add_argument(
        "--one-worker", action=argparse.BooleanOptionalAction, default=True, help="also --workers 1 on the first size"
    )
    args = parser.parse_args()
    rows = [
        measure(s, args.data_dir, args.workers, args.one_worker and i == 0, args.repeats)
        for i, s in enumerate(args.sizes_mb)
    ]
    print(table(rows))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
