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
    """Index of the dump from which each event applies: the dump during which it happened.

    An event before the first dump applies from dump 0; one after the last dump from ``T``.
    """
    ends = np.asarray(timestamps) + 0.5 * dump_period
    return np.searchsorted(ends, np.asarray(times), side="right")


def hold(values: list, times: np.ndarray, timestamps: np.ndarray, dump_period: float) -> list:
    """Categorical sensor at the dumps: each dump takes the last event up to its end.

    Dumps before the first event take the first value (katdal's ``initial_value`` rule); events
    sharing a dump leave the last one.
    """
    if not values:
        raise ValueError("a sensor without samples cannot be sampled at the dumps")
    start = event_dumps(times, timestamps, dump_period)
    index = np.searchsorted(start, np.arange(len(timestamps)), side="right") - 1
    index = np.clip(index, 0, len(values) - 1)
    return [values[i] for i in index]


def hold_index(times: np.ndarray, timestamps: np.ndarray, dump_period: float) -> np.ndarray:
    """For each dump, the index of the sample :func:`hold` would give it."""
    start = event_dumps(times, timestamps, dump_period)
    index = np.searchsorted(start, np.arange(len(timestamps)), side="right") - 1
    return np.clip(index, 0, len(times) - 1)


def sample(raw: list[tuple], timestamps: np.ndarray, dump_period: float) -> np.ndarray:
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
    held = hold(values, times, timestamps, dump_period)
    if all(isinstance(v, str) for v in held):
        return np.array(held, dtype=str)
    out = np.empty(len(held), object)
    out[:] = held
    return out
