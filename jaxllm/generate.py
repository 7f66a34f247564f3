"""``python -m jaxllm.generate RUN_DIR --prompt TEXT ...``: the README's generate command, kept at the
package's top like the scripts; the command itself is :mod:`jaxllm.infer.generate`."""

import sys

from jaxllm.infer.generate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
