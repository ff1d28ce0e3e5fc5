"""The numba-compiled place callback of the CBF chunk receiver.

spead2 calls it on its network thread for the first packet of every heap, with the
immediate items we asked for. It decides which dump (chunk) and substream slot (heap
index) the heap belongs to, or rejects it and counts why, in spead2's batch statistics.
It never touches Python objects, so it runs without the GIL.

The timestamp base (the timestamp of dump 0, unless the receiver was given one) is voted
on rather than taken from the first heap, so that one stray or crafted heap arriving first
cannot poison the capture. The first well-formed heap sets a *provisional* base; every
later heap either agrees with it (on its dump grid and within ``max_ahead`` dumps of it) or
contradicts it. Contradicting heaps are tallied as a challenger (the same candidate-and-count
machinery as the ``too_far`` jump check); a challenger with at least as many heaps behind it
as the provisional base replaces it, otherwise its heaps are rejected as ``outvoted``. The
base is *confirmed*, and fixed from then on, once ``confirm`` accepted heaps agree with it
(a majority of one dump's substreams, and at least two heaps). The tie rule makes a lone
stray heap first cost nothing but itself; a stray heap arriving between the first genuine
heaps of a capture briefly takes over and costs the genuine heaps placed before it (one,
typically), which are then counted as ``outvoted`` too. Duplicates do not vote.

Chunk ids are not dump indices: dump ``d`` under the current base goes to chunk
``id0 + d``. Re-basing starts a new epoch after every chunk given out so far (spead2's window
only moves forward), so the superseded chunks are still delivered to Python, which discards
them by their id (below ``id0``) and counts their heaps.

Everything it needs lives in one int64 *state* array handed over as user data (so the
function is compiled once, cached on disk, and shared by every receiver). Layout:

- ``state[0:HEADER]``: parameters and running values (``P_*`` offsets below);
- the duplicate detector: ``DUP_RING`` chunk ids, then ``DUP_RING * n_substreams`` flags;
- the descriptor mailbox: ``DESC_SLOTS`` lengths, ``DESC_SLOTS`` dump indices, then
  ``DESC_SLOTS`` slots of
  ``DESC_SLOT_BYTES`` bytes where the first packet of each descriptor heap is copied for
  Python to decode (CBF descriptor heaps fit in one packet).
"""

from __future__ import annotations

import ctypes

import numba
import numpy as np
import scipy
from numba import types
from spead2.numba import intp_to_voidptr
from spead2.recv.numba import chunk_place_data

# Immediate items requested from spead2, in this order.
HEAP_LENGTH_ID = 0x02
PAYLOAD_OFFSET_ID = 0x03
TIMESTAMP_ID = 0x1600
FREQUENCY_ID = 0x4103
STREAM_CTRL_ID = 0x06
# Private item of the receiver's own flush heap (see CBFReceiver.stop); its value must
# match the receiver's random token, so a peer cannot end the stream by accident.
FLUSH_ID = 0x7FF1
PLACE_ITEMS = [
    HEAP_LENGTH_ID, PAYLOAD_OFFSET_ID, TIMESTAMP_ID, FREQUENCY_ID, STREAM_CTRL_ID, FLUSH_ID,
]
DESCRIPTOR_ID = 0x05

# Parameters and running values in the state array.
P_STEP = 0  # ADC ticks between dumps
P_BASE = 1  # timestamp of dump index 0
P_BASE_STATE = 2  # BASE_NONE, BASE_PROVISIONAL or BASE_CONFIRMED
P_FIRST_CHAN = 3  # first channel of the received range
P_CHANS_PER_SUB = 4
P_N_SUB = 5  # heaps per dump
P_HEAP_BYTES = 6
P_MAX_AHEAD = 7  # dumps a heap may be ahead of the newest before it is suspect
P_STAT0 = 8  # index of the first karoo statistic in spead2's batch statistics
P_WINDOW = 9  # spead2's max_chunks
P_LATEST = 10  # newest dump index accepted so far (-1: none)
P_FAR_ID = 11  # candidate for a legitimate jump far ahead
P_FAR_COUNT = 12
P_DUP_RING = 13
P_DESC_SLOTS = 14
P_DESC_SLOT_BYTES = 15
P_DESC_COUNT = 16  # descriptor packets captured so far
P_TOTAL = 17  # length of the state array in int64 words
P_FLUSH_TOKEN = 18
P_FLUSH_CHUNK = 19  # chunk id given to the flush heap (-1: none yet)
P_ID0 = 20  # chunk id of dump index 0 under the current base
P_VOTES = 21  # accepted heaps agreeing with the provisional base
P_ALT_TS = 22  # challenger of the provisional base: a timestamp contradicting it ...
P_ALT_COUNT = 23  # ... and the heaps of that timestamp seen since
P_CONFIRM = 24  # agreeing heaps that confirm the base
HEADER = 32

