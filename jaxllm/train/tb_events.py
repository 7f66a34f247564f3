"""TensorBoard scalars written straight to an event file, without TensorFlow or tensorboardX.

An event file (``events.out.tfevents.<time>.<host>``) is a sequence of TFRecords, each
``uint64 length | uint32 masked CRC-32C of length | Event proto | uint32 masked CRC-32C of data``;
the first Event names the format (``file_version``), each later one holds a step's scalars
(``Event{wall_time, step, summary: Summary{value: [Value{tag, simple_value}]}}``).

Why not tensorboardX: it imports PyTorch whenever PyTorch is installed (1.4-2.4 s of CPU at the
start of every run), for the scalars a training run writes, which need nothing but this file format.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked checksum (a CRC of data that itself holds CRCs is unreliable, hence the mask)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One TFRecord holding ``data``."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


# Protocol-buffer wire format, for the three fields of the three messages we write.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): strings and embedded messages."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(
    wall_time: float, step: int | None = None, scalars: dict[str, float] | None = None, file_version: str | None = None
) -> bytes:
    """An ``Event`` proto: wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
    if step is not None:
        out += _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _field(1, _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", v))
            for tag, v in scalars.items()
        )  # Summary.value = 1: Value{tag = 1, simple_value = 2}
        out += _field(5, values)
    return out


class ScalarWriter:
    """Appends scalars to a new event file in ``directory`` (what TensorBoard's Scalars tab reads)."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = directory / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        self._file = self.path.open("ab")
        self._file.write(record(event(now, file_version="brain.Event:2")))

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        self._file.write(record(event(time.time(), step, scalars)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
