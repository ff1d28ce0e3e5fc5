"""Correlator configuration, instrumental corruptions and the per-dump visibility model.

Conventions (those of katsdpcal, see its reference):

* visibility of product (p, q): ``V_pq = J_p conj(J_q) * sky_pq`` with the per-input
  response ``J_p(t, f) = g_p(t) B_p(f) exp(+2 pi i K_p f)`` (gain, bandpass, delay in s, f the
  absolute sky frequency);
* the correlator tracks the phase centre, so a source in direction s contributes
  ``S(f) beam(f) exp(-2 pi i f b_pq . (s - s0) / c)`` with ``b_pq = x_q - x_p`` (antenna 2
  minus antenna 1, the sign of katdal's uvw);
* unpolarised sources appear only in parallel-hand (hh, vv) products;
* correlator units: ``int32 = round(V [Jy] * scale * n_accs)``; ingest divides by n_accs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

from .array import POLS, Array, CorrProducts
from .astro import SPEED_OF_LIGHT, apparent_enu
from .sky import SkyModel

INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class Band:
    """A receiver band as digitised: ADC rate, bandwidth, centre frequency (Hz), name."""

    name: str
    adc_sample_rate: float
    bandwidth: float
    center_freq: float


L_BAND = Band("l", 1712e6, 856e6, 1284e6)
UHF_BAND = Band("u", 1088e6, 544e6, 816e6)


@dataclass(frozen=True)
class CorrelatorConfig:
    """What the CBF is configured to produce.

    Parameters
    ----------
    n_chans
        Channels across the band (1024, 4096 or 32768 on MeerKAT).
    band
        Receiver band.
    int_time
        Requested dump period (s); the real one is quantised to whole 256-spectrum blocks.
    n_substreams
        X-engine substreams (heaps per dump); must divide `n_chans`.
    instrument
        CBF instrument name, prefix of the stream names (``i0``).
    """

    n_chans: int = 4096
    band: Band = L_BAND
    int_time: float = 0.5
    n_substreams: int = 16
    instrument: str = "i0"

    def __post_init__(self) -> None:
        if self.n_chans <= 0 or self.n_substreams <= 0 or self.n_chans % self.n_substreams:
            raise ValueError(
                f"n_substreams ({self.n_substreams}) must divide n_chans ({self.n_chans})"
            )
        if self.int_time <= 0:
            raise ValueError("int_time must be positive")

    @property
    def ticks_between_spectra(self) -> int:
        """ADC samples per spectrum (2 * n_chans for a real-sampled Nyquist band)."""
        return round(self.band.adc_sample_rate / self.band.bandwidth * self.n_chans)

    @property
    def n_accs(self) -> int:
        """Spectra accumulated per dump, a multiple of 256."""
        spectra = self.int_time * self.band.adc_sample_rate / self.ticks_between_spectra
        return max(1, round(spectra / 256)) * 256

    @property
    def ticks_per_dump(self) -> int:
        return self.n_accs * self.ticks_between_spectra

    @property
    def dump_period(self) -> float:
        """The real dump period (s), telstate ``int_time``."""
        return self.ticks_per_dump / self.band.adc_sample_rate

    @property
    def n_chans_per_substream(self) -> int:
        return self.n_chans // self.n_substreams

    @property
    def channel_width(self) -> float:
        return self.band.bandwidth / self.n_chans

    @property
    def channel_freqs(self) -> np.ndarray:
        """Channel centre frequencies; `center_freq` is that of channel n_chans // 2."""
        return self.band.center_freq + (np.arange(self.n_chans) - self.n_chans // 2) * (
            self.channel_width
        )

    @property
    def acv_stream(self) -> str:
        return f"{self.instrument}_antenna_channelised_voltage"

    @property
    def bcp_stream(self) -> str:
        return f"{self.instrument}_baseline_correlation_products"


