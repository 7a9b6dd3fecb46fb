"""TFRecord framing, read in pure Python: is a file a TFRecord shard at all?

A TFRecord file is a sequence of records, each: uint64 length (little-endian), uint32 masked crc32c of those 8
bytes, the data, uint32 masked crc32c of the data (TensorFlow's `tensorflow/core/lib/io/record_writer.cc`
format). A mirror or proxy that answers a web page, an error text or nothing must never leave that answer
cached as a ClickMe shard: `first_record_problem` looks at the first record's header, which no such answer
has. Both ClickMe readers (the TFDS builder and the published 0.0.9 loader in `harmonization.common`) use it
before keeping, and before reusing, a downloaded shard. Standard library only.
"""

from __future__ import annotations

import logging
import os
import struct

__all__ = ["first_record_problem", "masked_crc32c", "usable_cached_shard"]

_CRC32C_POLYNOMIAL = 0x82F63B78  # Castagnoli, reflected.
_MASK_DELTA = 0xA282EAD8  # TensorFlow's crc32c::Mask


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLYNOMIAL if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """The masked crc32c that TFRecord files store, in pure Python.

    Used only for headers and bad records: neither `crc32c` nor `google_crc32c` is a dependency, and good
    records are checked by TensorFlow's C++ reader.
    """
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def first_record_problem(path: str | os.PathLike) -> str | None:
    """What shows that the file at `path` is not a TFRecord shard, or None.

    Reads only the first record's header: its length, the masked crc32c of that length, and whether the file is
    long enough to hold the record. A web page, an error message or an empty answer fails; whether each record
    is whole is checked when the shard is read. `path` may be a path object with its own `open` and `stat` (a
    TFDS `etils.epath.Path`, which can be a cloud path).
    """
    stat = path.stat() if hasattr(path, "stat") else os.stat(path)
    size = stat.st_size if hasattr(stat, "st_size") else stat.length  # os.stat_result, or etils.epath's
    with (path.open("rb") if hasattr(path, "open") else open(path, "rb")) as file:
        start = file.read(40)
    header = start[:12]
    if size == 0:
        return "the file is empty; a shard holds records"
    if len(header) < 12 or masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
        return f"the file ({size} bytes) does not start with a TFRecord header: it starts with {start!r}"
    (length,) = struct.unpack("<Q", header[:8])
    if 12 + length + 4 > size:
        return f"its first record needs {length + 16} bytes, the file has {size}"
    return None


def usable_cached_shard(path) -> bool:
    """Whether a shard downloaded earlier can be read as it is: it exists and is framed as a TFRecord file.

    One that exists but is not (a web page that a mirror answered and an older version kept) is reported, as a
    warning, to be downloaded again: kept, it would break every read from then on.
    """
    if not path.exists():
        return False
    problem = first_record_problem(path)
    if problem is not None:
        logging.getLogger(__name__).warning(
            "The downloaded ClickMe shard %s is not a TFRecord shard (%s): downloading it again.", path, problem)
    return problem is None
