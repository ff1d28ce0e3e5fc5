"""`DataSet`: a capture-block stream with katdal's shape of API over lazy Dask arrays."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import dask.array as da
import numpy as np

from .. import flags as flag_bits
from . import applycal as cal
from . import kernels
from .chunks import StoredArrays, StreamReader, stored_arrays
from .geometry import Antenna, AntennaUVW, enu_from_reference, parse_target
from .sensors import event_dumps, greedy_for, sample, scan_state
from .source import DataSourceNotFound, OpenedSource, open_source

if TYPE_CHECKING:
    from ..ms.export import ExportSource
    from ..ms.layout import MSInput

logger = logging.getLogger(__name__)

ALL_FLAGS = 0xFF
MJD_UNIX_OFFSET = 3506716800.0  # seconds from the MJD epoch to the UNIX epoch


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return np.array([_plain(v) for v in value.ravel()]).reshape(value.shape)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _flag_mask(names) -> int:
    """Bit mask of flag names (``'all'``, ``''``, comma list or sequence of karoo.flags names)."""
    if names is None or names == "all":
        return ALL_FLAGS
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    mask = 0
    for name in names:
        if name not in flag_bits.NAMES:
            raise ValueError(f"unknown flag {name!r}: use {', '.join(flag_bits.NAMES)} or 'all'")
        mask |= int(flag_bits.NAMES[name])
    return mask


def _index(keep: np.ndarray):
    """A boolean mask as a slice when contiguous (cheap for Dask), else integer indices."""
    where = np.flatnonzero(keep)
    if len(where) and where[-1] - where[0] + 1 == len(where):
        return slice(int(where[0]), int(where[-1]) + 1)
    return where


class LazyArray:
    """A selected (T, F, B) array, read only when indexed or computed.

    Indexing uses outer (per-axis) semantics, like katdal: ``d.vis[10:20, :, [0, 5]]`` reads
    only the chunks of those dumps. ``.dask`` gives the Dask array.
    """

    def __init__(self, full: da.Array, index: tuple, name: str, direct=None) -> None:
        self._full = full
        self._index = index
        self.name = name
        # (dataset, kind) when the plain direct reader can serve this array (see `get`)
        self._direct = direct

    def _direct_plan(self, key):
        """Global ``(dumps range, channels range, corrprods or None, squeeze)`` of
        ``self[key]`` when they are contiguous (the direct reader's case), else None."""
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices for a {self.ndim}-d array")
        key = key + (slice(None),) * (self.ndim - len(key))
        axes, squeeze = [], []
        for axis, (sel, k, n) in enumerate(zip(self._index, key, self._full.shape,
                                               strict=True)):
            index = np.arange(n)[sel]
            if isinstance(k, (int, np.integer)):
                if not -len(index) <= k < len(index):
                    raise IndexError(f"index {k} out of range for axis {axis} of size "
                                     f"{len(index)}")
                index = index[[int(k)]]
                squeeze.append(axis)
            else:
                k = k if isinstance(k, slice) else np.asarray(k)
                index = index[k]
            axes.append(index)
        dumps, chans, corrprods = axes
        ranges = []
        for index in (dumps, chans):
            if len(index) and not np.all(np.diff(index) == 1):
                return None
            ranges.append(range(int(index[0]), int(index[-1]) + 1) if len(index) else None)
        if corrprods.size == self._full.shape[2] and np.all(corrprods == np.arange(corrprods.size)):
            corrprods = None
        return ranges[0], ranges[1], corrprods, squeeze

    @property
    def dask(self) -> da.Array:
        x = self._full
        for axis, idx in enumerate(self._index):
            if isinstance(idx, slice) and idx == slice(0, x.shape[axis]):
                continue
            x = x[(slice(None),) * axis + (idx,)]
        return x

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(range(*i.indices(n))) if isinstance(i, slice) else len(i)
                     for i, n in zip(self._index, self._full.shape, strict=True))

    @property
    def dtype(self) -> np.dtype:
        return self._full.dtype

    @property
    def ndim(self) -> int:
        return len(self._index)

    def __len__(self) -> int:
        return self.shape[0]

    def _indexed(self, key) -> tuple[da.Array, list[int]]:
        """The Dask array of ``self[key]`` (outer indexing) and the axes to squeeze."""
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices for a {self.ndim}-d array")
        x = self.dask
        squeeze = []
        for axis, k in enumerate(key):
            if isinstance(k, (int, np.integer)):
                n = x.shape[axis]
                if not -n <= k < n:
                    raise IndexError(f"index {k} out of range for axis {axis} of size {n}")
                k = slice(int(k) % n, int(k) % n + 1)
                squeeze.append(axis)
            elif not isinstance(k, slice):
                k = np.asarray(k)
                if k.dtype == bool:
                    k = np.flatnonzero(k)
            if not (isinstance(k, slice) and k == slice(None)):
                x = x[(slice(None),) * axis + (k,)]
        return x, squeeze

    def __getitem__(self, key) -> np.ndarray:
        return get([self], key)[0]

    def __array__(self, dtype=None, copy=None):
        out = self.compute()
        return out if dtype is None else out.astype(dtype)

    def compute(self) -> np.ndarray:
        return get([self], ())[0]

    def __repr__(self) -> str:
        return f"<LazyArray {self.name} shape={self.shape} dtype={self.dtype}>"


def get(arrays: list[LazyArray], index=(), out: list[np.ndarray] | None = None
        ) -> list[np.ndarray]:
    """Read several lazy arrays of a dataset at the same index, in one pass.

    Like katdal's ``DaskLazyIndexer.get``: the chunks the arrays share (weights need the
    autocorrelations) are read once, and the blocks are written into the outputs by the worker
    threads, in parallel, rather than assembled at the end.

    Parameters
    ----------
    arrays
        E.g. ``[d.vis, d.flags, d.weights]``.
    index
        Outer index applied to each (as ``d.vis[index]``).
    out
        Arrays of the right shapes and dtypes to read into (reusing them saves the cost of
        fresh memory), as in katdal.

    Returns
    -------
    list of ndarray
    """
    direct = _get_direct(arrays, index, out)
    if direct is not None:
        return direct
    sources, squeezes = zip(*(a._indexed(index) for a in arrays), strict=True)
    outputs = out if out is not None else [np.empty(x.shape, x.dtype) for x in sources]
    for x, o in zip(sources, outputs, strict=True):
        if o.shape != x.shape or o.dtype != x.dtype:
            raise ValueError(f"output {o.shape} {o.dtype} does not fit {x.shape} {x.dtype}")
    if any(x.size for x in sources):
        da.store(list(sources), outputs, lock=False)
    return [out.squeeze(axis=tuple(sq)) if sq else out
            for out, sq in zip(outputs, squeezes, strict=True)]


