"""Pre-train a transformer language model.

    python train.py [CONFIG.yaml] [section.key=value ...]

With no config, ``configs/tiny.yaml``. ``--help`` lists every key with its default and meaning.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxllm.config import help_text, load_config
from jaxllm.errors import exit_on_user_error

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
USAGE = "usage: python train.py [CONFIG.yaml] [section.key=value ...]"


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """The optional config path (first argument without '=') and the overrides."""
    if argv and "=" not in argv[0]:
        return argv[0], argv[1:]
    return None, argv


@exit_on_user_error
def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(f"{USAGE}\n\nConfig keys (default, meaning):\n{help_text()}")
        return 0
    path, overrides = split_args(argv)
    cfg = load_config(path, overrides, default=str(DEFAULT_CONFIG))

    import jax  # after the config is known to be valid

    from jaxllm.trainer import train

    summary = train(cfg)
    if "interrupted" in summary:
        print(f"stopped by {summary['interrupted']} at step {summary['step']}; checkpoint saved", file=sys.stderr)
        return 128 + summary["signal"]  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    if jax.process_index() == 0:  # one line per run, not per host
        print(f"done: step {summary['step']}, final eval loss {summary['eval_loss']:.4f}, run in {cfg.run.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