BASE_NONE, BASE_PROVISIONAL, BASE_CONFIRMED = 0, 1, 2

# Rejection reasons, in the order of their statistics.
REASONS = (
    "bad_size",
    "missing_items",
    "bad_channel",
    "bad_timestamp",
    "too_old",
    "too_far",
    "duplicate",
    "metadata",
    "outvoted",
)
S_BAD_SIZE, S_MISSING_ITEMS, S_BAD_CHANNEL, S_BAD_TIMESTAMP = 0, 1, 2, 3
S_TOO_OLD, S_TOO_FAR, S_DUPLICATE, S_METADATA, S_OUTVOTED = 4, 5, 6, 7, 8


def make_state(
    *,
    step: int,
    base: int | None,
    first_channel: int,
    chans_per_substream: int,
    n_substreams: int,
    heap_bytes: int,
    max_ahead: int,
    stat0: int,
    window: int,
    desc_slots: int = 4,
    desc_slot_bytes: int = 65536,
    flush_token: int = 0,
    confirm: int | None = None,
) -> np.ndarray:
    """Allocate and fill the state array for one receiver.

    A given `base` is confirmed from the start; otherwise it is voted on, and confirmed by
    `confirm` agreeing heaps (default: a majority of `n_substreams`, at least two).
    """
    if confirm is None:
        confirm = max(2, n_substreams // 2 + 1)
    if confirm < 1:
        raise ValueError("confirm must be at least 1")
    dup_ring = window + 1
    desc_words = desc_slots * desc_slot_bytes // 8
    total = HEADER + dup_ring + dup_ring * n_substreams + 2 * desc_slots + desc_words
    state = np.zeros(total, np.int64)
    state[P_STEP] = step
    state[P_BASE] = 0 if base is None else base
    state[P_BASE_STATE] = BASE_NONE if base is None else BASE_CONFIRMED
    state[P_FIRST_CHAN] = first_channel
    state[P_CHANS_PER_SUB] = chans_per_substream
    state[P_N_SUB] = n_substreams
    state[P_HEAP_BYTES] = heap_bytes
    state[P_MAX_AHEAD] = max_ahead
    state[P_STAT0] = stat0
    state[P_WINDOW] = window
    state[P_LATEST] = -1
    state[P_FAR_ID] = -1
    state[P_DUP_RING] = dup_ring
    state[P_DESC_SLOTS] = desc_slots
    state[P_DESC_SLOT_BYTES] = desc_slot_bytes
    state[P_TOTAL] = total
    state[P_FLUSH_TOKEN] = flush_token
    state[P_FLUSH_CHUNK] = -1
    state[P_ALT_TS] = -1
    state[P_CONFIRM] = confirm
    state[HEADER : HEADER + dup_ring] = -1
    return state


def desc_layout(state: np.ndarray) -> tuple[int, int, int]:
    """Word offsets of the descriptor lengths, of the newest dump index when each was
    captured (it applies to later dumps only), and of the descriptor bytes."""
    n_sub = int(state[P_N_SUB])
    ring = int(state[P_DUP_RING])
    lengths = HEADER + ring + ring * n_sub
    slots = int(state[P_DESC_SLOTS])
    return lengths, lengths + slots, lengths + 2 * slots


@numba.njit(nogil=True, cache=True)
def _load_be64(buf, pos):
    value = np.uint64(0)
    for i in range(8):
        value = (value << np.uint64(8)) | np.uint64(buf[pos + i])
    return value


@numba.njit(nogil=True, cache=True)
def _is_descriptor_heap(packet, n_items, heap_address_bits):
    id_mask = (np.uint64(1) << np.uint64(63 - heap_address_bits)) - np.uint64(1)
    for i in range(n_items):
        pointer = _load_be64(packet, 8 + 8 * i)
        immediate = (pointer >> np.uint64(63)) != np.uint64(0)
        item_id = (pointer >> np.uint64(heap_address_bits)) & id_mask
        if not immediate and item_id == DESCRIPTOR_ID:
            return True
    return False


@numba.njit(nogil=True, cache=True)
def _capture_descriptor(state, packet, packet_size, n_items, heap_length, payload_offset):
    """Copy a descriptor heap that fits in this one packet into the mailbox."""
    if payload_offset != 0 or heap_length != packet_size - 8 - 8 * n_items:
        return
    slot_bytes = state[P_DESC_SLOT_BYTES]
    if packet_size > slot_bytes:
        return
    n_sub = state[P_N_SUB]
    ring = state[P_DUP_RING]
    lengths = HEADER + ring + ring * n_sub
    words = lengths + 2 * state[P_DESC_SLOTS]
    slot = state[P_DESC_COUNT] % state[P_DESC_SLOTS]
    raw = state[words:].view(np.uint8)
    start = slot * slot_bytes
    for i in range(packet_size):
        raw[start + i] = packet[i]
    state[lengths + slot] = packet_size
    state[lengths + state[P_DESC_SLOTS] + slot] = state[P_LATEST]
    state[P_DESC_COUNT] += 1


@numba.njit(nogil=True, cache=True)
def _tally(state, slot, key):
    """Count heaps agreeing on a candidate `key` (kept at ``state[slot]``, its count at
    ``state[slot + 1]``); a heap with another key replaces the candidate. Returns the count."""
    if state[slot] == key:
        state[slot + 1] += 1
    else:
        state[slot] = key
        state[slot + 1] = 1
    return state[slot + 1]


@numba.njit(nogil=True, cache=True)
def _set_base(state, timestamp):
    """Make `timestamp` the provisional base of a new epoch of chunk ids."""
    latest = state[P_LATEST]
    state[P_BASE] = timestamp
    state[P_ID0] = latest + 1 if latest >= 0 else 0
    state[P_BASE_STATE] = BASE_PROVISIONAL
    state[P_VOTES] = 0
    state[P_ALT_TS] = -1
    state[P_ALT_COUNT] = 0
    state[P_FAR_ID] = -1  # a jump candidate of the old epoch means nothing in the new one


@numba.njit(nogil=True, cache=True)
def _vote_base(state, timestamp):
    """Vote with a heap on the base while it is not confirmed.

    Returns False if the heap contradicts the provisional base and is outvoted; True if it
    agrees (it is then counted as a vote once accepted) or has made itself the new base.
    """
    if state[P_BASE_STATE] == BASE_NONE:
        _set_base(state, timestamp)
        return True
    step = state[P_STEP]
    diff = timestamp - state[P_BASE]
    reach = state[P_MAX_AHEAD] * step
    if diff % step == 0 and -reach <= diff <= reach:
        return True
    # Re-base on a tie: with a lone stray heap first, the first genuine heap takes over and
    # none of the genuine stream is lost.
    if _tally(state, P_ALT_TS, timestamp) < state[P_VOTES]:
        return False
    _set_base(state, timestamp)
    return True


@numba.njit(nogil=True, cache=True)
def place_heap(state, items, packet, packet_size, stats):
    """Decide where a heap goes.

    Returns (chunk_id, heap_index); chunk_id is -1 when the heap is rejected (after
    counting the reason).
    """
    stat0 = state[P_STAT0]
    heap_length = items[0]
    payload_offset = items[1]
    timestamp = items[2]
    frequency = items[3]
    if items[5] >= 0:
        latest = state[P_LATEST]
        if items[5] == state[P_FLUSH_TOKEN] and latest >= 0 and state[P_FLUSH_CHUNK] < 0:
            # Jump far enough ahead that spead2 ages out (delivers) every real dump.
            state[P_FLUSH_CHUNK] = latest + 2 * state[P_WINDOW]
            return state[P_FLUSH_CHUNK], 0
        stats[stat0 + S_METADATA] += 1
        return -1, 0
    if items[4] >= 0:  # stream control (start/stop) heap: metadata, not data
        stats[stat0 + S_METADATA] += 1
        return -1, 0

    if packet_size >= 8:
        heap_address_bits = np.int64(packet[3]) * 8
        n_items = (np.int64(packet[6]) << 8) | np.int64(packet[7])
        if (
            8 + 8 * n_items <= packet_size
            and 0 < heap_address_bits < 63
            and _is_descriptor_heap(packet, n_items, heap_address_bits)
        ):
            stats[stat0 + S_METADATA] += 1
            _capture_descriptor(state, packet, packet_size, n_items, heap_length, payload_offset)
            return -1, 0
    if timestamp < 0 or frequency < 0:
        stats[stat0 + S_MISSING_ITEMS] += 1
        return -1, 0
    if heap_length != state[P_HEAP_BYTES]:
        stats[stat0 + S_BAD_SIZE] += 1
        return -1, 0
    rel_chan = frequency - state[P_FIRST_CHAN]
    cps = state[P_CHANS_PER_SUB]
    if rel_chan < 0 or rel_chan % cps != 0 or rel_chan // cps >= state[P_N_SUB]:
        stats[stat0 + S_BAD_CHANNEL] += 1
        return -1, 0
    heap_index = rel_chan // cps

    step = state[P_STEP]
    if state[P_BASE_STATE] != BASE_CONFIRMED and not _vote_base(state, timestamp):
        stats[stat0 + S_OUTVOTED] += 1
        return -1, 0
    rel_ts = timestamp - state[P_BASE]
    if rel_ts % step != 0:
        stats[stat0 + S_BAD_TIMESTAMP] += 1
        return -1, 0
    dump_index = rel_ts // step
    chunk_id = state[P_ID0] + dump_index
    latest = state[P_LATEST]
    if dump_index < 0 or (latest >= 0 and chunk_id <= latest - state[P_WINDOW]):
        stats[stat0 + S_TOO_OLD] += 1
        return -1, 0
    # A lone heap far in the future is more likely garbage than a real jump; accept the
    # jump only once a whole dump's worth of heaps agrees on it.
    if (
        latest >= 0
        and chunk_id > latest + state[P_MAX_AHEAD]
        and _tally(state, P_FAR_ID, chunk_id) < state[P_N_SUB]
    ):
        stats[stat0 + S_TOO_FAR] += 1
        return -1, 0
    ring = state[P_DUP_RING]
    n_sub = state[P_N_SUB]
    slot = chunk_id % ring
    if state[HEADER + slot] != chunk_id:
        state[HEADER + slot] = chunk_id
        for i in range(n_sub):
            state[HEADER + ring + slot * n_sub + i] = 0
    seen = HEADER + ring + slot * n_sub + heap_index
    if state[seen] != 0:
        stats[stat0 + S_DUPLICATE] += 1
        return -1, 0
    state[seen] = 1
    if chunk_id > latest:
        state[P_LATEST] = chunk_id
    if state[P_BASE_STATE] == BASE_PROVISIONAL:
        state[P_VOTES] += 1
        if state[P_VOTES] >= state[P_CONFIRM]:
            state[P_BASE_STATE] = BASE_CONFIRMED
    return chunk_id, heap_index


_user_sig = types.void(types.CPointer(chunk_place_data), types.size_t, types.voidptr)


@numba.cfunc(_user_sig, nopython=True, cache=True)
def _place_cfunc(data_ptr, data_size, user_data):
    data = numba.carray(data_ptr, 1)
    header = numba.carray(user_data, HEADER, dtype=np.int64)
    state = numba.carray(user_data, header[P_TOTAL], dtype=np.int64)
    items = numba.carray(intp_to_voidptr(data[0].items), 6, dtype=np.int64)
    packet_size = np.int64(data[0].packet_size)
    packet = numba.carray(intp_to_voidptr(data[0].packet), packet_size, dtype=np.uint8)
    n_stats = state[P_STAT0] + len(REASONS)
    stats = numba.carray(intp_to_voidptr(data[0].batch_stats), n_stats, dtype=np.uint64)
    chunk_id, heap_index = place_heap(state, items, packet, packet_size, stats)
    if chunk_id >= 0:
        data[0].chunk_id = chunk_id
        data[0].heap_index = heap_index
        data[0].heap_offset = heap_index * state[P_HEAP_BYTES]
        if chunk_id == state[P_FLUSH_CHUNK]:
            data[0].heap_offset = 0


def place_callable(state: np.ndarray) -> scipy.LowLevelCallable:
    """The place callback bound to `state` (which must outlive the stream)."""
    return scipy.LowLevelCallable(
        _place_cfunc.ctypes,
        user_data=state.ctypes.data_as(ctypes.c_void_p),
        signature="void (void *, size_t, void *)",
    )