def _get_direct(arrays, index, out) -> list[np.ndarray] | None:
    """`get` by the direct reader (:mod:`karoo.dataset.direct`) when it applies, else None."""

    if not arrays or any(a._direct is None for a in arrays):
        return None
    dataset = arrays[0]._direct[0]
    if any(a._direct[0] is not dataset for a in arrays):
        return None
    plans = [a._direct_plan(index) for a in arrays]
    if any(p is None for p in plans) or any(
            p[0] != plans[0][0] or p[1] != plans[0][1] or not np.array_equal(
                p[2] if p[2] is not None else [], plans[0][2] if plans[0][2] is not None else [])
            for p in plans):
        return None
    dumps, chans, corrprods, squeeze = plans[0]
    n_b = arrays[0]._full.shape[2] if corrprods is None else len(corrprods)
    shape = (len(dumps) if dumps else 0, len(chans) if chans else 0, n_b)
    outputs = out if out is not None else [np.empty(shape, a.dtype) for a in arrays]
    for a, o in zip(arrays, outputs, strict=True):
        if o.shape != shape or o.dtype != a.dtype:
            raise ValueError(f"output {o.shape} {o.dtype} does not fit {shape} {a.dtype}")
    if all(shape):
        kinds = [a._direct[1] for a in arrays]
        dataset._read_direct(kinds, dumps, chans, corrprods, outputs)
    return [o.squeeze(axis=tuple(squeeze)) if squeeze else o for o in outputs]


