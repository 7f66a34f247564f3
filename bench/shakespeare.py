"""nanoGPT's README CPU run, for a like-for-like comparison with jaxllm's trainer.

    python bench/shakespeare.py [--data PATH] [extra key=value ...]

Runs ``python train.py configs/shakespeare_char.yaml data.source=PATH`` in a fresh run directory,
times the whole command (start-up, data preparation and compilation included) and prints the final
validation loss beside nanoGPT's reference: 1.8857 in 66.6 s on a 2-core CPU machine (PyTorch 2.13
eager, 0.80M parameters). The goal is an equal or lower loss in at most 2/3 of that time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NANOGPT = {"val_loss": 1.8857, "wall_s": 66.6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if not Path(args.data).is_file():
        print(f"error: {args.data} not found; pass --data PATH/tinyshakespeare.txt", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "train.py"), str(ROOT / "configs" / "shakespeare_char.yaml"),
               f"data.source={args.data}", f"run.dir={tmp}/run", f"data.cache_dir={tmp}/cache",
               "log.progress=false", *args.overrides]
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    train = [r for r in rows if "tokens_per_sec" in r and r["tokens_per_sec"] > 0]
    steps = evals[-1]["step"]
    result = {
        "val_loss": round(evals[-1]["eval_loss"], 4),
        "wall_s": round(wall, 1),
        "ms_per_step": round(1000 * wall / steps, 1),
        "tokens_per_sec": round(sum(r["tokens_per_sec"] for r in train) / len(train)),
        "nanogpt_val_loss": NANOGPT["val_loss"],
        "nanogpt_wall_s": NANOGPT["wall_s"],
        "time_ratio": round(wall / NANOGPT["wall_s"], 3),
    }
    print(f"{'':14}{'val loss':>10}{'wall s':>9}")
    print(f"{'nanoGPT':14}{NANOGPT['val_loss']:>10.4f}{NANOGPT['wall_s']:>9.1f}")
    print(f"{'jaxllm':14}{result['val_loss']:>10.4f}{result['wall_s']:>9.1f}   ({result['time_ratio']:.2f}x the time)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
