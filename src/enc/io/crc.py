"""CRC-32 (the zip/gzip polynomial) at memory speed.

Every tensor read from a torch zip checkpoint is checked against its member's CRC-32, so the checksum
runs over every byte a conversion moves. The standard library's ``zlib.crc32`` does about 1.5-4 GB/s
here; zlib-ng's carry-less-multiply version does ~10 GB/s on the same bytes. Both compute the same
function (a test checks them against each other); zlib is the fallback where zlib-ng is missing.
"""

from __future__ import annotations

import zlib

try:
    from zlib_ng.zlib_ng import crc32 as _fast
except ImportError:  # pragma: no cover - zlib-ng is a declared dependency
    _fast = None

BACKEND = "zlib-ng" if _fast is not None else "zlib"


def crc32(data, value: int = 0) -> int:
    """CRC-32 of ``data`` (bytes-like), continuing from ``value``; an unsigned 32-bit int like ``zlib.crc32``."""
    if _fast is not None:
        return _fast(data, value) & 0xFFFFFFFF
    return zlib.crc32(data, value) & 0xFFFFFFFF
