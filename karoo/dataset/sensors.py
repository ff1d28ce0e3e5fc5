"""Sensors sampled at the dumps: numeric ones interpolated, the others held from event to event."""

from __future__ import annotations

import numpy as np

# katdal's simplification of the observation activity into scan states
_SCAN_STATES = {"scan_ready": "slew", "scan": "scan", "scan_complete": "scan", "load_scan": "scan",
                "track": "track", "slew": "slew"}


def scan_state(activity: str) -> str:
    """``track``, ``scan``, ``slew`` or ``stop`` for a raw ``obs_activity`` value."""
    return _SCAN_STATES.get(activity, "stop")


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype.kind == "S":
        return value.astype(str)
    return value


def is_numeric(values: list) -> bool:
    return bool(values) and all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        for v in values)


def event_dumps(times: np.ndarray, timestamps: np.ndarray, dump_period: float) -> np.ndarray:
    """Index of the dump during which each event happened (the first dump ending at or after it).

    An event before the first dump gives 0 or less; one after the last dump gives ``T``.
    """
    ends = np.asarray(timestamps) + 0.5 * dump_period
    return np.searchsorted(ends, np.asarray(times), side="left")


def hold_index(times: np.ndarray, timestamps: np.ndarray, dump_period: float,
               greedy: np.ndarray | None = None) -> np.ndarray:
    """For each dump, the index of the sample in force (see :func:`hold`)."""
    n = len(timestamps)
    events = event_dumps(times, timestamps, dump_period)
    index = np.searchsorted(events, np.arange(n), side="right") - 1
    index = np.clip(index, 0, len(times) - 1)
    if greedy is not None and greedy.any():
        # A greedy value in force at any time during a dump takes the dump (katdal's rule).
        for dump in np.unique(events[(events >= 0) & (events < n)]):
            first = np.searchsorted(events, dump, side="left")
            last = np.searchsorted(events, dump, side="right") - 1
            candidates = [k for k in range(max(first - 1, 0), last + 1) if greedy[k]]
            if candidates:
                index[dump] = candidates[-1]
    return index


def hold(values: list, times: np.ndarray, timestamps: np.ndarray, dump_period: float,
         greedy=None) -> list:
    """Categorical sensor at the dumps: each dump takes the last event during or before it.

    Dumps before the first event take the first value (katdal's ``initial_value`` rule). With
    `greedy` (a predicate on values), a greedy value in force at any time during a dump takes it
    (katdal's rule for ``slew`` and ``stop`` activities, so a scan never starts mid-slew).
    """
    if not values:
        raise ValueError("a sensor without samples cannot be sampled at the dumps")
    flags = None if greedy is None else np.array([bool(greedy(v)) for v in values])
    return [values[i] for i in hold_index(times, timestamps, dump_period, flags)]


def greedy_for(name: str):
    """The greedy-value predicate katdal uses for a sensor (activities: slew and stop)."""
    if name.endswith("activity"):
        return lambda value: scan_state(str(value)) in ("slew", "stop")
    return None


def sample(raw: list[tuple], timestamps: np.ndarray, dump_period: float,
           greedy=None) -> np.ndarray:
    """A sensor's ``(value, time)`` samples at the dump timestamps.

    Numeric sensors are interpolated linearly (held flat beyond the ends); any other sensor is
    categorical (see :func:`hold`), returned as an object array (or string array for strings).
    Duplicate timestamps keep the last sample.
    """
    if not raw:
        raise KeyError("sensor has no samples")
    values = [_plain(v) for v, _ in raw]
    times = np.array([t for _, t in raw], np.float64)
    order = np.argsort(times, kind="stable")
    times, values = times[order], [values[i] for i in order]
    last = np.r_[times[1:] != times[:-1], True]
    times, values = times[last], [v for v, keep in zip(values, last, strict=True) if keep]
    if is_numeric(values):
        return np.interp(timestamps, times, np.asarray(values, np.float64))
    held = hold(values, times, timestamps, dump_period, greedy)
    if all(isinstance(v, str) for v in held):
        return np.array(held, dtype=str)
    out = np.empty(len(held), object)
    out[:] = held
    return out
