"""LZF decompression (the format of Redis's compressed RDB strings), as a numba kernel."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _lzf_kernel(src, start, stop, out):
    """Decompress ``src[start:stop]`` into `out`.

    Returns the number of bytes written, or a negative code: -1 output overflow, -2 input ends
    inside a run, -3 back reference before the start of the output.
    """
    ip = start
    op = 0
    out_len = out.shape[0]
    while ip < stop:
        ctrl = np.int64(src[ip])
        ip += 1
        if ctrl < 32:
            # Literal run of ctrl + 1 bytes.
            run = ctrl + 1
            if ip + run > stop:
                return -2
            if op + run > out_len:
                return -1
            out[op:op + run] = src[ip:ip + run]
            ip += run
            op += run
        else:
            # Back reference: length (3 bits, extended by one byte if 7) and 13-bit distance.
            length = ctrl >> 5
            if length == 7:
                if ip >= stop:
                    return -2
                length += np.int64(src[ip])
                ip += 1
            if ip >= stop:
                return -2
            ref = op - ((ctrl & 0x1F) << 8) - np.int64(src[ip]) - 1
            ip += 1
            length += 2
            if ref < 0:
                return -3
            if op + length > out_len:
                return -1
            # The source may overlap the destination (run-length style), so copy forwards.
            for k in range(length):
                out[op + k] = out[ref + k]
            op += length
    return op


_ERRORS = {
    -1: "decompressed data longer than declared",
    -2: "compressed data ends inside a run",
    -3: "back reference before start of output",
}


def lzf_decompress(src: np.ndarray, start: int, stop: int, size: int) -> bytes:
    """Decompress the LZF data ``src[start:stop]`` (a uint8 array) that expands to `size` bytes.

    Raises
    ------
    ValueError
        If the data is corrupt or does not expand to exactly `size` bytes.
    """
    out = np.empty(size, dtype=np.uint8)
    written = _lzf_kernel(src, start, stop, out)
    if written < 0:
        raise ValueError(_ERRORS[written])
    if written != size:
        raise ValueError(f"decompressed to {written} bytes instead of the declared {size}")
    return out.tobytes()