class SensorCache:
    """``d.sensor[name]``: sensor values at the selected dumps.

    Names are telstate keys with the first matching capture-block/stream prefix removed
    (``obs_activity``, ``m000_pos_actual_scan_azim``, ``anc_air_temperature``), plus
    ``Antennas/array/activity`` / ``target``, ``Antennas/<ant>/<sensor>``,
    ``Observation/scan_index``, ``scan_state``, ``target_index``, ``label``,
    ``compscan_index`` and ``Timestamps/mjd``. Numeric sensors are interpolated linearly to the
    dump centres; others hold their last value (see :mod:`karoo.dataset.sensors`).
    """

    def __init__(self, dataset: DataSet) -> None:
        self._dataset = dataset
        self._cache: dict[str, np.ndarray] = {}

    def _virtual(self, name: str) -> np.ndarray | None:
        d = self._dataset
        if not name.startswith(("Observation/", "Timestamps/", "Antennas/")):
            return None
        obs = {"Observation/scan_index": d._scan_index, "Observation/scan_state": d._scan_state,
               "Observation/target_index": d._target_index, "Observation/label": d._label,
               "Observation/compscan_index": d._compscan_index}
        if name in obs:
            return np.asarray(obs[name])
        if name == "Timestamps/mjd":
            return d._timestamps / 86400.0 + MJD_UNIX_OFFSET / 86400.0
        if name.startswith("Antennas/"):
            _, ant, what = name.split("/", 2)
            key = {"activity": "obs_activity", "target": "cbf_target"}.get(what, what) \
                if ant == "array" else f"{ant}_{what}"
            return self.get_full(key)
        return None

    def get_full(self, name: str) -> np.ndarray:
        """Values at every dump of the dataset (ignoring the selection)."""
        if name not in self._cache:
            values = self._virtual(name)
            if values is None:
                d = self._dataset
                try:
                    raw = d._view.get_range(name, st=0)
                except KeyError:
                    raw = []
                if not raw:
                    raise KeyError(f"no sensor {name!r} in the dataset's telstate")
                values = sample(raw, d._timestamps, d.dump_period, greedy_for(name))
            self._cache[name] = values
        return self._cache[name]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get_full(name)[self._dataset._time_keep]

    def get(self, name: str, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def keys(self) -> list[str]:
        """Names of the telstate sensors (one query per key on a live Redis: not cheap)."""
        from ..telstate import KeyType

        d = self._dataset
        prefixes = sorted(d._view.prefixes, key=len, reverse=True)
        names = set()
        root = d._view.root()
        for key in root.keys("*"):
            if root.key_type(key) != KeyType.MUTABLE:
                continue
            names.add(next(key[len(p):] for p in prefixes if key.startswith(p)))
        return sorted(names)


def _prefixes(telstate, cbid: str, stream: str) -> list[str]:
    streams = [stream]
    while True:
        parent = telstate.get(f"{streams[-1]}_inherit")
        if not parent or _plain(parent) in streams:
            break
        streams.append(_plain(parent))
    return ([f"{cbid}_{s}_" for s in streams] + [f"{cbid}_"] + [f"{s}_" for s in streams]
            + [""])


@dataclass
class _Segment:
    start: int
    stop: int
    state: str
    target: int
    label: str


class DataSet:
    """One capture-block stream, katdal style. Make it with :func:`karoo.open`.

    Attributes
    ----------
    name, capture_block_id, stream_name
        Source name, capture block and stream.
    ants, inputs, corr_products
        Selected antennas (:class:`~karoo.dataset.geometry.Antenna`), inputs and corr products.
    timestamps, freqs, channel_width, dump_period
        Selected dump centres (UNIX s), channel centres (Hz), widths (Hz) and dump period (s).
    catalogue, target
        All targets; the target of the current selection's first dump.
    sensor
        Sensor values at the selected dumps (:class:`SensorCache`).
    vis, flags, weights, raw_flags
        Lazy arrays of the selection (:class:`LazyArray`).
    missing_chunks
        Stored chunks never written, per array (their data read as flagged ``data_lost``).
    """

    def __init__(self, opened: OpenedSource, *, applycal=None, flags="all",
                 time_offset: float = 0.0,
                 gaincal_flux: Mapping[str, float] | None = MappingProxyType({})) -> None:
        self.name = opened.name
        self.capture_block_id = opened.capture_block_id
        self.stream_name = opened.stream_name
        self._telstate_spec = opened.telstate_spec
        self._store_spec = opened.store_spec
        self._telstate = opened.telstate
        self._prefix_list = _prefixes(self._telstate, self.capture_block_id, self.stream_name)
        view = self._view
        name = f"{self.capture_block_id}_{self.stream_name}"

        def need(key):
            value = view.get(key)
            if value is None:
                looked = ", ".join(repr(p) for p in self._prefix_list)
                raise DataSourceNotFound(f"{self.name}: telstate has no {key!r} for {name} "
                                         f"(looked under {looked})")
            return _plain(value)

        stream_type = _plain(view.get("stream_type"))
        if stream_type is not None and stream_type != "sdp.vis":
            raise DataSourceNotFound(f"{name} is a {stream_type!r} stream, not 'sdp.vis'")
        chunk_info = _plain(view.get("chunk_info"))
        self._chunk_info = chunk_info
        if chunk_info is None and self._store_spec is None:
            raise DataSourceNotFound(
                f"{self.name}: no {name}_chunk_info in telstate, so neither the number of dumps "
                "nor the chunk store is known (the vis writer records it at the end of the "
                "capture); pass chunk_store= to read the store's own shape")
        self.dump_period = float(need("int_time"))
        self._first_timestamp = float(need("first_timestamp"))
        self._sync_time = float(need("sync_time"))
        n_chans = int(need("n_chans"))
        bandwidth = float(need("bandwidth"))
        center_freq = float(need("center_freq"))
        self.channel_width = bandwidth / n_chans
        self._freqs = center_freq + (np.arange(n_chans) - n_chans // 2) * self.channel_width
        self._corr_products = np.asarray(need("bls_ordering"), dtype=str).reshape(-1, 2)
        self.need_weights_power_scale = bool(view.get("need_weights_power_scale", False))
        self.obs_params = _plain(view.get("obs_params")) or {}

        self._antennas = self._read_antennas()
        self._reader = (None if self._store_spec is None else
                        StreamReader(self._store_spec, self.capture_block_id, self.stream_name))
        if chunk_info is not None:
            n_dumps = int(chunk_info["correlator_data"]["shape"][0])
        else:
            n_dumps = int(self._reader.array("correlator_data").shape[0])
        self._timestamps = (self._sync_time + self._first_timestamp + time_offset
                            + np.arange(n_dumps) * self.dump_period)
        if n_dumps and self._corr_products.shape[0] and chunk_info is not None:
            n_bls = int(chunk_info["correlator_data"]["shape"][2])
            if n_bls != len(self._corr_products):
                raise DataSourceNotFound(f"{name}: bls_ordering has {len(self._corr_products)} "
                                         f"products but the data have {n_bls}")
        self.sensor = SensorCache(self)
        self._segment_scans()
        self._applycal = cal.parse_applycal(applycal)
        # katdal's rule: cal's measured fluxes, updated with these; None disables flux scaling
        self._gaincal_flux = None if gaincal_flux is None else dict(gaincal_flux)
        self._cal_tables: cal.CalTables | None = None
        self._stored: StoredArrays | None = None
        self._flag_mask = _flag_mask(flags)
        self._time_keep = np.ones(n_dumps, bool)
        self._freq_keep = np.ones(n_chans, bool)
        self._corrprod_keep = np.ones(len(self._corr_products), bool)
        default_ants = self.obs_params.get("ants") if isinstance(self.obs_params, dict) else None
        if default_ants:
            wanted = [a for a in str(default_ants).split(",") if a in self._antenna_names]
            if wanted:
                self.select(ants=wanted, reset="")

    # --- telstate ---------------------------------------------------------------------------

    @property
    def telstate(self):
        """The dataset's telstate, viewed through the capture block and stream prefixes
        (katdal's ``source.telstate``)."""
        return self._view

    @property
    def _view(self):
        from ..telstate import TelescopeState

        if self._telstate is None:
            if self._telstate_spec is None:
                raise RuntimeError("this DataSet's telstate cannot be reopened here")
            self._telstate = self._telstate_spec.open()
        return TelescopeState(prefixes=self._prefix_list, base=self._telstate)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_telstate"] = None
        return state

    def _read_antennas(self) -> list[Antenna]:
        view = self._view
        inputs = sorted({x[:-1] for x in self._corr_products.ravel()})
        resources = _plain(view.get("sub_pool_resources")) or ""
        names = [r for r in str(resources).split(",") if view.get(f"{r}_observer") is not None]
        names += [n for n in inputs if n not in names and view.get(f"{n}_observer") is not None]
        antennas = [Antenna.parse(_plain(view[f"{n}_observer"])) for n in names]
        missing = [n for n in inputs if n not in names]
        if missing:
            raise DataSourceNotFound(f"{self.name}: no <ant>_observer for {', '.join(missing)}")
        return antennas

    @property
    def _antenna_names(self) -> list[str]:
        return [a.name for a in self._antennas]

    # --- scans ------------------------------------------------------------------------------

    def _segment_scans(self) -> None:
        n = len(self._timestamps)
        try:
            activity = [scan_state(str(a)) for a in self.sensor.get_full("obs_activity")]
        except KeyError:
            activity = ["track"] * n
        try:
            targets = [str(t) for t in self.sensor.get_full("cbf_target")]
        except KeyError:
            targets = [""] * n
        # Label events (repeats count: each starts a compound scan) also start scans (katdal).
        try:
            raw_labels = self._view.get_range("obs_label", st=0)
        except KeyError:
            raw_labels = []
        label_at: dict[int, str] = {}
        if raw_labels:
            times = np.array([t for _, t in raw_labels])
            dumps = np.clip(event_dumps(times, self._timestamps, self.dump_period), 0, None)
            for (value, _), dump in zip(raw_labels, dumps, strict=True):
                if dump < n:
                    label_at[int(dump)] = str(_plain(value))
        self._target_descriptions: list[str] = []
        try:
            for value, _ in self._view.get_range("cbf_target", st=0):
                desc = str(_plain(value))
                if desc not in self._target_descriptions:
                    self._target_descriptions.append(desc)
        except KeyError:
            pass
        for t in targets:
            if t and t not in self._target_descriptions:
                self._target_descriptions.append(t)
        self.catalogue = [parse_target(t) for t in self._target_descriptions]
        # Scans start where the activity changes, and at label events more than a dump away
        # from such a start; each label event then moves to the nearest scan start (katdal).
        starts = [i for i in range(n) if i == 0 or activity[i] != activity[i - 1]]
        for dump in sorted(label_at):
            if starts and min(abs(dump - x) for x in starts) > 1:
                starts.append(dump)
        starts = sorted(set(starts))
        aligned: dict[int, str] = {}
        for dump in sorted(label_at):
            nearest = min(starts, key=lambda x, d=dump: (abs(x - d), x))
            aligned[nearest] = label_at[dump]
        segments: list[_Segment] = []
        compscan_starts = [0]
        label = aligned.get(0, "")
        for s_index, start in enumerate(starts):
            stop = starts[s_index + 1] if s_index + 1 < len(starts) else n
            if start in aligned:
                label = aligned[start]
                if start:
                    compscan_starts.append(start)
            target = self._target_descriptions.index(targets[start]) if targets[start] else -1
            segments.append(_Segment(start, stop, activity[start], target, label))
        self._segments = segments
        self._scan_index = np.zeros(n, int)
        self._scan_state = np.empty(n, object)
        self._target_index = np.full(n, -1, int)
        self._label = np.empty(n, object)
        self._compscan_index = np.zeros(n, int)
        for s, seg in enumerate(segments):
            dumps = slice(seg.start, seg.stop)
            self._scan_index[dumps] = s
            self._scan_state[dumps] = seg.state
            self._target_index[dumps] = seg.target
            self._label[dumps] = seg.label
        for start in compscan_starts[1:]:
            self._compscan_index[start:] += 1

    def scans(self):
        """Iterate over the scans in the selection: yields ``(index, state, target)``.

        The dataset is restricted to each scan in turn and restored afterwards.
        """
        saved = self._time_keep.copy()
        try:
            for s, seg in enumerate(self._segments):
                keep = saved.copy()
                keep[: seg.start] = False
                keep[seg.stop:] = False
                if not keep.any():
                    continue
                self._time_keep = keep
                yield s, seg.state, self.catalogue[seg.target] if seg.target >= 0 else None
        finally:
            self._time_keep = saved

    def compscans(self):
        """Iterate over compound scans (label segments): yields ``(index, label, target)``."""
        saved = self._time_keep.copy()
        try:
            for c in np.unique(self._compscan_index):
                keep = saved & (self._compscan_index == c)
                if not keep.any():
                    continue
                self._time_keep = keep
                first = np.flatnonzero(keep)[0]
                target = self._target_index[first]
                yield int(c), self._label[first], self.catalogue[target] if target >= 0 else None
        finally:
            self._time_keep = saved

    # --- selection ---------------------------------------------------------------------------

    def select(self, *, reset: str = "auto", strict: bool = True, **kw) -> None:
        """Select dumps, channels and corr products (katdal's `select`).

        Parameters
        ----------
        dumps, timerange, scans, compscans, targets
            Time: indices/slice/mask; ``(start, end)`` (UNIX seconds or ISO strings; dumps
            wholly inside); scan indices or states (``'track'``, ``'~slew'``); compound scan
            indices or labels; target indices, names, descriptions or Target objects.
        channels, freqrange
            Frequency: indices/slice/mask; ``(low, high)`` Hz (channels wholly inside).
        corrprods, ants, pol
            Baselines: ``'auto'``, ``'cross'``, indices/mask or a list of input pairs; antenna
            names (``'~m001'`` deselects); ``'H'``, ``'V'``, ``'HH'``, ``'HV'``, ...
        flags
            Flag names that count in ``flags`` (comma list, ``'all'`` or ``''``).
        reset
            ``'auto'`` (each dimension named is reset first), ``''`` (narrow the selection) or
            letters of ``'TFB'`` to reset. ``select()`` with no arguments resets everything.
        strict
            Unknown keywords raise TypeError (else they are ignored with a warning).
        """
        time_keys = ("dumps", "timerange", "scans", "compscans", "targets", "target_tags")
        freq_keys = ("channels", "freqrange")
        bl_keys = ("corrprods", "ants", "pol", "inputs")
        known = set(time_keys + freq_keys + bl_keys + ("flags", "weights", "spw", "subarray"))
        unknown = set(kw) - known
        if unknown:
            if strict:
                raise TypeError(f"select() got unknown keywords: {', '.join(sorted(unknown))}")
            logger.warning("select(): ignoring %s", ", ".join(sorted(unknown)))
        if not kw and reset == "auto":
            reset = "TFB"
        if reset == "auto":
            reset = ("T" if set(kw) & set(time_keys) else "") + \
                ("F" if set(kw) & set(freq_keys) else "") + ("B" if set(kw) & set(bl_keys) else "")
        if "T" in reset:
            self._time_keep = np.ones(len(self._timestamps), bool)
        if "F" in reset:
            self._freq_keep = np.ones(len(self._freqs), bool)
        if "B" in reset:
            self._corrprod_keep = np.ones(len(self._corr_products), bool)
        if not kw and "B" in reset:
            self._flag_mask = ALL_FLAGS
        for key, value in kw.items():
            if key in ("weights", "spw", "subarray"):
                continue
            if key == "flags":
                self._flag_mask = _flag_mask(value)
                continue
            mask = getattr(self, f"_select_{key}")(value)
            if key in time_keys:
                self._time_keep &= mask
            elif key in freq_keys:
                self._freq_keep &= mask
            else:
                self._corrprod_keep &= mask

    @staticmethod
    def _mask_of(value, n: int) -> np.ndarray:
        mask = np.zeros(n, bool)
        if isinstance(value, slice):
            mask[value] = True
            return mask
        value = np.atleast_1d(np.asarray(value))
        if value.dtype == bool:
            if len(value) != n:
                raise IndexError(f"boolean selection of length {len(value)}, expected {n}")
            return value.copy()
        mask[value.astype(int)] = True
        return mask

    def _select_dumps(self, value) -> np.ndarray:
        return self._mask_of(value, len(self._timestamps))

    def _select_timerange(self, value) -> np.ndarray:
        start, end = (_unix_time(v) for v in value)
        half = 0.5 * self.dump_period
        return (self._timestamps - half >= start) & (self._timestamps + half <= end)

    def _select_scans(self, value) -> np.ndarray:
        items = [value] if isinstance(value, (str, int, np.integer)) else list(value)
        mask = np.zeros(len(self._timestamps), bool)
        for item in items:
            if isinstance(item, str):
                negate = item.startswith("~")
                state = item.lstrip("~")
                match = (self._scan_state == state)
                mask |= ~match if negate else match
            else:
                mask |= self._scan_index == int(item)
        return mask

    def _select_compscans(self, value) -> np.ndarray:
        items = [value] if isinstance(value, (str, int, np.integer)) else list(value)
        mask = np.zeros(len(self._timestamps), bool)
        for item in items:
            if isinstance(item, str):
                negate = item.startswith("~")
                match = self._label == item.lstrip("~")
                mask |= ~match if negate else match
            else:
                mask |= self._compscan_index == int(item)
        return mask

    def _target_number(self, item) -> int:
        if isinstance(item, (int, np.integer)):
            return int(item)
        if not isinstance(item, str):
            item = getattr(item, "description", None) or getattr(item, "name", str(item))
        for i, (t, desc) in enumerate(zip(self.catalogue, self._target_descriptions,
                                          strict=True)):
            if item in (t.name, desc, t.description):
                return i
        raise KeyError(f"no target {item!r} in the catalogue")

    def _select_targets(self, value) -> np.ndarray:
        items = [value] if isinstance(value, (str, int, np.integer)) or hasattr(value, "ra") \
            else list(value)
        mask = np.zeros(len(self._timestamps), bool)
        for item in items:
            mask |= self._target_index == self._target_number(item)
        return mask

    def _select_target_tags(self, value) -> np.ndarray:
        tags = [value] if isinstance(value, str) else list(value)
        wanted = [i for i, t in enumerate(self.catalogue) if set(tags) & set(t.tags)]
        return np.isin(self._target_index, wanted)

    def _select_channels(self, value) -> np.ndarray:
        return self._mask_of(value, len(self._freqs))

    def _select_freqrange(self, value) -> np.ndarray:
        low, high = value
        half = 0.5 * self.channel_width
        return (self._freqs - half >= low) & (self._freqs + half <= high)

    def _select_corrprods(self, value) -> np.ndarray:
        cp = self._corr_products
        if isinstance(value, str):
            autos = np.array([a[:-1] == b[:-1] for a, b in cp], bool)
            if value == "auto":
                return autos
            if value == "cross":
                return ~autos
            raise ValueError(f"corrprods must be 'auto', 'cross', indices or pairs, not {value!r}")
        array = np.asarray(value)
        if array.dtype.kind in "US" and array.ndim == 2:
            wanted = {(str(a), str(b)) for a, b in array}
            return np.array([(a, b) in wanted for a, b in cp], bool)
        return self._mask_of(value, len(cp))

    def _select_ants(self, value) -> np.ndarray:
        items = [value] if isinstance(value, str) or hasattr(value, "latitude") else list(value)
        names = [getattr(i, "name", i) for i in items]
        negative = [n[1:] for n in names if n.startswith("~")]
        positive = [n for n in names if not n.startswith("~")]
        for n in negative + positive:
            if n not in self._antenna_names:
                raise KeyError(f"no antenna {n!r} in this dataset")
        keep = set(positive or self._antenna_names) - set(negative)
        return np.array([a[:-1] in keep and b[:-1] in keep for a, b in self._corr_products])

    def _select_inputs(self, value) -> np.ndarray:
        keep = {value} if isinstance(value, str) else set(value)
        return np.array([a in keep and b in keep for a, b in self._corr_products])

    def _select_pol(self, value) -> np.ndarray:
        items = [value] if isinstance(value, str) else list(value)
        mask = np.zeros(len(self._corr_products), bool)
        for item in items:
            pol = item.lower()
            if pol in ("h", "v"):
                pol = pol * 2
            if len(pol) != 2 or set(pol) - {"h", "v"}:
                raise ValueError(f"pol must be H, V, HH, HV, VH or VV, not {item!r}")
            mask |= np.array([a[-1] == pol[0] and b[-1] == pol[1]
                              for a, b in self._corr_products])
        return mask

    # --- what is selected ------------------------------------------------------------------

    @property
    def timestamps(self) -> np.ndarray:
        return self._timestamps[self._time_keep]

    @property
    def dumps(self) -> np.ndarray:
        """Indices of the selected dumps in the whole dataset."""
        return np.flatnonzero(self._time_keep)

    @property
    def freqs(self) -> np.ndarray:
        return self._freqs[self._freq_keep]

    @property
    def channels(self) -> np.ndarray:
        return np.flatnonzero(self._freq_keep)

    @property
    def corr_products(self) -> np.ndarray:
        return self._corr_products[self._corrprod_keep]

    @property
    def inputs(self) -> list[str]:
        cp = self.corr_products
        return sorted(set(cp.ravel()), key=lambda x: (x[:-1], x[-1]))

    @property
    def ants(self) -> list[Antenna]:
        used = {x[:-1] for x in self.corr_products.ravel()}
        return [a for a in self._antennas if a.name in used]

    @property
    def ref_ant(self) -> Antenna:
        """The array reference position (the first antenna's reference, katdal's 'array')."""
        return self._antennas[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self._time_keep.sum()), int(self._freq_keep.sum()),
                int(self._corrprod_keep.sum()))

    @property
    def size(self) -> int:
        """Bytes of vis + flags + weights in the selection (as read: 8 + 1 + 4 per visibility)."""
        return int(np.prod(self.shape)) * 13

    @property
    def start_time(self) -> float:
        return float(self.timestamps[0] - 0.5 * self.dump_period)

    @property
    def end_time(self) -> float:
        return float(self.timestamps[-1] + 0.5 * self.dump_period)

    @property
    def target(self):
        """Target of the first selected dump (None if nothing is selected)."""
        dumps = self.dumps
        if not len(dumps) or self._target_index[dumps[0]] < 0:
            return None
        return self.catalogue[self._target_index[dumps[0]]]

    @property
    def description(self) -> str:
        return str(self.obs_params.get("description", "")) if isinstance(self.obs_params, dict) \
            else ""

    @property
    def experiment_id(self) -> str:
        return str(self.obs_params.get("experiment_id", "")) if isinstance(self.obs_params, dict) \
            else ""

    @property
    def observer(self) -> str:
        return str(self.obs_params.get("observer", "")) if isinstance(self.obs_params, dict) \
            else ""

    # --- uvw ---------------------------------------------------------------------------------

    def antenna_uvw(self, antennas: list[Antenna] | None = None) -> AntennaUVW:
        """Picklable per-antenna uvw hook over the catalogue (see `AntennaUVW`)."""
        antennas = self._antennas if antennas is None else antennas
        ref = self.ref_ant
        return AntennaUVW(enu_from_reference(antennas, ref), tuple(t.ra for t in self.catalogue),
                          tuple(t.dec for t in self.catalogue), ref.latitude, ref.longitude)

    def _uvw(self) -> np.ndarray:
        dumps = self.dumps
        target = self._target_index[dumps]
        if np.any(target < 0):
            raise ValueError("some selected dumps have no target (no cbf_target sensor)")
        per_ant = self.antenna_uvw()(self._timestamps[dumps], target)
        index = {a.name: i for i, a in enumerate(self._antennas)}
        cp = self.corr_products
        a1 = np.array([index[a[:-1]] for a in cp[:, 0]], int)
        a2 = np.array([index[b[:-1]] for b in cp[:, 1]], int)
        return per_ant[:, a1] - per_ant[:, a2]

    @property
    def u(self) -> np.ndarray:
        """u of each selected corr product (T, B), metres, as u(ant1) - u(ant2) (katdal)."""
        return self._uvw()[..., 0]

    @property
    def v(self) -> np.ndarray:
        return self._uvw()[..., 1]

    @property
    def w(self) -> np.ndarray:
        return self._uvw()[..., 2]

    # --- data --------------------------------------------------------------------------------

    def _stored_arrays(self) -> StoredArrays:
        if self._reader is None:
            raise ValueError(f"{self.name}: no chunk store (metadata only); pass chunk_store=")
        if self._stored is None:
            self._stored = stored_arrays(self._reader, len(self._timestamps))
        return self._stored

    @property
    def missing_chunks(self) -> dict[str, int]:
        """Stored chunks never written, per array (read as flagged ``data_lost``)."""
        return dict(self._stored_arrays().missing_chunks)

    def _input_indices(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        inputs = sorted(set(self._corr_products.ravel()))
        where = {x: i for i, x in enumerate(inputs)}
        in1 = np.array([where[a] for a in self._corr_products[:, 0]], np.int64)
        in2 = np.array([where[b] for b in self._corr_products[:, 1]], np.int64)
        return inputs, in1, in2

    def _power_scale_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Autocorrelation product of each input, and each product's two inputs."""
        _, in1, in2 = self._input_indices()
        autos = {a: k for k, (a, b) in enumerate(self._corr_products) if a == b}
        inputs = sorted(set(self._corr_products.ravel()))
        missing = [x for x in inputs if x not in autos]
        if missing:
            raise ValueError("weights need scaling by autocorrelation power but the data have no "
                             f"autocorrelation for {', '.join(missing)}")
        return np.array([autos[x] for x in inputs], np.int64), in1, in2

    def _raw_weights(self, stored: dict[str, da.Array]) -> da.Array:
        weights = stored["weights"]
        channel = stored["weights_channel"]
        if not self.need_weights_power_scale:
            return da.blockwise(kernels.stored_weights, "tfb", weights, "tfb", channel, "tf",
                                dtype=np.float32)
        auto_index, in1, in2 = self._power_scale_indices()
        auto_of = da.from_array(auto_index, chunks=-1)
        i1 = da.from_array(in1, chunks=-1)
        i2 = da.from_array(in2, chunks=-1)
        return da.blockwise(kernels.power_scaled_weights, "tfb", weights, "tfb", channel, "tf",
                            stored["correlator_data"], "tfb", auto_of, "i", i1, "b", i2, "b",
                            dtype=np.float32, concatenate=True)

    def _cal(self) -> cal.CalTables | None:
        products, explicit = self._applycal
        if not products:
            return None
        if self._cal_tables is None:
            view = self._cal_view()
            inputs, _, _ = self._input_indices()
            names = [_target_names(t) for t in self._target_descriptions]
            dump_targets = [names[t] if t >= 0 else () for t in self._target_index]
            self._cal_tables = cal.build_cal_tables(view, inputs, self._freqs, self._timestamps,
                                                    self.dump_period, products, explicit,
                                                    dump_targets, self._gaincal_flux)
        return self._cal_tables

    def _cal_view(self, stream: str | None = None):
        from ..telstate import TelescopeState

        if stream is None:
            stream = "cal"
            archived = _plain(self._view.get("sdp_archived_streams")) or []
            for s in archived:
                if _plain(self._view.get(f"{s}_stream_type")) == "sdp.cal":
                    stream = s
                    break
        cb = self.capture_block_id
        prefixes = [f"{cb}_{stream}_", f"{stream}_", f"{cb}_", ""]
        base = self._view  # reopens the telstate if needed
        return TelescopeState(prefixes=prefixes, base=base)

    def _correction(self, stored: StoredArrays, tables: cal.CalTables) -> da.Array:
        import dask

        from .chunks import _array_from_tasks, _sizes

        tables_d = dask.delayed(tables, pure=True)
        n_in = len(self._input_indices()[0])
        name = f"karoo-cal-{dask.base.tokenize(tables, stored.time_bounds, stored.chan_bounds)}"
        tasks = {}
        tb, fb = stored.time_bounds, stored.chan_bounds
        for i in range(len(tb) - 1):
            for j in range(len(fb) - 1):
                tasks[(name, i, j, 0)] = (_correction_block, tables_d.key, int(tb[i]),
                                          int(tb[i + 1]), int(fb[j]), int(fb[j + 1]))
        return _array_from_tasks(name, tasks, (_sizes(tb), _sizes(fb), (n_in,)), np.complex64,
                                 [tables_d])

    def _full_arrays(self, applycal: bool) -> dict[str, da.Array]:
        """Unselected (T, F, B) vis, flag bits and weights; corrected if `applycal`.

        Built once per calibration (selections only index them).
        """
        key = (applycal, self._applycal if applycal else None)
        cached = self.__dict__.setdefault("_full_cache", {})
        if key not in cached:
            cached[key] = self._build_full_arrays(applycal)
        return cached[key]

    def _build_full_arrays(self, applycal: bool) -> dict[str, da.Array]:
        stored = self._stored_arrays()
        arrays = stored.arrays
        vis, flags_raw = arrays["correlator_data"], arrays["flags"]
        weights = self._raw_weights(arrays)
        tables = self._cal() if applycal else None
        if tables is None:
            return {"vis": vis, "flags": flags_raw, "weights": weights}
        corr = self._correction(stored, tables)
        _, in1, in2 = self._input_indices()
        i1 = da.from_array(in1, chunks=-1)
        i2 = da.from_array(in2, chunks=-1)

        def apply(func, x, dtype):
            return da.blockwise(func, "tfb", x, "tfb", corr, "tfi", i1, "b", i2, "b",
                                dtype=dtype, concatenate=True)

        return {"vis": apply(cal.apply_vis, vis, np.complex64),
                "flags": apply(cal.apply_flags, flags_raw, np.uint8),
                "weights": apply(cal.apply_weights, weights, np.float32)}

    def _selection(self) -> tuple:
        return (_index(self._time_keep), _index(self._freq_keep), _index(self._corrprod_keep))

    def _lazy(self, kind: str, full: da.Array) -> LazyArray:
        # Calibrated data always go through the Dask graph; plain reads may go direct.
        direct = None if self._applycal[0] else (self, kind)
        return LazyArray(full, self._selection(), kind, direct)

    @property
    def vis(self) -> LazyArray:
        """Complex64 visibilities of the selection (calibrated when opened with applycal)."""
        return self._lazy("vis", self._full_arrays(bool(self._applycal[0]))["vis"])

    @property
    def weights(self) -> LazyArray:
        """Float32 weights: the stored uint8 x weights_channel, power-scaled if needed."""
        return self._lazy("weights", self._full_arrays(bool(self._applycal[0]))["weights"])

    @property
    def raw_flags(self) -> LazyArray:
        """The uint8 flag bits of the selection."""
        return self._lazy("raw_flags", self._full_arrays(bool(self._applycal[0]))["flags"])

    @property
    def flags(self) -> LazyArray:
        """Bool flags: any of the selected flag bits set (``select(flags=...)``)."""
        full = self._full_arrays(bool(self._applycal[0]))["flags"]
        mask = np.uint8(self._flag_mask)
        return self._lazy("flags", da.map_blocks(_flag_bool, full, mask, dtype=bool))

    def _read_direct(self, kinds, dumps: range, chans: range, corrprods, outputs) -> None:
        from .direct import read_into

        power_scale = None
        if "weights" in kinds and self.need_weights_power_scale:
            power_scale = self._power_scale_indices()
        read_into(self._stored_arrays(), kinds, dumps, chans, corrprods, outputs,
                  self._flag_mask, power_scale)

    # --- views -------------------------------------------------------------------------------

    def _baseline_layout(self):
        from ..ms.layout import MSLayout

        meta = self._ms_input(include_autos=None)
        return meta, MSLayout.from_input(meta)

    def to_xarray(self) -> dict[int, object]:
        """One xarray Dataset per selected scan, in the spirit of MSv4.

        Returns
        -------
        dict of int to xarray.Dataset
            Keyed by scan index; each has ``VISIBILITY`` (complex64), ``FLAG`` (bool) and
            ``WEIGHT`` (float32) over ``(time, baseline_id, frequency, polarization)`` and
            ``UVW`` over ``(time, baseline_id, uvw_label)``, with coordinates ``time`` (UNIX s),
            ``frequency`` (Hz), ``polarization`` (XX, XY, YX, YY), ``baseline_antenna1_name`` /
            ``baseline_antenna2_name`` and attributes for the field, scan and intent. Products
            the correlator did not make are flagged with zero weight.
        """
        import xarray as xr

        meta, layout = self._baseline_layout()
        index = layout.corr_index.ravel()
        absent = index < 0
        take = np.where(absent, 0, index)
        nbl, npol = layout.corr_index.shape
        pol_names = [{"h": "X", "v": "Y"}[a] + {"h": "X", "v": "Y"}[b] for a, b in layout.pol_pairs]
        names = list(meta.antenna_names)
        uvw_hook = meta.antenna_uvw
        out = {}
        for s, state, target in self.scans():
            dumps = self.dumps
            vis = self.vis.dask[:, :, take]
            flags = self.flags.dask[:, :, take]
            weights = self.weights.dask[:, :, take]
            if absent.any():
                flags = da.where(absent, True, flags)
                weights = da.where(absent, np.float32(0), weights)
                vis = da.where(absent, np.complex64(0), vis)
            if layout.corr_conj.any():
                vis = da.where(layout.corr_conj.ravel(), da.conj(vis), vis)
            shape = (*vis.shape[:2], nbl, npol)

            def arrange(x, shape=shape):
                return x.reshape(shape).transpose(0, 2, 1, 3)

            tindex = self._target_index[dumps]
            ant_uvw = uvw_hook(self._timestamps[dumps], _meta_target(tindex, meta, self))
            uvw = ant_uvw[:, layout.ant1] - ant_uvw[:, layout.ant2]
            dims = ("time", "baseline_id", "frequency", "polarization")
            out[s] = xr.Dataset(
                {"VISIBILITY": (dims, arrange(vis)), "FLAG": (dims, arrange(flags)),
                 "WEIGHT": (dims, arrange(weights)),
                 "UVW": (("time", "baseline_id", "uvw_label"), uvw)},
                coords={"time": self.timestamps, "frequency": self.freqs,
                        "polarization": pol_names, "uvw_label": ["u", "v", "w"],
                        "baseline_id": np.arange(nbl),
                        "baseline_antenna1_name": ("baseline_id", [names[i] for i in layout.ant1]),
                        "baseline_antenna2_name": ("baseline_id", [names[i] for i in layout.ant2])},
                attrs={"scan_number": s + 1, "scan_state": state,
                       "field_name": target.name if target is not None else "",
                       "intents": _intent(target), "capture_block_id": self.capture_block_id,
                       "stream_name": self.stream_name, "integration_time": self.dump_period,
                       "channel_width": self.channel_width},
            )
        return out

    def _ms_input(self, include_autos: bool | None = None) -> MSInput:
        # karoo.ms needs python-casacore: imported only when exporting
        from ..ms.layout import MSInput, Scan, Target

        dumps = self.dumps
        if not len(dumps) or not self._freq_keep.any() or not self._corrprod_keep.any():
            raise ValueError("the selection is empty: nothing to export")
        ants = self.ants
        used_targets = sorted({int(t) for t in self._target_index[dumps] if t >= 0})
        targets = [Target(self.catalogue[t].name, self.catalogue[t].ra, self.catalogue[t].dec)
                   for t in used_targets]
        number = {t: k for k, t in enumerate(used_targets)}
        scans = []
        scan_ids = self._scan_index[dumps]
        start = 0
        for k in range(1, len(dumps) + 1):
            if k == len(dumps) or scan_ids[k] != scan_ids[start]:
                target = self._target_index[dumps[start]]
                if target < 0:
                    raise ValueError("dumps without a target (no cbf_target sensor)")
                scans.append(Scan(start, k, number[int(target)],
                                  _intent(self.catalogue[target])))
                start = k
        cp = self.corr_products
        if include_autos is None:
            include_autos = any(a[:-1] == b[:-1] for a, b in cp)
        ref = self.ref_ant
        uvw = self.antenna_uvw(ants)
        hook = AntennaUVW(uvw.enu, tuple(t.ra for t in targets), tuple(t.dec for t in targets),
                          ref.latitude, ref.longitude)
        return MSInput(
            antenna_names=[a.name for a in ants],
            antenna_positions=np.array([a.ecef for a in ants]),
            channel_freqs=self.freqs, channel_width=self.channel_width,
            corr_products=[tuple(p) for p in cp], targets=targets, scans=scans,
            timestamps=self.timestamps, dump_period=self.dump_period,
            dish_diameters=[a.diameter or 13.5 for a in ants], antenna_uvw=hook,
            include_autos=include_autos, observer=self.observer, project=self.experiment_id,
            history=(f"karoo.open({self.name!r}) {self.capture_block_id}_{self.stream_name}",),
        )

    def export_source(self, applycal=None, *, into: str = "CORRECTED_DATA") -> ExportSource:
        """What the MS exporter needs for the current selection.

        Parameters
        ----------
        applycal
            Cal products to apply (as for :func:`karoo.open`); None uses the dataset's own.
        into
            ``'CORRECTED_DATA'``: DATA stays raw and the calibrated visibilities and weights go
            to CORRECTED_DATA; ``'DATA'``: DATA (and the weights) are calibrated.
        """
        from ..ms.export import ExportSource

        saved = self._applycal, self._cal_tables
        if applycal is not None:
            self._applycal, self._cal_tables = cal.parse_applycal(applycal), None
        try:
            meta = self._ms_input()
            sel = self._selection()
            raw = self._full_arrays(False)
            mask = np.uint8(self._flag_mask)

            def selected(x):
                return LazyArray(x, sel, "").dask

            flags = selected(da.map_blocks(np.bitwise_and, raw["flags"], mask, dtype=np.uint8))
            source = ExportSource(meta, selected(raw["vis"]), flags, selected(raw["weights"]))
            if self._applycal[0]:
                corrected = self._full_arrays(True)
                cflags = selected(da.map_blocks(np.bitwise_and, corrected["flags"],
                                                mask | np.uint8(flag_bits.POSTPROC),
                                                dtype=np.uint8))
                if into.upper() == "DATA":
                    source = ExportSource(meta, selected(corrected["vis"]), cflags,
                                          selected(corrected["weights"]))
                else:
                    source.corrected = selected(corrected["vis"])
                    source.calibrated_weights = selected(corrected["weights"])
                    source.flags = cflags
            return source
        finally:
            if applycal is not None:
                self._applycal, self._cal_tables = saved

    def __repr__(self) -> str:
        return (f"<karoo DataSet {self.capture_block_id}_{self.stream_name} shape={self.shape} "
                f"from {self.name}>")

    def __str__(self) -> str:
        from .summary import summary

        return summary(self)


def _meta_target(tindex: np.ndarray, meta, ds: DataSet) -> np.ndarray:
    names = [t.name for t in meta.targets]
    return np.array([names.index(ds.catalogue[t].name) for t in tindex])


def _intent(target) -> str:
    tags = set(getattr(target, "tags", ()) or ())
    intents = []
    if "bpcal" in tags:
        intents.append("CALIBRATE_BANDPASS,CALIBRATE_FLUX")
    if "gaincal" in tags:
        intents.append("CALIBRATE_PHASE,CALIBRATE_AMPLI")
    if "delaycal" in tags and not intents:
        intents.append("CALIBRATE_DELAY")
    return ",".join(intents) or "TARGET"


def _flag_bool(flags: np.ndarray, mask: np.uint8) -> np.ndarray:
    return (flags & mask) != 0


def _correction_block(tables: cal.CalTables, t0: int, t1: int, f0: int, f1: int) -> np.ndarray:
    return tables.correction(t0, t1, f0, f1)


def _unix_time(value) -> float:
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if hasattr(value, "secs"):  # katpoint.Timestamp
        return float(value.secs)
    text = str(value).strip().replace(" ", "T")
    when = datetime.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _target_names(description: str) -> tuple[str, ...]:
    """Name and aliases of a katpoint description (``'name | alias1 | alias2, radec, ...'``)."""
    return tuple(n.strip() for n in str(description).split(",")[0].split("|") if n.strip())


def open(source, chunk_store=None, *, applycal=None, flags="all", time_offset: float = 0.0,
         gaincal_flux: Mapping[str, float] | None = MappingProxyType({}), **options
         ) -> DataSet:
    """Open a capture-block stream for reading, katdal style.

    Parameters
    ----------
    source
        RDB path, ``s3://``/``http(s)://`` URL of an RDB, ``redis://host:port`` URL of a live
        telstate, or a :class:`karoo.telstate.TelescopeState`.
    chunk_store
        A :class:`karoo.chunkstore.ChunkStore` or store URL; default: found from telstate
        (``<cbid>_<stream>_chunk_store_url``, ``<stream>_s3_endpoint_url``) or from the RDB's
        location (``<store>/<cbid>/<cbid>_<stream>.rdb``). False opens the metadata only.
    applycal
        Cal products to apply on the fly: ``'default'`` (K, B, G), ``'all'`` (also KCROSS), or a
        comma list such as ``'K,B,G'``.
    flags
        Flag names that count in ``DataSet.flags`` (default all).
    time_offset
        Seconds added to the timestamps.
    gaincal_flux
        Flux densities (Jy) of gain calibrators, by target name, overriding the cal pipeline's
        ``measured_flux``; G solutions on such a target are divided by √flux (katdal's rule).
        None turns flux scaling off.
    **options
        ``capture_block_id``, ``stream_name``, ``s3_endpoint_url``, ``access_key``,
        ``secret_key``, ``token``, ``retries``, ``timeout``.

    Returns
    -------
    DataSet

    Raises
    ------
    DataSourceNotFound
        If the source, its keys or its store cannot be found, with the reason.
    """
    opened = open_source(source, chunk_store, **options)
    return DataSet(opened, applycal=applycal, flags=flags, time_offset=time_offset,
                   gaincal_flux=gaincal_flux)