@dataclass
class InstrumentModel:
    """The injected instrumental truth, per input (antenna and polarisation).

    Attributes
    ----------
    input_labels
        ``['m000h', 'm000v', ...]``.
    delays
        Delay K per input, seconds, shape (n_inputs,).
    bandpass
        B per channel and input, complex, shape (n_chans, n_inputs).
    gain0
        Complex gain at the reference time, shape (n_inputs,).
    amp_drift, phase_drift
        Slow variation: rows of (amplitude, period s, phase) sinusoids per input, shape
        (n_inputs, n_terms, 3); relative amplitude and radians of phase respectively.
    epoch
        UNIX time where the drift terms have their phase origin.
    """

    input_labels: list[str]
    freqs: np.ndarray
    delays: np.ndarray
    bandpass: np.ndarray
    gain0: np.ndarray
    amp_drift: np.ndarray
    phase_drift: np.ndarray
    epoch: float = 0.0

    @classmethod
    def random(
        cls,
        array: Array,
        config: CorrelatorConfig,
        seed: int = 0,
        epoch: float = 0.0,
        delay_range: float = 5e-9,
        gain_amp_range: tuple[float, float] = (0.8, 1.2),
        drift_amplitude: float = 0.03,
        drift_phase: float = math.radians(15.0),
        edge_fraction: float = 0.04,
    ) -> InstrumentModel:
        """Random but realistic corruptions.

        Delays uniform in +-`delay_range`; bandpass = raised-cosine roll-off over
        `edge_fraction` of the band at each edge times a smooth ripple (few %, few deg);
        gains with random phase, amplitudes in `gain_amp_range`, drifting slowly (periods
        10-60 min) by up to `drift_amplitude` (relative) and `drift_phase` (radians).
        """
        rng = np.random.default_rng(seed)
        labels = array.input_labels
        n_inputs = len(labels)
        freqs = config.channel_freqs
        x = (freqs - freqs[0]) / (freqs[-1] - freqs[0])  # 0..1 across the band
        edge = np.clip(np.minimum(x, 1.0 - x) / edge_fraction, 0.0, 1.0)
        rolloff = 0.05 + 0.95 * np.sin(0.5 * math.pi * edge) ** 2
        ripple_amp = np.ones((len(freqs), n_inputs))
        ripple_phase = np.zeros((len(freqs), n_inputs))
        for k in range(1, 4):
            a = rng.uniform(-0.03, 0.03, n_inputs) / k
            p = rng.uniform(-0.08, 0.08, n_inputs) / k
            ph = rng.uniform(0, 2 * math.pi, (2, n_inputs))
            ripple_amp += a * np.cos(2 * math.pi * k * x[:, None] + ph[0])
            ripple_phase += p * np.cos(2 * math.pi * k * x[:, None] + ph[1])
        bandpass = (rolloff[:, None] * ripple_amp * np.exp(1j * ripple_phase)).astype(np.complex64)
        delays = rng.uniform(-delay_range, delay_range, n_inputs)
        gain0 = rng.uniform(*gain_amp_range, n_inputs) * np.exp(
            1j * rng.uniform(-math.pi, math.pi, n_inputs)
        )

        def drift(scale: float) -> np.ndarray:
            terms = np.empty((n_inputs, 3, 3))
            terms[..., 0] = rng.uniform(0, scale / 3, (n_inputs, 3))
            terms[..., 1] = rng.uniform(600.0, 3600.0, (n_inputs, 3))
            terms[..., 2] = rng.uniform(0, 2 * math.pi, (n_inputs, 3))
            return terms

        return cls(
            labels,
            freqs,
            delays,
            bandpass,
            gain0,
            drift(drift_amplitude),
            drift(drift_phase),
            epoch,
        )

    @classmethod
    def ideal(cls, array: Array, config: CorrelatorConfig) -> InstrumentModel:
        """Unit gains, flat bandpass, no delays."""
        n_inputs = len(array.input_labels)
        no_drift = np.zeros((n_inputs, 1, 3))
        no_drift[..., 1] = 1.0
        return cls(
            array.input_labels,
            config.channel_freqs,
            np.zeros(n_inputs),
            np.ones((config.n_chans, n_inputs), np.complex64),
            np.ones(n_inputs, np.complex128),
            no_drift,
            no_drift.copy(),
        )

    @staticmethod
    def _sinusoids(terms: np.ndarray, t: np.ndarray) -> np.ndarray:
        arg = 2 * math.pi * t[:, None, None] / terms[None, ..., 1] + terms[None, ..., 2]
        return np.sum(terms[None, ..., 0] * np.sin(arg), axis=-1)

    def gains(self, times: np.ndarray | float) -> np.ndarray:
        """Complex gain g(t) per input, shape (n_times, n_inputs)."""
        t = np.atleast_1d(np.asarray(times, np.float64)) - self.epoch
        amp = 1.0 + self._sinusoids(self.amp_drift, t)
        phase = self._sinusoids(self.phase_drift, t)
        return self.gain0[None, :] * amp * np.exp(1j * phase)

    def response(self, time: float) -> np.ndarray:
        """Total per-input response J = g B exp(2 pi i K f), shape (n_chans, n_inputs)."""
        delay = np.exp(2j * math.pi * self.freqs[:, None] * self.delays[None, :])
        return self.gains(time)[0] * self.bandpass * delay

    def write_npz(self, path, times: np.ndarray, sky: SkyModel | None = None) -> None:
        """Write the truth (delays, bandpass, gains at `times`) to an ``.npz`` file.

        With `sky`, also ``source_names`` and ``source_flux`` (n_sources, n_chans), the flux
        density (Jy) of every sky source at every channel (what a flux calibration measures).
        """
        extra = {}
        if sky is not None:
            extra = {"source_names": np.array([src.name for src in sky.sources]),
                     "source_flux": sky.flux(self.freqs).reshape(len(sky.sources), -1)}
        np.savez_compressed(
            path,
            input_labels=np.array(self.input_labels),
            freqs=self.freqs,
            delays=self.delays,
            bandpass=self.bandpass,
            times=np.asarray(times),
            gains=self.gains(times),
            **extra,
        )


