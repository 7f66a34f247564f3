"""Which XLA CPU options make the Shakespeare step faster on this machine? A/B, one process per setting.

    python bench/xla_cpu_flags.py [--steps 50] [--repeats 3] [--rounds 2] [--devices 2,1] [--sets default,...]
                                  [--flags "--xla_...=..."]

Times configs/shakespeare_char.yaml's training step (built as ``train.py`` builds it, random tokens,
best of ``--repeats`` runs of ``--steps`` steps) in a fresh process for every pair of XLA flag set
and CPU device count (``JAX_NUM_CPU_DEVICES``, the mesh data-parallel over all of them): XLA reads
its flags once per process, so one process cannot compare them. The flag sets are the CPU options
the XLA sources name:

- ``--xla_cpu_experimental_ynn_fusion_type``: which ops XLA hands to YNNPACK fusions (by default dots,
  elementwise ops and reductions); ``=-reduce`` keeps reductions in XLA's own loops, ``=`` (empty)
  turns YNNPACK fusions off.
- ``--xla_cpu_use_onednn=true`` (oneDNN for the ops it supports), alone and with YNNPACK off, since
  YNNPACK otherwise takes the dots first.
- ``--xla_cpu_multi_thread_eigen=false``: Eigen's single-threaded kernels, for when every core
  already runs its own device.

Each setting runs ``--rounds`` times, the settings interleaved so that a busy spell of the machine
does not land on one setting alone; a setting's figure is its best round. Prints a table of step
times with their ratio to the default (no flags, the config's 2 devices), the process's CPU time per
step (all threads; on a machine other jobs share, the figure their load does not inflate, though it
cannot show what a second device gains by running on the other core) and the first step's seconds
(compilation included, the persistent cache off), then one JSON line. The first loss of
every setting is checked against the default's: a flag that changes the arithmetic says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
YNN = "--xla_cpu_experimental_ynn_fusion_type"
FLAG_SETS = {
    "default": "",
    "ynn -reduce": f"{YNN}=-reduce",
    "ynn off": f"{YNN}=",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn + ynn off": f"--xla_cpu_use_onednn=true {YNN}=",
    "eigen 1 thread": "--xla_cpu_multi_thread_eigen=false",
}


def child(steps: int, repeats: int) -> None:
    """In a fresh process whose XLA_FLAGS and JAX_NUM_CPU_DEVICES are the setting: one JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from step_roofline import CONFIG, VOCAB, best_time

    from jaxllm.core.config import load_config, resolve
    from jaxllm.parallel import sharding
    from jaxllm.train import trainer

    devices = jax.devices()
    cfg = load_config(str(CONFIG), [f"mesh.data={len(devices)}"])
    setup = trainer.build(resolve(cfg, VOCAB), sharding.make_mesh(cfg.mesh, devices))
    t = cfg.train
    tokens = np.random.default_rng(0).integers(0, VOCAB, (t.grad_accum, t.batch_size, t.seq_len + 1))
    with setup.context():
        batch = jax.device_put(jnp.asarray(tokens, jnp.int32), setup.batch_sharding)
        start = time.perf_counter()
        state, metrics = setup.step(setup.init(), batch)
        first_loss = float(metrics["loss"])
        first_s = time.perf_counter() - start
        box = [state]

        def one():
            box[0], m = setup.step(box[0], batch)
            return m

        cpu_start = time.process_time()
        step_s = best_time(one, steps, repeats)
        cpu_ms = 1000 * (time.process_time() - cpu_start) / (steps * repeats + 1)
    print(json.dumps({"step_ms": 1000 * step_s, "cpu_ms": cpu_ms, "first_s": first_s, "loss": first_loss}))


def run_setting(flags: str, devices: int, steps: int, repeats: int) -> dict:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(devices),
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
        "JAX_ENABLE_COMPILATION_CACHE": "false",
    }  # every setting compiles: its first step is comparable
    cmd = [sys.executable, __file__, "--child", f"--steps={steps}", f"--repeats={repeats}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"error: XLA_FLAGS={flags!r} with {devices} devices failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(settings: list[tuple[str, str, int]], rounds: int, steps: int, repeats: int) -> dict:
    """``{(name, devices): best result}`` over ``rounds`` interleaved rounds."""
    best: dict = {}
    for r in range(rounds):
        for name, flags, devices in settings:
            res = run_setting(flags, devices, steps, repeats)
            print(
                f"round {r + 1}/{rounds}: {name:>18}, {devices} devices: {res['step_ms']:7.2f} ms/step, "
                f"{res['cpu_ms']:7.2f} ms of CPU/step",
                file=sys.stderr,
            )
            key = (name, devices)
            if key not in best or res["step_ms"] < best[key]["step_ms"]:
                best[key] = {**res, "flags": flags, "devices": devices, "name": name}
    return best


def table(best: dict, base: dict) -> str:
    rows = [
        f"{'setting':>18} {'devices':>7} {'ms/step':>8} {'ratio':>6} {'CPU ms':>7} {'ratio':>6} {'first s':>8}  flags"
    ]
    for (name, devices), res in best.items():
        ratio = res["step_ms"] / base["step_ms"]
        loss_note = (
            "" if abs(res["loss"] - base["loss"]) <= 1e-5 * abs(base["loss"]) else f"  (first loss {res['loss']:.6f})"
        )
        cpu_ratio = res["cpu_ms"] / base["cpu_ms"]
        rows.append(
            f"{name:>18} {devices:>7} {res['step_ms']:8.2f} {ratio:6.3f} "
            f"{res['cpu_ms']:7.1f} {cpu_ratio:6.3f} {res['first_s']:8.1f}  "
            f"{res['flags'] or '(none)'}{loss_note}"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per process (best kept)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per setting, interleaved (best kept)")
    ap.add_argument(
        "--devices", default="2,1", help="CPU device counts to cross with the flag sets; the first is the baseline"
    )
    ap.add_argument(
        "--sets", default=",".join(FLAG_SETS), help="which of the named flag sets to run ('default' is needed)"
    )
    ap.add_argument(
        "--flags",
        action="append",
        default=[],
        help="another XLA flag set to compare (repeatable; --flags=--xla_...=... since it starts with --)",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.steps, args.repeats)
        return 0
    counts = [int(c) for c in args.devices.split(",")]
    unknown = [n for n in args.sets.split(",") if n not in FLAG_SETS]
    if unknown:
        print(f"error: no flag set named {unknown[0]!r}; the sets: {', '.join(FLAG_SETS)}", file=sys.stderr)
        return 2
    if "default" not in args.sets.split(","):
        print("error: --sets must include 'default', the baseline of every ratio", file=sys.stderr)
        return 2
    sets = {**{n: FLAG_SETS[n] for n in args.sets.split(",")}, **{f: f for f in args.flags}}
    settings = [(name, flags, d) for d in counts for name, flags in sets.items()]
    best = measure(settings, args.rounds, args.steps, args.repeats)
    base = best[("default", counts[0])]
    print(
        f"Shakespeare step ({os.cpu_count()} CPUs; ratio to no flags on {counts[0]} devices; "
        f"best of {args.rounds} processes x {args.repeats} runs of {args.steps} steps)"
    )
    print(table(best, base))
    print(json.dumps(list(best.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
