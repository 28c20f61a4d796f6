"""Reading 8-bit PNGs (such as Chromium's screenshots) into NumPy, with the standard library's zlib (a test helper).

The PNG filters Sub, Average and Paeth predict each byte from its left neighbour, so a row cannot be
undone in one vector operation. Every pixel depends only on its left, upper and upper-left neighbours,
so the pixels of one anti-diagonal (row + column = d) are independent: undoing the filters diagonal by
diagonal takes height + width vector steps instead of a Python loop over every byte.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from mlxscan.errors import MlxscanError

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # color type: grey, RGB, grey + alpha, RGBA


def _chunks(data: bytes):
    offset = len(_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        yield kind, data[offset + 8:offset + 8 + length]
        offset += 12 + length


def _paeth(left: np.ndarray, up: np.ndarray, up_left: np.ndarray) -> np.ndarray:
    estimate = left + up - up_left
    to_left, to_up, to_corner = np.abs(estimate - left), np.abs(estimate - up), np.abs(estimate - up_left)
    return np.where((to_left <= to_up) & (to_left <= to_corner), left, np.where(to_up <= to_corner, up, up_left))


def _unfilter(filtered: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """filtered: int32 [height, width, channels]; filters: [height] in 0..4. The original bytes, uint8."""
    height, width, channels = filtered.shape
    pixels = np.zeros((height + 1, width + 1, channels), np.int32)  # a zero row above and column to the left
    for diagonal in range(height + width - 1):
        rows = np.arange(max(0, diagonal - width + 1), min(height - 1, diagonal) + 1)
        cols = diagonal - rows
        left, up, up_left = pixels[rows + 1, cols], pixels[rows, cols + 1], pixels[rows, cols]
        kind = filters[rows][:, None]
        prediction = np.select([kind == 1, kind == 2, kind == 3, kind == 4],
                               [left, up, (left + up) // 2, _paeth(left, up, up_left)], 0)
        pixels[rows + 1, cols + 1] = (filtered[rows, cols] + prediction) % 256
    return pixels[1:, 1:].astype(np.uint8)


def read_png(data: bytes) -> np.ndarray:
    """uint8 [height, width, channels] from the bytes of a non-interlaced 8-bit PNG (grey, RGB, with or without alpha)."""
    if data[:8] != _SIGNATURE:
        raise MlxscanError("not a PNG file (bad signature)")
    chunks = list(_chunks(data))
    if not chunks or chunks[0][0] != b"IHDR":
        raise MlxscanError("not a PNG file (no IHDR chunk first)")
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if depth != 8 or color not in _CHANNELS or interlace:
        raise MlxscanError(f"unsupported PNG: bit depth {depth}, color type {color}, interlace {interlace}")
    channels = _CHANNELS[color]
    raw = np.frombuffer(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")), np.uint8)
    if raw.size != height * (1 + width * channels):
        raise MlxscanError(f"PNG data holds {raw.size} bytes; {width}x{height} with {channels} channels needs "
                           f"{height * (1 + width * channels)}")
    rows = raw.reshape(height, 1 + width * channels)
    if rows[:, 0].max(initial=0) > 4:
        raise MlxscanError("PNG row filter outside 0..4")
    return _unfilter(rows[:, 1:].reshape(height, width, channels).astype(np.int32), rows[:, 0])
