"""The documents of the local tasks in this folder: JSON lines beside this file, read without the network."""

import json
from pathlib import Path

import datasets


def load(name: str, **_kwargs) -> dict:
    rows = [json.loads(line) for line in (Path(__file__).parent / f"{name}.jsonl").read_text().splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}