@dataclass(frozen=True)
class NoiseModel:
    """Thermal noise.

    With `snr` None, radiometer noise: the complex noise on product (p, q) has standard
    deviation ``sqrt(P_p P_q / (dnu tau))`` with P the total power (SEFD + sources, times
    |J|^2). With `snr` set, the complex noise on every product is
    ``|J_p| |J_q| S_ref / snr`` where S_ref is the brightest source's flux at band centre,
    so a point source of flux S_ref at the phase centre is seen at that SNR per channel and
    dump. Autocorrelations get real-valued noise of the same standard deviation.
    """

    sefd: float = 420.0
    snr: float | None = None
    enabled: bool = True


@numba.njit(cache=True, inline="always")
def _hash(x: np.uint64) -> np.uint64:
    # splitmix64 finaliser: a counter-based generator, so each visibility's noise
    # depends only on (seed, dump, channel, product), whatever the thread layout
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _normal_table(bits: int = 16) -> np.ndarray:
    """Standard normal quantiles at (k + 0.5) / 2**bits, plus one guard entry."""
    from scipy.special import ndtri

    q = ndtri((np.arange(2**bits + 1) + 0.5) / 2**bits)
    q[-1] = q[-2]
    return q


# Inverse-CDF table: a 32-bit uniform picks an entry (16 bits) and interpolates (16 bits).
# Exact Box-Muller costs ~80 ns per sample here; this costs a few. The distribution is
# Gaussian to within the interpolation except that tails stop at 4.2 sigma.
_NORMAL = _normal_table()


@numba.njit(cache=True, inline="always")
def _normal(bits32: np.uint64, table: np.ndarray) -> float:
    k = np.int64(bits32 >> np.uint64(16))
    frac = np.float64(bits32 & np.uint64(0xFFFF)) * (1.0 / 65536.0)
    return table[k] + frac * (table[k + 1] - table[k])


