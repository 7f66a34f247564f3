"""Atomic writes: a new file gets the mode ``open`` would give it, a replaced file keeps its own."""

from __future__ import annotations

import os
import stat

from jaxllm.core import fileio


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_is_readable_as_the_umask_allows(tmp_path):
    fileio.atomic_write(tmp_path / "config.yaml", "a: 1\n")
    with open(tmp_path / "plain.yaml", "w") as f:
        f.write("a: 1\n")
    assert mode(tmp_path / "config.yaml") == mode(tmp_path / "plain.yaml")


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    fileio.atomic_write(path, "[]")
    assert mode(path) == 0o640 and path.read_text() == "[]"
