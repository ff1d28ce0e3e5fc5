"""Fast path of the RDB reader: one numba pass that locates every string of a telstate file.

It understands the common subset: plain (not int-encoded, not LZF) strings; types 0 string,
3 zset (text scores "0"), 4 hash, 5 zset2, and 12/13 ziplists and 16/17 listpacks whose entries
are strings (zset scores must be 0); the SELECTDB, RESIZEDB, AUX and EXPIRETIME(_MS) opcodes.
It records where each string is; Python then slices them out. On anything else (or any
inconsistency) it gives up and the reader re-parses the file with its complete, pure-Python
parser, which also words the errors.
"""

from __future__ import annotations

import numpy as np
from numba import njit

OK = 0
GIVE_UP = 1
FULL = 2

# Columns of the record table.
REC_TYPE, REC_DB, REC_FIRST, REC_COUNT, REC_OFFSET = range(5)
REC_COLUMNS = 5


@njit(nogil=True, cache=True, inline="always")
def _length(data, pos, n):
    """Plain length at `pos`: (length, next position), or (-1, pos) if special or truncated."""
    if pos >= n:
        return -1, pos
    first = np.int64(data[pos])
    kind = first >> 6
    if kind == 0:
        return first, pos + 1
    if kind == 1:
        if pos + 2 > n:
            return -1, pos
        return ((first & 0x3F) << 8) | np.int64(data[pos + 1]), pos + 2
    if first == 0x80 or first == 0x81:
        width = 4 if first == 0x80 else 8
        if pos + 1 + width > n:
            return -1, pos
        value = np.int64(0)
        for k in range(width):
            value = (value << 8) | np.int64(data[pos + 1 + k])
        if value < 0 or value > n:
            return -1, pos
        return value, pos + 1 + width
    return -1, pos


@njit(nogil=True, cache=True, inline="always")
def _string(data, pos, n):
    """Plain string at `pos`: (start, end), or (-1, pos) if encoded/truncated."""
    size, start = _length(data, pos, n)
    if size < 0 or start + size > n:
        return -1, pos
    return start, start + size


@njit(nogil=True, cache=True, inline="always")
def _u32le(data, pos):
    """The little-endian uint32 at `pos`."""
    value = np.int64(0)
    for k in range(4):
        value |= np.int64(data[pos + k]) << (8 * k)
    return value


@njit(nogil=True, cache=True, inline="always")
def _finish(data, count_at, index, ns, at_end):
    """Result of a ziplist/listpack walk: entries paired, header count (if known) right."""
    count = np.int64(data[count_at]) | (np.int64(data[count_at + 1]) << 8)
    if not at_end or index % 2 == 1 or (count != 0xFFFF and count != index):
        return -1
    return ns


@njit(nogil=True, cache=True)
def _ziplist(data, start, end, is_zset, spans, ns):
    """Spans of a ziplist's entries into `spans` from row `ns`; returns new ns, or -1/-2."""
    if end - start < 11:
        return -1
    if _u32le(data, start) != end - start:  # the header's total length
        return -1
    pos = start + 10
    index = 0
    while pos < end:
        first = data[pos]
        if first == 0xFF:
            return _finish(data, start + 8, index, ns, pos == end - 1)
        pos += 1 if first < 254 else 5
        if pos >= end:
            return -1
        enc = np.int64(data[pos])
        top = enc >> 6
        if top == 0:
            s = pos + 1
            e = s + (enc & 0x3F)
        elif top == 1:
            if pos + 2 > end:
                return -1
            s = pos + 2
            e = s + (((enc & 0x3F) << 8) | np.int64(data[pos + 1]))
        elif top == 2:
            if pos + 5 > end:
                return -1
            size = np.int64(0)
            for k in range(4):
                size = (size << 8) | np.int64(data[pos + 1 + k])
            s = pos + 5
            e = s + size
        elif enc == 0xF1 and is_zset and index % 2 == 1:
            # Score 0 as the 4-bit immediate: what katsdptelstate writes.
            pos += 1
            index += 1
            continue
        else:
            return -1
        if e >= end:
            return -1
        if is_zset and index % 2 == 1:
            return -1  # a score written as a string: leave it to the full parser
        if ns >= spans.shape[0]:
            return -2
        spans[ns, 0] = s
        spans[ns, 1] = e
        ns += 1
        index += 1
        pos = e
    return -1


