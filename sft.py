"""Fine-tune a pre-trained model on instructions or chats (full, LoRA, prompt tuning or adapters).

    python sft.py [CONFIG.yaml] [section.key=value ...]

With no config, ``configs/sft_tiny.yaml``: the model ``python train.py`` left in runs/tiny learns the
built-in instruction tasks. ``--help`` lists every key with its default and meaning.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxllm.core import signals
from jaxllm.core.config import SFTConfig, help_text, load_config
from jaxllm.core.errors import exit_on_user_error

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "sft_tiny.yaml"
USAGE = "usage: python sft.py [CONFIG.yaml] [section.key=value ...]"


def run_finetuning(cfg: SFTConfig) -> int:
    """Fine-tunes as ``cfg`` says; the exit status: 0, or 128 + the signal that stopped the run."""
    from jaxllm.sft.finetune import finetune  # imports JAX: once the config has parsed (finetune checks the rest)

    signals.check("importing JAX")

    s = finetune(cfg)
    if "interrupted" in s:
        print(f"stopped by {s['interrupted']} at step {s['step']}; checkpoint saved, rerun to resume", file=sys.stderr)
        return 128 + s["signal"]  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    print(
        f"done: {cfg.sft.method}, held-out exact match {s['before']['overall']:.1%} -> {s['after']['overall']:.1%}, "
        f"{s['trainable']:,} trainable parameters ({s['trainable'] / s['total']:.2%}), "
        f"{s['seconds']:.0f} s, run in {cfg.run.dir}"
    )
    return 0


@exit_on_user_error
def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        defaults = load_config(None, cls=SFTConfig, default=str(DEFAULT_CONFIG))  # what a bare `python sft.py` runs
        print(
            f"{USAGE}\n\nConfig keys (value without a CONFIG: {DEFAULT_CONFIG.name}'s, meaning):\n"
            f"{help_text(SFTConfig, defaults)}"
        )
        return 0
    path, overrides = (argv[0], argv[1:]) if argv and "=" not in argv[0] else (None, argv)
    cfg = load_config(path, overrides, cls=SFTConfig, default=str(DEFAULT_CONFIG))

    with signals.deferred():  # from here on a SIGINT / SIGTERM stops the run at its next safe point
        return run_finetuning(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
