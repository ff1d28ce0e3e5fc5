"""A scripted observation: scans, the telstate metadata a telescope writes, and the dumps.

`Simulator` ties the array, correlator, sky, instrument, noise, RFI and heap-loss models to
an `Observation` (a list of `Scan`s). It writes the CBF and CAM metadata to any object with
katsdptelstate's API (``add(key, value, ts=..., immutable=...)``) and yields `Dump`s: the
int32 ``xeng_raw`` array, the ADC timestamp, the lost-heap mask and the RFI truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .array import Array
from .astro import apparent_enu, enu_to_azel
from .model import CorrelatorConfig, InstrumentModel, NoiseModel, VisibilityModel
from .rfi import HeapLossModel, RfiModel
from .sky import BPCAL, GAINCAL, TARGET, SkyModel, Target, default_sky

# 2024-06-01 01:40 UTC: PKS1934-638 and the simulated fields are well up at MeerKAT
DEFAULT_START_TIME = 1717206000.0
ACTIVITIES = ("track", "slew", "scan", "stop")


@dataclass(frozen=True)
class Scan:
    """One step of the script: `activity` on `target` (a description) for `duration` s."""

    activity: str
    target: str
    duration: float
    label: str = ""

    def __post_init__(self) -> None:
        if self.activity not in ACTIVITIES:
            raise ValueError(f"activity must be one of {ACTIVITIES}, not {self.activity!r}")
        if self.duration <= 0:
            raise ValueError("scan duration must be positive")
        Target.parse(self.target)  # fail early on a bad description

    @property
    def on_source(self) -> bool:
        return self.activity in ("track", "scan")


def default_script(
    bpcal_s: float = 60.0, gaincal_s: float = 30.0, target_s: float = 120.0, slew_s: float = 10.0
) -> list[Scan]:
    """bpcal/delaycal track, gaincal track, target track, gaincal track, with slews between."""
    steps = [
        (BPCAL, bpcal_s, "bandpass"),
        (GAINCAL, gaincal_s, "gain"),
        (TARGET, target_s, "target"),
        (GAINCAL, gaincal_s, "gain"),
    ]
    scans = []
    for target, duration, label in steps:
        scans.append(Scan("slew", target.description, slew_s, label))
        scans.append(Scan("track", target.description, duration, label))
    return scans


@dataclass(frozen=True)
class Observation:
    """Scans run back to back from `start_time` (UNIX s)."""

    scans: tuple[Scan, ...]
    start_time: float = DEFAULT_START_TIME

    def __post_init__(self) -> None:
        if not self.scans:
            raise ValueError("an observation needs at least one scan")

    @property
    def scan_starts(self) -> np.ndarray:
        durations = np.array([s.duration for s in self.scans])
        return self.start_time + np.concatenate([[0.0], np.cumsum(durations)[:-1]])

    @property
    def end_time(self) -> float:
        return self.start_time + sum(s.duration for s in self.scans)

    def scan_index(self, time: float) -> int:
        """Index of the scan running at `time` (clamped to the first/last scan)."""
        i = int(np.searchsorted(self.scan_starts, time, side="right")) - 1
        return min(max(i, 0), len(self.scans) - 1)


@dataclass
class Dump:
    """One correlator dump.

    Attributes
    ----------
    index
        Dump number from the start of the observation.
    timestamp
        ADC sample count since sync of the start of the integration (SPEAD ``timestamp``).
    time
        UNIX time of the dump centre.
    data
        int32 (n_chans, n_bls, 2), the ``xeng_raw`` of the whole band.
    lost
        bool (n_substreams,): heaps the sender should drop.
    rfi_mask
        bool (n_chans, n_bls): where RFI was injected.
    n_chans_per_substream
        Channels per heap.
    """

    index: int
    timestamp: int
    time: float
    data: np.ndarray
    lost: np.ndarray
    rfi_mask: np.ndarray
    n_chans_per_substream: int

    def heap(self, substream: int) -> tuple[int, np.ndarray]:
        """(first channel = SPEAD ``frequency``, contiguous ``xeng_raw`` view) of a substream."""
        start = substream * self.n_chans_per_substream
        return start, self.data[start : start + self.n_chans_per_substream]


@dataclass
class Simulator:
    """A simulated correlator observing a script.

    Parameters
    ----------
    array, config, observation
        Antennas, CBF configuration and the script.
    sky
        Point sources (default: calibrators plus a few field sources).
    instrument
        Injected truth (default: random, seeded by `seed`).
    noise
        Thermal noise model.
    rfi
        RFI events; True for `RfiModel.random`, None for no RFI.
    heap_loss
        Heap-loss model (default: none lost).
    sync_time
        CBF sync epoch (UNIX s); default: an integer second an hour before the start.
    seed
        Seeds the instrument, noise and RFI.
    """

    array: Array
    config: CorrelatorConfig
    observation: Observation
    sky: SkyModel | None = None
    instrument: InstrumentModel | None = None
    noise: NoiseModel = field(default_factory=NoiseModel)
    rfi: RfiModel | bool | None = True
    heap_loss: HeapLossModel = field(default_factory=HeapLossModel)
    sync_time: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sky is None:
            self.sky = default_sky(self.seed)
        if self.instrument is None:
            self.instrument = InstrumentModel.random(
                self.array, self.config, self.seed, epoch=self.observation.start_time
            )
        if self.sync_time is None:
            self.sync_time = float(math.floor(self.observation.start_time) - 3600)
        adc = self.config.band.adc_sample_rate
        ticks = self.config.ticks_per_dump
        self.first_timestamp = int(
            math.ceil((self.observation.start_time - self.sync_time) * adc / ticks) * ticks
        )
        duration = self.observation.end_time - self.sync_time - self.first_timestamp / adc
        self.n_dumps = max(0, int(duration * adc // ticks))
        if self.rfi is True:
            self.rfi = RfiModel.random(
                self.array, self.config.channel_freqs, self.n_dumps, seed=self.seed
            )
        self.model = VisibilityModel(
            self.array, self.config, self.sky, self.instrument, self.noise, seed=self.seed
        )
        self.lost = self.heap_loss.lost(self.n_dumps, self.config.n_substreams)
        self._targets = [Target.parse(s.target) for s in self.observation.scans]

    @classmethod
    def create(
        cls,
        n_ants: int = 4,
        n_chans: int = 1024,
        script: list[Scan] | None = None,
        start_time: float = DEFAULT_START_TIME,
        **kwargs,
    ) -> Simulator:
        """Convenience: MeerKAT's first `n_ants` antennas, L-band, `n_chans` channels,
        `n_ants`-scaled substreams (16, doubled until >= 4 n_ants, as katcbfsim does)."""
        n_sub = 16
        while n_sub < 4 * n_ants and n_chans % (2 * n_sub) == 0:
            n_sub *= 2
        config = kwargs.pop("config", None) or CorrelatorConfig(n_chans=n_chans, n_substreams=n_sub)
        observation = Observation(tuple(script or default_script()), start_time)
        return cls(Array.meerkat(n_ants), config, observation, **kwargs)

    # --- time axis -----------------------------------------------------------------

    def dump_timestamp(self, index: int) -> int:
        """ADC timestamp (start of integration) of dump `index`."""
        return self.first_timestamp + index * self.config.ticks_per_dump

    def dump_time(self, index: int) -> float:
        """UNIX time of the centre of dump `index`."""
        ticks = self.dump_timestamp(index) + self.config.ticks_per_dump / 2
        return self.sync_time + ticks / self.config.band.adc_sample_rate

    @property
    def dump_times(self) -> np.ndarray:
        return np.array([self.dump_time(i) for i in range(self.n_dumps)])

    # --- dumps -----------------------------------------------------------------------

    def dump(self, index: int, out: np.ndarray | None = None) -> Dump:
        """Generate dump `index` (0 <= index < n_dumps)."""
        if not 0 <= index < self.n_dumps:
            raise IndexError(f"dump {index} outside 0..{self.n_dumps - 1}")
        time = self.dump_time(index)
        scan = self.observation.scan_index(time)
        target = self._targets[scan]
        rfi = self.rfi.dump_terms(index) if isinstance(self.rfi, RfiModel) else None
        data, mask = self.model.predict(
            time,
            (target.ra, target.dec),
            self.observation.scans[scan].on_source,
            dump_index=index,
            rfi=rfi,
            out=out,
        )
        return Dump(
            index,
            self.dump_timestamp(index),
            time,
            data,
            self.lost[index].copy(),
            mask,
            self.config.n_chans_per_substream,
        )

    def dumps(self, start: int = 0, stop: int | None = None) -> Iterator[Dump]:
        """Yield dumps `start` .. `stop` - 1 (default: the whole observation)."""
        for index in range(start, self.n_dumps if stop is None else min(stop, self.n_dumps)):
            yield self.dump(index)

    # --- truth files -----------------------------------------------------------------

    def write_truth(self, path) -> None:
        """Injected gains (at every dump centre), delays, bandpasses and the sources' flux
        densities per channel, to an ``.npz``."""
        self.instrument.write_npz(path, self.dump_times, self.sky)

    def write_rfi_mask(self, path) -> None:
        """RFI truth mask (time, chan, corrprod) and event table, to an ``.npz``."""
        if not isinstance(self.rfi, RfiModel):
            raise ValueError("this simulation has no RFI")
        self.rfi.write_npz(path, self.n_dumps)

    # --- telstate --------------------------------------------------------------------

    def cbf_attributes(self) -> dict[str, dict[str, object]]:
        """CBF metadata as {telstate prefix: {key: value}} at the levels a real CBF uses
        (instrument, antenna-channelised-voltage, baseline-correlation-products). The 11
        keys ingest needs are also all repeated on the baseline-correlation-products
        stream, so a reader that looks only there finds them."""
        cfg = self.config
        instrument = {
            "sync_time": float(self.sync_time),
            "scale_factor_timestamp": float(cfg.band.adc_sample_rate),
        }
        acv = {
            "instrument_dev_name": cfg.instrument,
            "n_chans": cfg.n_chans,
            "bandwidth": float(cfg.band.bandwidth),
            "center_freq": float(cfg.band.center_freq),
            "input_labels": self.array.input_labels,
            "ticks_between_spectra": cfg.ticks_between_spectra,
            "adc_sample_rate": float(cfg.band.adc_sample_rate),
            "n_inputs": len(self.array.input_labels),
        }
        bcp = {
            "src_streams": [cfg.acv_stream],
            "n_chans": cfg.n_chans,
            "n_chans_per_substream": cfg.n_chans_per_substream,
            "n_accs": cfg.n_accs,
            "int_time": float(cfg.dump_period),
            "bls_ordering": self.model.products.labels,
            "n_bls": self.model.products.n_bls,
            "n_xengs": cfg.n_substreams,
        }
        for key in ("bandwidth", "center_freq", "input_labels", "ticks_between_spectra"):
            bcp[key] = acv[key]
        bcp.update(instrument)
        return {cfg.instrument: instrument, cfg.acv_stream: acv, cfg.bcp_stream: bcp}

    def write_telstate(
        self,
        ts,
        capture_block_id: str | None = None,
        sensor_period: float = 10.0,
        weather_period: float = 60.0,
        capture_block: bool = True,
    ) -> None:
        """Write CBF attributes and CAM sensors, timestamped to follow the script.

        Parameters
        ----------
        ts
            Telescope state (katsdptelstate API: ``add(key, value, ts=None,
            immutable=False)``).
        capture_block_id
            Prefix of the capture-block sensors (``<cbid>_obs_activity`` etc.); default
            the integer start time, as SDP names capture blocks.
        sensor_period
            Sampling interval (s) of the antenna position sensors.
        weather_period
            Sampling interval (s) of the ``anc_*`` weather sensors.
        capture_block
            Whether to write the capture block's sensors too (see `write_capture_block`);
            a daemon that learns the capture block id later writes them then.
        """
        obs = self.observation
        cbid = capture_block_id or str(int(obs.start_time))
        for prefix, attrs in self.cbf_attributes().items():
            for key, value in attrs.items():
                ts.add(f"{prefix}_{key}", value, immutable=True)
        names = self.array.names
        band = self.config.band
        n_chans = self.config.n_chans
        chans = f"{n_chans // 1024}k" if n_chans % 1024 == 0 else str(n_chans)
        product = f"c{band.bandwidth / 1e6:.0f}M{chans}"  # e.g. c856M4k
        ts.add("sub_pool_resources", ",".join(["cbf_1", "sdp_1", *names]), immutable=True)
        ts.add("sub_band", band.name, immutable=True)
        ts.add("sub_product", product, immutable=True)
        for ant in self.array.antennas:
            ts.add(f"{ant.name}_observer", ant.description, immutable=True)
        start = obs.start_time
        for ant in names:
            ts.add(f"{ant}_data_suspect", False, ts=start)
        for scan, t0, target in zip(obs.scans, obs.scan_starts, self._targets, strict=True):
            desc = target.description
            ts.add("cbf_target", desc, ts=t0)
            for ant in names:
                ts.add(f"{ant}_target", desc, ts=t0)
                ts.add(f"{ant}_activity", scan.activity, ts=t0)
        if capture_block:
            self.write_capture_block(ts, cbid)
        end = obs.end_time
        for ant in names:
            ts.add(f"{ant}_activity", "stop", ts=end)
        self._write_pointing(ts, np.arange(start, end + 1e-6, sensor_period))
        self._write_weather(ts, np.arange(start, end + 1e-6, weather_period))

    def write_capture_block(self, ts, capture_block_id: str) -> None:
        """The capture block's observation sensors, as CAM writes them for each capture block:
        ``<cbid>_obs_params``, ``_obs_activity``, ``_obs_label`` and ``_obs_script_log``."""
        obs = self.observation
        cbid = capture_block_id
        ts.add(
            f"{cbid}_obs_params",
            {
                "observer": "karoo.sim",
                "description": "Simulated calibrator and target observation",
                "experiment_id": cbid,
                "ants": ",".join(self.array.names),
                "sb_id_code": f"sim-{cbid}",
            },
            immutable=True,
        )
        ts.add(f"{cbid}_obs_script_log", "Simulated observation started", ts=obs.start_time)
        for scan, t0, target in zip(obs.scans, obs.scan_starts, self._targets, strict=True):
            ts.add(f"{cbid}_obs_activity", scan.activity, ts=t0)
            if scan.label:
                ts.add(f"{cbid}_obs_label", scan.label, ts=t0)
            verb = {"slew": "Slewing to", "track": "Tracking", "scan": "Scanning"}.get(
                scan.activity, "Stopped at"
            )
            ts.add(f"{cbid}_obs_script_log", f"{verb} {target.name} for {scan.duration:g} s", ts=t0)
        ts.add(f"{cbid}_obs_activity", "stop", ts=obs.end_time)
        ts.add(f"{cbid}_obs_script_log", "Simulated observation ended", ts=obs.end_time)

    def _write_pointing(self, ts, times: np.ndarray) -> None:
        # Dishes point at the scan target (no slew trajectory); all dishes share the
        # array-reference az/el, which is within arcseconds of each dish's own.
        obs = self.observation
        idx = np.array([obs.scan_index(t) for t in times])
        ra = np.array([self._targets[i].ra for i in idx])
        dec = np.array([self._targets[i].dec for i in idx])
        az, el = enu_to_azel(
            apparent_enu(ra, dec, times, self.array.latitude, self.array.longitude)
        )
        az_deg = (np.degrees(az) + 180.0) % 360.0 - 180.0  # CAM reports -180..180
        for ant in self.array.names:
            for t, a, e in zip(times, az_deg, np.degrees(el), strict=True):
                ts.add(f"{ant}_pos_actual_scan_azim", float(a), ts=float(t))
                ts.add(f"{ant}_pos_actual_scan_elev", float(e), ts=float(t))

    def _write_weather(self, ts, times: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed)
        for t in times:
            t = float(t)
            ts.add("anc_air_temperature", 15.0 + rng.normal(0, 0.2), ts=t)
            ts.add("anc_air_pressure", 897.0 + rng.normal(0, 0.1), ts=t)
            ts.add("anc_air_relative_humidity", 30.0 + rng.normal(0, 0.5), ts=t)
            ts.add("anc_mean_wind_speed", abs(3.0 + rng.normal(0, 0.5)), ts=t)
            ts.add("anc_wind_direction", float(rng.uniform(0, 360)), ts=t)
