"""nanoGPT's README CPU run, for a side-by-side comparison with jaxllm's trainer.

    python bench/shakespeare.py [--data PATH] [--vs-nanogpt DIR] [--nanogpt-recipe] [extra key=value ...]

Runs ``python train.py configs/shakespeare_char.yaml data.source=PATH`` on the CPU in a fresh run
directory, times the whole command (start-up, data preparation and compilation included) and prints
the final validation loss. The config is nanoGPT's model, batch, context and split with jaxllm's
schedule (1000 steps); ``--nanogpt-recipe`` trains with nanoGPT's own (2000 steps, cosine from 1e-3),
the same-steps comparison. Its programs come from the compilation cache (``run.compile_cache``) when
an earlier run compiled them; pass ``run.compile_cache=`` to time a cold start.

With ``--vs-nanogpt DIR`` (a nanoGPT working tree, e.g. ``git clone https://github.com/karpathy/nanoGPT``)
it then runs nanoGPT's README CPU command there, on the same machine right after jaxllm's run:
``data/shakespeare_char/prepare.py`` first (untimed; PATH is copied to its ``input.txt`` so nothing is
downloaded), then, timed, ``python train.py config/train_shakespeare_char.py --device=cpu
--compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
--n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`` (plus ``--out_dir``
in a temporary folder, so its checkpoint does not land in the checkout). It prints both wall times,
both runs' CPU seconds (user + system of all their processes: on a machine other jobs share, the
figure their load does not inflate), both final validation losses and the ratios. Without it, only
jaxllm's figures: a time measured on another machine (or an hour earlier on a shared one) says
nothing about this run, so there is no ratio without nanoGPT's run beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NANOGPT_ARGS = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]
NANOGPT_FILES = ("train.py", "config/train_shakespeare_char.py", "data/shakespeare_char/prepare.py")
# nanoGPT's own schedule (its config and README flags) on jaxllm, for the same-steps comparison
NANOGPT_RECIPE = [
    "train.steps=2000",
    "optim.schedule=cosine",
    "optim.lr=1e-3",
    "optim.min_lr=1e-4",
    "optim.warmup_steps=100",
]


def timed(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float, float]:
    """Runs ``cmd``: its result, wall seconds and CPU seconds (user + system, its processes and threads
    together: the figure that other jobs on a shared machine do not inflate)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_jaxllm(data: str, overrides: list[str], tmp: Path) -> dict:
    """jaxllm's run: wall and CPU seconds of the whole command, final validation loss, ms/step, tokens/s."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        str(ROOT / "configs" / "shakespeare_char.yaml"),
        f"data.source={data}",
        f"run.dir={tmp}/run",
        f"data.cache_dir={tmp}/cache",
        "log.progress=false",
        *overrides,
    ]
    out, wall, cpu = timed(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu"})  # nanoGPT's run is a CPU run
    if out.returncode:
        raise SystemExit(f"jaxllm's run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    train = [r for r in rows if r.get("tokens_per_sec", 0) > 0]
    return {
        "val_loss": round(evals[-1]["eval_loss"], 4),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "ms_per_step": round(1000 * wall / evals[-1]["step"], 1),
        "tokens_per_sec": round(sum(r["tokens_per_sec"] for r in train) / len(train)),
    }


def last_val_loss(log: str) -> float:
    """nanoGPT's last evaluation line, ``step 2000: train loss 1.7628, val loss 1.8857``."""
    losses = re.findall(r"val loss (\d+\.\d+)", log)
    if not losses:
        raise SystemExit(f"nanoGPT's output has no 'val loss' line:\n{log[-3000:]}")
    return float(losses[-1])


def run_nanogpt(checkout: Path, data: str, tmp: Path) -> dict:
    """nanoGPT's README CPU run in ``checkout``: wall and CPU seconds of the training command, its last val loss."""
    prep = checkout / "data" / "shakespeare_char"
    shutil.copyfile(data, prep / "input.txt")  # prepare.py downloads the corpus only when this is missing
    out = subprocess.run([sys.executable, "prepare.py"], cwd=prep, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"nanoGPT's prepare.py failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    cmd = [sys.executable, "train.py", *NANOGPT_ARGS, f"--out_dir={tmp}/nanogpt-out"]
    out, wall, cpu = timed(cmd, cwd=checkout)
    if out.returncode:
        raise SystemExit(f"nanoGPT's train.py failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return {"val_loss": last_val_loss(out.stdout), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def check_inputs(data: str, checkout: str | None) -> str:
    """'' when the corpus and the nanoGPT tree (if any) are usable, else the one-line reason."""
    if not Path(data).is_file():
        return f"{data} not found; pass --data PATH/tinyshakespeare.txt"
    missing = [f for f in NANOGPT_FILES if checkout and not (Path(checkout) / f).is_file()]
    if missing:
        return f"{checkout} is not a nanoGPT working tree (no {missing[0]}); pass --vs-nanogpt PATH/nanoGPT"
    return ""


def report(jaxllm: dict, nanogpt: dict | None) -> None:
    """Both runs' losses, wall and CPU seconds, and jaxllm's ratios to nanoGPT (None: jaxllm's alone)."""
    print(f"{'':16}{'val loss':>10}{'wall s':>9}{'CPU s':>9}")
    if nanogpt is None:
        print(
            f"{'jaxllm':16}{jaxllm['val_loss']:>10.4f}{jaxllm['wall_s']:>9.1f}{jaxllm['cpu_s']:>9.1f}   "
            "(--vs-nanogpt DIR runs nanoGPT beside it for a ratio)"
        )
        print(json.dumps(jaxllm))
        return
    ratio, cpu_ratio = jaxllm["wall_s"] / nanogpt["wall_s"], jaxllm["cpu_s"] / nanogpt["cpu_s"]
    print(f"{'nanoGPT':16}{nanogpt['val_loss']:>10.4f}{nanogpt['wall_s']:>9.1f}{nanogpt['cpu_s']:>9.1f}")
    print(
        f"{'jaxllm':16}{jaxllm['val_loss']:>10.4f}{jaxllm['wall_s']:>9.1f}{jaxllm['cpu_s']:>9.1f}   "
        f"({ratio:.2f}x nanoGPT's time, {cpu_ratio:.2f}x its CPU time)"
    )
    print(
        json.dumps(
            {
                **jaxllm,
                "nanogpt_val_loss": nanogpt["val_loss"],
                "nanogpt_wall_s": nanogpt["wall_s"],
                "nanogpt_cpu_s": nanogpt["cpu_s"],
                "time_ratio": round(ratio, 3),
                "cpu_ratio": round(cpu_ratio, 3),
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument(
        "--vs-nanogpt", metavar="DIR", help="a nanoGPT working tree: run its README CPU command after jaxllm's"
    )
    parser.add_argument(
        "--nanogpt-recipe",
        action="store_true",
        help="train with nanoGPT's schedule (2000 steps, cosine from 1e-3) instead of the config's",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    problem = check_inputs(args.data, args.vs_nanogpt)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        recipe = NANOGPT_RECIPE if args.nanogpt_recipe else []
        jaxllm = run_jaxllm(args.data, [*recipe, *args.overrides], Path(tmp))
        nanogpt = run_nanogpt(Path(args.vs_nanogpt).resolve(), args.data, Path(tmp)) if args.vs_nanogpt else None
    report(jaxllm, nanogpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
