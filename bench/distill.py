"""Distillation: a small student trained with and without a teacher, at equal steps.

    python train.py run.dir=/tmp/inf_base                 # the teacher: the default model
    python bench/distill.py --teacher /tmp/inf_base [--steps 300]

Both students share everything (shape, seed, data order, schedule) but ``distill.teacher``; the
figure is the validation cross-entropy (next-token loss only, the same evaluation for both).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxllm.core.config import load_config
from jaxllm.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def student(run_dir: Path, steps: int, extra: list[str]) -> tuple[float, float]:
    """Trains one student; returns (final validation loss, seconds)."""
    overrides = [
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        "model.n_layer=2",
        "model.d_model=64",
        "model.n_head=4",
        f"eval.every={steps}",
        "eval.sample_tokens=0",
        f"checkpoint.every={steps}",
        "log.progress=false",
        "log.tensorboard=false",
        "optim.warmup_steps=30",
    ]
    start = time.perf_counter()
    summary = train(load_config(str(ROOT / "configs" / "tiny.yaml"), overrides + extra))
    return summary["eval_loss"], time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="/tmp/inf_base")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    args = ap.parse_args()
    teacher_loss = [json.loads(line) for line in (Path(args.teacher) / "metrics.jsonl").read_text().splitlines()]
    teacher_loss = [r["eval_loss"] for r in teacher_loss if "eval_loss" in r][-1]
    with tempfile.TemporaryDirectory() as tmp:
        plain, plain_s = student(Path(tmp) / "plain", args.steps, [])
        taught, taught_s = student(
            Path(tmp) / "taught",
            args.steps,
            [
                f"distill.teacher={args.teacher}",
                f"distill.temperature={args.temperature}",
                f"distill.alpha={args.alpha}",
            ],
        )
    print(
        f"student gpt2 2x64 on the default data, {args.steps} steps; "
        f"teacher {args.teacher} (eval loss {teacher_loss:.4f})"
    )
    print(f"{'student':<34}{'eval loss':>10}{'seconds':>9}")
    print(f"{'without teacher':<34}{plain:>10.4f}{plain_s:>9.0f}")
    print(f"{f'distilled (T={args.temperature}, alpha={args.alpha})':<34}{taught:>10.4f}{taught_s:>9.0f}")
    print(
        json.dumps(
            {
                "bench": "distill",
                "steps": args.steps,
                "teacher_eval_loss": teacher_loss,
                "plain_eval_loss": plain,
                "distilled_eval_loss": taught,
                "improvement": plain - taught,
                "temperature": args.temperature,
                "alpha": args.alpha,
            }
        )
    )


if __name__ == "__main__":
    main()
