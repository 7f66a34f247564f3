"""Every shipped config that names a TPU slice, compiled deviceless for it: memory, fit, predicted speed.

    python bench/plan_configs.py [--only NAME]

``configs/gpt2_124m.yaml`` on v5p-8, ``configs/llama_1b.yaml`` on v5p-32 and v5e-16, and LLaMA 1B on a
v5p-8 under FSDP (remat full) and tensor parallelism (remat dots): each compiles the real train step
through libtpu's topology description (``python train.py CONFIG --plan TARGET``) and prints the
plan's table; then one JSON line with the compiler's bytes per chip, the verdicts and the
compile times (CPU seconds: wall-clock is shared with whatever else runs), and a line per plan: the
analytic memory against the compiler's, the predicted MFU against the best published for the kind.
Needs the ``tpu`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxllm.core.config import load_config
from jaxllm.plan import hardware, report
from jaxllm.plan import planner as plan

# (config, target, overrides): the shipped configs on the slices their comments name, then LLaMA 1B on
# one v5p-8 host under FSDP with full remat and under tensor parallelism with the dots policy
RUNS = [
    ("gpt2_124m", "v5p-8", ()),
    ("llama_1b", "v5p-32", ()),
    ("llama_1b", "v5e-16", ()),
    ("llama_1b", "v5p-8", ("mesh.fsdp=4", "model.remat=full")),
    ("llama_1b", "v5p-8", ("mesh.fsdp=1", "mesh.tensor=4", "model.remat=dots")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run only the plans whose config or target contains this")
    args = ap.parse_args()
    summary = {}
    for name, target, overrides in RUNS:
        label = " ".join((f"{name} on {target}", *overrides))
        if args.only and args.only not in label:
            continue
        cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"), list(overrides))
        result = plan.run(cfg, hardware.parse_target(target), do_search=False)
        print(f"== configs/{name}.yaml on {target} {' '.join(overrides)}\n{report.table(result)}\n", flush=True)
        summary[label] = {
            "fits": result["fits"],
            "headroom": round(result["headroom"], 3),
            "compiled_gib": round(result["compiled_bytes"]["total"] / hardware.GiB, 3),
            "analytic_gib": round(result["analytic_bytes"]["total"] / hardware.GiB, 3),
            "compile_cpu_s": round(result["compile_cpu_s"], 1),
            "step_time_s": round(result["step_time_s"], 4),
            "mfu": round(result["mfu"], 3),
            "published_mfu": hardware.parse_target(target).kind.published_mfu,
            "bound": result["bound"],
        }
    print(json.dumps({"bench": "plan_configs", "plans": summary}))
    for name, s in summary.items():
        gap = s["analytic_gib"] / s["compiled_gib"] - 1
        within, capped = abs(gap) <= 0.10, s["mfu"] <= s["published_mfu"]
        print(
            f"{name}: analytic {gap:+.1%} of the compiler's ({'within' if within else 'outside'} 10%), "
            f"MFU {s['mfu']:.1%} against the best published {s['published_mfu']:.1%}"
            f"{'' if capped else ' (ABOVE IT)'}"
        )


if __name__ == "__main__":
    main()
