"""The configuration reference, docs/configuration.md, rendered from the config schemas.

    python -m jaxllm.config_doc                          # the page, on stdout
    python -m jaxllm.config_doc --out docs/configuration.md

Every key of :mod:`jaxllm.core.config_schema` (and of the scaling studies' own sections, which is
why this module sits at the package's top, above every folder) is one table row: its dotted name, its default and its
meaning (with the sign it must have). ``tests/test_docs.py`` compares the page with :func:`render`,
so the page cannot drift from the schema.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from jaxllm.core.config_schema import Config, SFTConfig
from jaxllm.scaling.depth import DepthConfig
from jaxllm.scaling.sweep import SweepConfig

HEADER = """\
# Configuration reference

Every key that `train.py`, `sft.py` and `scaling.py sweep` accept, with its default and meaning.
Set a key in a YAML file (nested sections) or on the command line as `section.key=value`; the
command line wins. `python train.py --help` and `python sft.py --help` print the same table.
A value of the wrong type or sign, or a key that does not exist, is refused in one line (exit 2).

This page is generated from `jaxllm/core/config_schema.py` (and the `sweep` and `depth` sections
of `jaxllm/scaling/`): edit the schema, then run
`python -m jaxllm.config_doc --out docs/configuration.md` (`tests/test_docs.py` fails while
the two differ).
"""

SFT_NOTE = """\
## Fine-tuning only (`sft.py`)

`sft.py` takes every section above (its `model` comes from `init.from`: only compute options such
as `model.dtype` or `model.remat` may change) and these.
"""


SCALING_NOTE = """\
## Scaling studies only (`scaling.py sweep`, `scaling.py depth`)

Both take every pre-training section (each run's model shape and steps are set by the study) and
their own.
"""


def _value(v: Any) -> str:
    """A default as it would be written in YAML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, str):
        return f'"{v}"' if v else "''"
    return repr(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(obj: Any, prefix: str) -> list[str]:
    """One table row per key of a section, a subsection's keys after it (``model.moe.top_k``)."""
    rows, subsections = [], []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            subsections.append((value, key))
            continue
        sign = f" ({f.metadata['sign']})" if f.metadata.get("sign") else ""
        rows.append(f"| `{key}` | `{_value(value)}` | {_cell(f.metadata.get('help', ''))}{sign} |")
    for value, key in subsections:
        rows += _rows(value, key)
    return rows


def _section(name: str, obj: Any) -> str:
    return "\n".join([f"### `{name}`", "", "| key | default | meaning |", "|---|---|---|", *_rows(obj, name), ""])


def _sections(cls: type, skip: set[str]) -> list[str]:
    return [_section(f.name, f.default_factory()) for f in dataclasses.fields(cls) if f.name not in skip]


def render() -> str:
    """The whole page: the pre-training sections, then those only fine-tuning or a study reads."""
    common = {f.name for f in dataclasses.fields(Config)}
    parts = [HEADER, "## Every script\n", *_sections(Config, set()), SFT_NOTE, *_sections(SFTConfig, common)]
    parts += [SCALING_NOTE, *_sections(SweepConfig, common), *_sections(DepthConfig, common)]
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.config_doc", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the page to this file instead of stdout")
    args = parser.parse_args(argv)
    if args.out:
        from pathlib import Path

        from jaxllm.core.fileio import atomic_write

        atomic_write(Path(args.out), render())
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
