"""lm-evaluation-harness throughput: jaxllm's backend (:mod:`jaxllm.infer.harness`) against the
harness's own ``hf`` backend (transformers, torch) on the same model, its Hugging Face export.

    python bench/evaluate.py [--docs 64] [--gen-docs 16] [--batch-size 16] [--layers 4] [--d-model 256]
        [--max-gen-toks 32] [--run DIR]

The model is a random GPT-2 (byte tokenizer, ``--seq-len`` context) saved as a jaxllm run, or the
trained run ``--run`` (e.g. ``runs/tiny`` after ``python train.py``), exported with ``save_hf``; the
tasks are written beside it: a multiple-choice task of ``--docs`` questions with 4 choices each
(``loglikelihood`` requests) and a generation task of ``--gen-docs`` prompts (``generate_until``,
greedy, up to ``--max-gen-toks`` new tokens, ending at a newline: a random model rarely writes one,
so nearly every row runs to the end; a trained one stops rows early). Each backend evaluates both tasks twice through
``lm_eval.simple_evaluate`` with the same batch size, in this one process: the first pass includes
jaxllm's compilation (a few programs per task) and torch's warm-up, the second is the steady state.
Reports requests per second (wall) and CPU seconds per pass, and whether the two backends' scores
agree; prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.core.config import load_config, resolve_model, save_config
from jaxllm.data import tokenizer as tokenizers
from jaxllm.model.transformer import Transformer
from jaxllm.train import checkpoint as ckpt

TASKS = ["bench_mc", "bench_gen"]
WORDS = [
    "the",
    "a",
    "fox",
    "dog",
    "river",
    "stone",
    "light",
    "over",
    "under",
    "quickly",
    "slowly",
    "red",
    "green",
    "seven",
    "old",
    "new",
]
LOADER = """import json
from pathlib import Path

import datasets


def load(name, **_kwargs):
    rows = [json.loads(line) for line in (Path(__file__).parent / f"{name}.jsonl").read_text().splitlines()]
    return {"test": datasets.Dataset.from_list(rows)}
"""
MC_YAML = """task: bench_mc
custom_dataset: !function bench_tasks.load
metadata:
  name: bench_mc
  version: 1.0
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
"""
GEN_YAML = """task: bench_gen
custom_dataset: !function bench_tasks.load
metadata:
  name: bench_gen
  version: 1.0
output_type: generate_until
test_split: test
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
"""


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_tasks(directory: Path, docs: int, gen_docs: int, max_gen_toks: int) -> None:
    rng = random.Random(0)
    mc = [
        {"question": sentence(rng, rng.randint(20, 40)), "choices": [" " + sentence(rng, 4) for _ in range(4)]}
        for _ in range(docs)
    ]
    gen = [{"prompt": sentence(rng, rng.randint(20, 40)), "answer": " " + sentence(rng, 3)} for _ in range(gen_docs)]
    directory.mkdir(parents=True)
    (directory / "bench_tasks.py").write_text(LOADER)
    (directory / "bench_mc.yaml").write_text(MC_YAML)
    (directory / "bench_gen.yaml").write_text(GEN_YAML.replace("{max_gen_toks}", str(max_gen_toks)))
    (directory / "bench_mc.jsonl").write_text("".join(json.dumps({**d, "answer": 0}) + "\n" for d in mc))
    (directory / "bench_gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))


def write_run(run_dir: Path, layers: int, d_model: int, seq_len: int) -> None:
    """A random GPT-2 saved as a jaxllm run (config, tokenizer, one checkpoint)."""
    tok = tokenizers.build("byte", [], 0)
    overrides = [f"model.n_layer={layers}", f"model.d_model={d_model}", f"model.n_head={d_model // 64}"]
    cfg = load_config(None, [*overrides, f"train.seq_len={seq_len}"])
    cfg.model = resolve_model(cfg.model, tok.vocab_size, seq_len)
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    tok.save(run_dir)
    init = jax.jit(Transformer(cfg.model).init)
    params = nn.unbox(init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    saver = ckpt.Checkpointer(run_dir, keep=1)
    saver.save(1, {"params": params}, {"step": 1})
    saver.close()


def timed_passes(lm, manager, task: str, passes: int = 2) -> tuple[list[dict], dict]:
    """``passes`` evaluations of ``task``: per pass wall s, CPU s, requests; the last results."""
    from jaxllm.evals import tasks as eval_tasks

    out, results = [], {}
    for _ in range(passes):
        wall, cpu = time.perf_counter(), time.process_time()
        results = eval_tasks.evaluate(lm, [task], manager, log_samples=True, bootstrap_iters=0)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        requests = sum(len(s["resps"]) for s in results["samples"][task])
        rate = round(requests / wall, 1)
        out.append({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "requests": requests, "requests_per_s": rate})
    return out, results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=64, help="multiple-choice questions (4 requests each)")
    p.add_argument("--gen-docs", type=int, default=16, help="generation prompts")
    p.add_argument("--max-gen-toks", type=int, default=32, help="the most new tokens per generation")
    p.add_argument("--run", default=None, help="a trained jaxllm run to use instead of a random GPT-2")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()

    from lm_eval.models.huggingface import HFLM

    import jaxllm
    from jaxllm.evals import lm as eval_lm
    from jaxllm.evals import tasks as eval_tasks
    from jaxllm.infer import harness

    root = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    write_tasks(root / "tasks", args.docs, args.gen_docs, args.max_gen_toks)
    run = Path(args.run) if args.run else root / "run"
    if not args.run:
        write_run(run, args.layers, args.d_model, args.seq_len)
    jaxllm.load(run).save_hf(root / "hf")
    manager = eval_tasks.task_manager(TASKS, str(root / "tasks"))

    _, backend = harness.load(str(run))
    lms = {"jaxllm": eval_lm.JaxllmLM(backend, args.batch_size)}
    lms["hf"] = HFLM(pretrained=str(root / "hf"), batch_size=args.batch_size, device="cpu", dtype="float32")
    runs = {(name, task): timed_passes(lm, manager, task) for task in TASKS for name, lm in lms.items()}

    print(f"{'task':10} {'backend':8} {'pass':>4} {'requests':>8} {'wall s':>7} {'CPU s':>7} {'req/s':>7}")
    for (name, task), (passes, _) in runs.items():
        for i, r in enumerate(passes, 1):
            row = f"{r['requests']:>8} {r['wall_s']:>7} {r['cpu_s']:>7} {r['requests_per_s']:>7}"
            print(f"{task:10} {name:8} {i:>4} {row}")
    record = {"args": vars(args)}
    for task in TASKS:
        ours, theirs = runs["jaxllm", task], runs["hf", task]
        a, b = eval_tasks.scores(ours[1]), eval_tasks.scores(theirs[1])
        same = a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])) for k in a)
        speedup = ours[0][-1]["requests_per_s"] / theirs[0][-1]["requests_per_s"]
        print(f"{task}: steady-state speed-up {speedup:.2f}x; scores equal: {same}")
        record[task] = {"jaxllm": ours[0], "hf": theirs[0], "speedup": round(speedup, 2), "scores_equal": same}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
