"""A run's metrics: ``metrics.jsonl`` (one JSON object per line), TensorBoard events and ``loss.png``.

Only process 0 writes. On resume the file is cut back to the resume step, so a rerun never holds a
step twice; a last line cut short by a crash is dropped with a warning instead of blocking the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxllm.core import fileio
from jaxllm.core.errors import UserError
from jaxllm.train.tb_events import ScalarWriter

CHANGES = "config_changes"  # a record's key for the config changes a resume was allowed (run.allow_changes)


def _trimmed(path: Path, resume_step: int) -> None:
    """Rewrites ``path`` keeping the records up to ``resume_step``; warns about a torn last line."""
    records = fileio.read_jsonl(path, "metrics file", torn_tail_ok=True)
    lines = [line for line in fileio.read_text(path, "metrics file").splitlines() if line.strip()]
    if len(records) < len(lines):
        print(f"warning: the last line of {path} was cut short (a crash while writing it); dropped", file=sys.stderr)
    # a resume records the config changes it was allowed at its own step: one at or past this resume
    # described a resume that this one undoes, and this resume writes its own
    kept = [
        r for r in records if r.get("step", 0) < resume_step or (r.get("step", 0) == resume_step and CHANGES not in r)
    ]
    if len(kept) < len(lines):
        fileio.atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (and TensorBoard, if ``tensorboard_dir``) on process 0."""

    def __init__(self, path: Path, resume_step: int, enabled: bool, tensorboard_dir: Path | None):
        self.path, self.enabled = path, enabled
        self.writer = None
        if not enabled:
            return
        if path.exists():
            _trimmed(path, resume_step)
        if tensorboard_dir is not None:
            self.writer = ScalarWriter(tensorboard_dir)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror or e}") from None
        if self.writer is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            scalars.update({f"layer_grad_norm/{i}": v for i, v in enumerate(record.get("layer_grad_norms", []))})
            scalars.update(_moe_scalars(record))
            self.writer.add_scalars(scalars, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _moe_scalars(record: dict) -> list[tuple[str, float]]:
    """TensorBoard tags of the router's per-layer statistics: ``moe_load/layer{i}/expert{e}``,
    ``moe_dropped/layer{i}``, ``moe_balance/layer{i}``, ``moe_z/layer{i}``."""
    tags = [
        (f"moe_load/layer{i}/expert{e}", f)
        for i, row in enumerate(record.get("moe_load", []))
        for e, f in enumerate(row)
    ]
    for key in ("moe_dropped", "moe_balance", "moe_z"):
        tags += [(f"{key}/layer{i}", v) for i, v in enumerate(record.get(key, []))]
    return tags


def plot_expert_load(metrics_path: Path, out: Path) -> None:
    """Each MoE layer's expert load (fraction of assignments per expert) against the step, as a PNG;
    nothing for a dense model. An even router holds every expert at 1 / E (dotted)."""
    rows = [r for r in fileio.read_jsonl(metrics_path, "metrics file", torn_tail_ok=True) if "moe_load" in r]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    n_layers, n_experts = len(rows[0]["moe_load"]), len(rows[0]["moe_load"][0])
    fig, axes = plt.subplots(n_layers, 1, figsize=(7, 1.2 + 2.2 * n_layers), sharex=True, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        for e in range(n_experts):
            ax.plot(steps, [r["moe_load"][i][e] for r in rows], lw=1, label=f"expert {e}")
        ax.axhline(1 / n_experts, ls=":", color="grey")
        dropped = rows[-1].get("moe_dropped", [0.0] * n_layers)[i]
        ax.set_ylabel(f"MoE layer {i}\nload")
        ax.set_title(f"MoE layer {i}: {100 * dropped:.1f}% of assignments dropped at step {steps[-1]}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=min(n_experts, 8))
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Training and validation loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = fileio.read_jsonl(metrics_path, "metrics file", torn_tail_ok=True)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"training curve: {metrics_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
