"""``python -m jaxllm.generate RUN_DIR --prompt TEXT ...``: the README's generate command, kept at the
package's top like the scripts; the command itself is :mod:`jaxllm.infer.generate`."""

import sys

from jaxllm.core.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str]) -> int:
    from jaxllm.infer import generate  # imports JAX: once the environment is known to be usable

    return generate.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