@numba.njit(cache=True, inline="always")
def _quantise(value: float) -> np.int32:
    v = round(value)
    if v > 2147483647.0:
        v = 2147483647.0
    elif v < -2147483647.0:  # INT32_MIN is the missing-data marker: never produce it
        v = -2147483647.0
    return np.int32(v)


@numba.njit(parallel=True, nogil=True, cache=True)
def _vis_kernel(
    sources,
    response,
    sys_power,
    noise_q,
    noise_k,
    input1,
    input2,
    parallel,
    rfi_amp,
    rfi_bl,
    scale,
    seed,
    table,
    out,
    rfi_mask,
):
    n_src = sources.shape[0]
    n_chans = sources.shape[1]
    n_bls = input1.shape[0]
    n_rfi = rfi_amp.shape[0]
    for c in numba.prange(n_chans):
        base = np.uint64(seed) + np.uint64(c) * np.uint64(n_bls) * np.uint64(0x9E3779B97F4A7C15)
        for b in range(n_bls):
            i1 = input1[b]
            i2 = input2[b]
            v = 0j
            if parallel[b]:
                for s in range(n_src):
                    v += sources[s, c, i1] * np.conj(sources[s, c, i2])
            if i1 == i2:
                v += sys_power[c, i1]
            hit = False
            for e in range(n_rfi):
                a = rfi_amp[e, c]
                f = rfi_bl[e, b]
                if a != 0 and f != 0:
                    v += a * f * response[c, i1] * np.conj(response[c, i2])
                    hit = True
            rfi_mask[c, b] = hit
            if noise_k > 0:
                sigma = noise_k * math.sqrt(noise_q[c, i1] * noise_q[c, i2])
                h = _hash(base + np.uint64(b) * np.uint64(0x9E3779B97F4A7C15))
                n1 = _normal(h >> np.uint64(32), table)
                if i1 == i2:
                    v += sigma * n1
                else:
                    n2 = _normal(h & np.uint64(0xFFFFFFFF), table)
                    sigma *= 0.7071067811865476
                    v += complex(sigma * n1, sigma * n2)
            out[c, b, 0] = _quantise(v.real * scale)
            out[c, b, 1] = _quantise(v.imag * scale)


