"""enc.io.crc: the fast CRC-32 is the zip/zlib CRC-32, value for value, including continuation."""

import os
import zlib

import pytest

from enc.io import crc


@pytest.mark.parametrize("n", [0, 1, 7, 64, 4095, 65536 + 3, 3 * 2**20 + 5])
def test_crc32_equals_zlib(n):
    data = os.urandom(n)
    assert crc.crc32(data) == zlib.crc32(data)
    half = n // 2  # continued over two pieces, as the streaming checks do
    assert crc.crc32(memoryview(data)[half:], crc.crc32(data[:half])) == zlib.crc32(data)


def test_known_value_and_backend():
    assert crc.crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value
    assert crc.BACKEND == "zlib-ng"  # a declared dependency: the fast path is the one CI runs
