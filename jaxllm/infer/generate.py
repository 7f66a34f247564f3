"""The command line: continue a prompt with a trained run (or a Hugging Face directory), streaming the text.

    python -m jaxllm.generate RUN_DIR --prompt "def " [--max-new-tokens COUNT --temperature TEMP
        --top-k COUNT --top-p MASS --quantize int8|int4 --group-size ROWS --seed SEED]

The decoding itself is :mod:`jaxllm.model.decode`; the loading is :func:`jaxllm.load`.
"""

from __future__ import annotations

import sys

from jaxllm.core.errors import ArgumentParser, exit_on_user_error
from jaxllm.infer.api import load
from jaxllm.model.decode import check_request


class StreamPrinter:
    """``on_token`` for one prompt: prints the text as tokens come, holding back an incomplete UTF-8
    character; :meth:`finish` prints whatever the final text adds."""

    def __init__(self, tokenizer, eos_ids: tuple[int, ...]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, _step, tokens_B) -> None:
        if int(tokens_B[0]) in self.eos_ids:
            return
        self.ids.append(int(tokens_B[0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.finish(text)

    def finish(self, text: str) -> None:
        sys.stdout.write(text[self.shown :])
        sys.stdout.flush()
        self.shown = len(text)


DEFAULT_NEW_TOKENS = 200  # new tokens when --max-new-tokens is not given, as many as fit below that


def new_tokens(asked: int | None, prompt_tokens: int, context: int) -> int:
    """``--max-new-tokens``, or when not given :data:`DEFAULT_NEW_TOKENS` cut to what the model's context
    leaves after the prompt (a note on stderr says so); an explicit request that does not fit is refused."""
    if asked is not None:
        check_request([prompt_tokens], asked, context)
        return asked
    n = min(DEFAULT_NEW_TOKENS, context - prompt_tokens)
    check_request([prompt_tokens], max(n, 1), context)
    if n < DEFAULT_NEW_TOKENS:
        print(f"note: generating {n} new tokens, what the model's {context}-token context leaves", file=sys.stderr)
    return n


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m jaxllm.generate", description="Continue a prompt with a trained run.")
    p.add_argument("run_dir", help="a jaxllm run directory or a Hugging Face model directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"tokens to generate (default: {DEFAULT_NEW_TOKENS}, or what the model's context leaves after the prompt)",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    p.add_argument(
        "--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = all (default: %(default)s)"
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="sample from the smallest set holding this mass (default: %(default)s)"
    )
    p.add_argument(
        "--quantize", default="", help="int8 | int4: weight-only quantization of the matmuls (default: none)"
    )
    p.add_argument("--group-size", type=int, default=64, help="int4: input rows per scale (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: %(default)s)")
    return p


@exit_on_user_error
def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    model = load(args.run_dir, quantize=args.quantize or None, group_size=args.group_size)
    n_new = new_tokens(args.max_new_tokens, len(model.tokenizer.encode(args.prompt)), model.config.model.max_seq_len)
    sys.stdout.write(args.prompt)  # only once the request is known to fit
    printer = StreamPrinter(model.tokenizer, model.eos_ids)
    text = model.generate(args.prompt, n_new, args.temperature, args.top_k, args.top_p, args.seed, on_token=printer)
    printer.finish(text)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