@dataclass
class VisibilityModel:
    """Predicts one dump of CBF output (int32) from sky, instrument, noise and RFI.

    Parameters
    ----------
    array, config, sky, instrument, noise
        The pieces of the model.
    scale
        Correlator units per Jy per accumulated spectrum. The default puts a 420 Jy
        system at about 25 units per spectrum, like an 8-bit F-engine output.
    seed
        Seed of the noise generator.
    """

    array: Array
    config: CorrelatorConfig
    sky: SkyModel
    instrument: InstrumentModel
    noise: NoiseModel = field(default_factory=NoiseModel)
    scale: float = 0.06
    seed: int = 0

    def __post_init__(self) -> None:
        self.products = CorrProducts.cbf(self.array)
        self._freqs = self.config.channel_freqs
        self._flux = self.sky.flux(self._freqs)  # (n_src, n_chans)
        centre_flux = self.sky.flux(np.array([self.config.band.center_freq]))
        self._ref_flux = float(np.max(centre_flux)) if centre_flux.size else 1.0

    @property
    def count_scale(self) -> float:
        """int32 units per Jy in one dump: ``scale * n_accs``."""
        return self.scale * self.config.n_accs

    def source_terms(
        self, time: float, phase_centre: tuple[float, float] | None, on_source: bool = True
    ) -> np.ndarray:
        """Per-source, per-input voltage-like terms E, shape (n_src, n_chans, n_inputs).

        ``V_pq = sum_s E_s,p conj(E_s,q)`` for parallel hands. Sources are attenuated by a
        Gaussian primary beam (FWHM 1.22 lambda / D) around the phase centre; with no phase
        centre or `on_source` False (slewing) they are left out.
        """
        response = self.instrument.response(time)
        n_inputs = response.shape[1]
        if phase_centre is None or not on_source or not self.sky.sources:
            return np.zeros((0, self.config.n_chans, n_inputs), np.complex128)
        lat, lon = self.array.latitude, self.array.longitude
        s0 = apparent_enu(*phase_centre, time, lat, lon)
        s = apparent_enu(self.sky.ra, self.sky.dec, time, lat, lon)  # (n_src, 3)
        # Path difference per antenna, relative to the phase centre
        path = (s - s0) @ self.array.enu.T  # (n_src, n_ants)
        sep = np.arccos(np.clip(s @ s0, -1.0, 1.0))
        wavelength = SPEED_OF_LIGHT / self._freqs
        fwhm = 1.22 * wavelength / self.array.antennas[0].diameter
        beam = np.exp(-4 * math.log(2) * (sep[:, None] / fwhm[None, :]) ** 2)
        # Sources far outside the primary beam contribute nothing: skip them
        keep = np.max(beam, axis=1) > 1e-9
        amp = np.sqrt(self._flux[keep] * beam[keep])  # (n_src, n_chans)
        phase = np.exp(2j * math.pi * path[keep, None, :] / wavelength[None, :, None])
        ant_of_input = np.arange(n_inputs) // len(POLS)
        return amp[:, :, None] * phase[:, :, ant_of_input] * response[None]

    def predict(
        self,
        time: float,
        phase_centre: tuple[float, float] | None,
        on_source: bool = True,
        dump_index: int = 0,
        rfi: tuple[np.ndarray, np.ndarray] | None = None,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One dump of CBF output.

        Parameters
        ----------
        time
            UNIX time of the dump centre.
        phase_centre
            J2000 (ra, dec) the correlator tracks, or None (no sources).
        on_source
            False while slewing: the dishes are not on the phase centre.
        dump_index
            Selects the noise realisation.
        rfi
            ``(amplitude (n_events, n_chans), baseline factor (n_events, n_bls))`` from
            :meth:`karoo.sim.rfi.RfiModel.dump_terms`, or None.
        out
            Optional int32 buffer of shape (n_chans, n_bls, 2) to fill.

        Returns
        -------
        data
            int32 array (n_chans, n_bls, 2): re/im, accumulated over n_accs spectra.
        rfi_mask
            bool array (n_chans, n_bls), True where RFI power was added.
        """
        n_chans, n_bls = self.config.n_chans, self.products.n_bls
        response = self.instrument.response(time)
        terms = self.source_terms(time, phase_centre, on_source)
        gain_power = np.abs(response) ** 2
        sys_power = self.noise.sefd * gain_power
        total_power = sys_power + np.sum(np.abs(terms) ** 2, axis=0)
        if not self.noise.enabled:
            noise_q, noise_k = gain_power, 0.0
        elif self.noise.snr is None:
            noise_q = total_power
            noise_k = 1.0 / math.sqrt(self.config.channel_width * self.config.dump_period)
        else:
            noise_q, noise_k = gain_power, self._ref_flux / self.noise.snr
        if rfi is None:
            rfi = (np.zeros((0, n_chans), np.float32), np.zeros((0, n_bls), np.complex64))
        if out is None:
            out = np.empty((n_chans, n_bls, 2), np.int32)
        elif out.shape != (n_chans, n_bls, 2) or out.dtype != np.int32:
            raise ValueError(f"out must be int32 of shape {(n_chans, n_bls, 2)}")
        mask = np.empty((n_chans, n_bls), np.bool_)
        # An independent 64-bit stream start per (seed, dump): consecutive counters
        # within a dump never overlap another dump's range in practice
        seed = np.random.SeedSequence([self.seed, dump_index]).generate_state(1, np.uint64)[0]
        _vis_kernel(
            terms,
            response,
            sys_power,
            noise_q,
            float(noise_k),
            self.products.input1,
            self.products.input2,
            self.products.is_parallel,
            rfi[0],
            rfi[1],
            self.count_scale,
            seed,
            _NORMAL,
            out,
            mask,
        )
        return out, mask