@njit(nogil=True, cache=True)
def _listpack(data, start, end, is_zset, spans, ns):
    """Spans of a listpack's entries into `spans` from row `ns`; returns new ns, or -1/-2."""
    if end - start < 7:
        return -1
    if _u32le(data, start) != end - start:  # the header's total length
        return -1
    pos = start + 6
    index = 0
    while pos < end:
        enc = np.int64(data[pos])
        if enc == 0xFF:
            return _finish(data, start + 4, index, ns, pos == end - 1)
        if enc < 0x80:
            # 7-bit integer: only a zero score is taken on this path.
            if not (is_zset and index % 2 == 1 and enc == 0):
                return -1
            pos += 2
            index += 1
            continue
        if enc < 0xC0:
            s = pos + 1
            e = s + (enc & 0x3F)
        elif 0xE0 <= enc < 0xF0:
            if pos + 2 > end:
                return -1
            s = pos + 2
            e = s + (((enc & 0x0F) << 8) | np.int64(data[pos + 1]))
        elif enc == 0xF0:
            if pos + 5 > end:
                return -1
            s = pos + 5
            e = s + _u32le(data, pos + 1)
        else:
            return -1
        if is_zset and index % 2 == 1:
            return -1
        # Skip the back-length: 7 bits per byte of this entry's size.
        size = e - pos
        if size < 128:
            after = e + 1
        elif size < 16383:
            after = e + 2
        elif size < 2097151:
            after = e + 3
        elif size < 268435455:
            after = e + 4
        else:
            after = e + 5
        if after >= end:
            return -1
        if ns >= spans.shape[0]:
            return -2
        spans[ns, 0] = s
        spans[ns, 1] = e
        ns += 1
        index += 1
        pos = after
    return -1


@njit(nogil=True, cache=True)
def scan(data, pos, db, spans, ns, recs, nr):
    """Walk records from `pos`; returns (status, pos, db, ns, nr).

    On OK, `pos` is just after the EOF opcode. On FULL, the state is that at the start of the
    record that did not fit: grow `spans`/`recs` and call again with it.
    """
    n = data.shape[0]
    while pos < n:
        start = pos
        op = data[pos]
        pos += 1
        if op == 0xFF:
            return OK, pos, db, ns, nr
        if op == 0xFE:
            db, pos = _length(data, pos, n)
            if db < 0:
                return GIVE_UP, start, db, ns, nr
            continue
        if op == 0xFB:
            a, pos = _length(data, pos, n)
            b, pos = _length(data, pos, n)
            if a < 0 or b < 0:
                return GIVE_UP, start, db, ns, nr
            continue
        if op == 0xFA:
            s, pos = _string(data, pos, n)
            t, pos = _string(data, pos, n)
            if s < 0 or t < 0:
                return GIVE_UP, start, db, ns, nr
            continue
        if op == 0xFC or op == 0xFD:
            pos += 8 if op == 0xFC else 4
            continue
        if nr >= recs.shape[0]:
            return FULL, start, db, ns, nr
        first_ns = ns
        s, pos = _string(data, pos, n)
        if s < 0 or ns >= spans.shape[0]:
            return (GIVE_UP if s < 0 else FULL), start, db, first_ns, nr
        spans[ns, 0] = s
        spans[ns, 1] = pos
        ns += 1
        if op == 0:
            count = 1
        elif op == 3 or op == 4 or op == 5:
            count, pos = _length(data, pos, n)
            if count < 0:
                return GIVE_UP, start, db, first_ns, nr
            if op == 4:
                count *= 2
        elif op == 12 or op == 13 or op == 16 or op == 17:
            count = 0
        else:
            return GIVE_UP, start, db, first_ns, nr
        for _ in range(count):
            s, pos = _string(data, pos, n)
            if s < 0:
                return GIVE_UP, start, db, first_ns, nr
            if ns >= spans.shape[0]:
                return FULL, start, db, first_ns, nr
            spans[ns, 0] = s
            spans[ns, 1] = pos
            ns += 1
            if op == 5:
                # Score: 0.0 or -0.0 (little-endian double) only.
                if pos + 8 > n:
                    return GIVE_UP, start, db, first_ns, nr
                for k in range(7):
                    if data[pos + k] != 0:
                        return GIVE_UP, start, db, first_ns, nr
                if data[pos + 7] != 0 and data[pos + 7] != 0x80:
                    return GIVE_UP, start, db, first_ns, nr
                pos += 8
            elif op == 3:
                # Score as text: only "0" (what katsdptelstate writes).
                if pos + 2 > n or data[pos] != 1 or data[pos + 1] != 0x30:
                    return GIVE_UP, start, db, first_ns, nr
                pos += 2
        if count == 0:
            s, pos = _string(data, pos, n)
            if s < 0:
                return GIVE_UP, start, db, first_ns, nr
            is_zset = op == 12 or op == 17
            if op == 12 or op == 13:
                result = _ziplist(data, s, pos, is_zset, spans, ns)
            else:
                result = _listpack(data, s, pos, is_zset, spans, ns)
            if result == -2:
                return FULL, start, db, first_ns, nr
            if result < 0:
                return GIVE_UP, start, db, first_ns, nr
            ns = result
        recs[nr, REC_TYPE] = op
        recs[nr, REC_DB] = db
        recs[nr, REC_FIRST] = first_ns
        recs[nr, REC_COUNT] = ns - first_ns - 1
        recs[nr, REC_OFFSET] = start
        nr += 1
    return GIVE_UP, pos, db, ns, nr
