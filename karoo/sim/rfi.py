"""RFI injection with a ground-truth mask, and heap (substream) loss.

An RFI event adds, for every dump and channel it covers, a signal of power `power` (Jy)
seen by every antenna with a random phase per antenna and a random polarisation, i.e. on
product (p, q): ``power * taper(|b|) * e_pol(p) conj(e_pol(q)) * r_ant(p) conj(r_ant(q))``
(times the instrumental response J_p conj(J_q)). The taper ``exp(-|b| / decorrelation)``
mimics fringe winding of a terrestrial emitter on long baselines; where the product factor
falls below `cutoff` nothing is added, so the truth mask is exactly "where power was added".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .array import Array, CorrProducts

KINDS = ("narrowband", "burst", "blip")
# Persistent L-band transmitters (Hz, width in Hz): GSM downlink, aircraft DME, GNSS
KNOWN_TRANSMITTERS = (
    (947.5e6, 1.0e6),
    (1090.0e6, 1.0e6),
    (1176.45e6, 2.0e6),
    (1227.6e6, 2.0e6),
    (1575.42e6, 2.0e6),
)


@dataclass(frozen=True)
class RfiEvent:
    """One RFI event: dumps [first_dump, first_dump + n_dumps), channels [chan_start, chan_stop).

    `power` is the flux density per channel (Jy) on the autocorrelations; `decorrelation`
    the baseline length (m) over which the cross-correlated power falls by 1/e; `seed`
    draws the antenna phases and polarisation.
    """

    kind: str
    first_dump: int
    n_dumps: int
    chan_start: int
    chan_stop: int
    power: float
    decorrelation: float
    seed: int

    def active(self, dump_index: int) -> bool:
        return self.first_dump <= dump_index < self.first_dump + self.n_dumps


@dataclass
class RfiModel:
    """A list of RFI events over an observation, on a given array and channel grid."""

    array: Array
    n_chans: int
    events: list[RfiEvent] = field(default_factory=list)
    cutoff: float = 0.1

    def __post_init__(self) -> None:
        self.products = CorrProducts.cbf(self.array)
        for e in self.events:
            if e.kind not in KINDS or not 0 <= e.chan_start < e.chan_stop <= self.n_chans:
                raise ValueError(f"bad RFI event {e}")
        enu = self.array.enu
        self._length = np.linalg.norm(enu[self.products.ant2] - enu[self.products.ant1], axis=-1)
        self._bl_cache: dict[RfiEvent, np.ndarray] = {}

    @classmethod
    def random(
        cls,
        array: Array,
        freqs: np.ndarray,
        n_dumps: int,
        seed: int = 0,
        n_narrowband: int = 5,
        burst_rate: float = 0.02,
        blip_rate: float = 0.1,
        power_scale: float = 1.0,
    ) -> RfiModel:
        """Typical RFI: `n_narrowband` persistent transmitters (known L-band ones first,
        then random channels), broadband bursts starting in a dump with probability
        `burst_rate` (1-3 dumps, 10-40 % of the band), and short blips (one dump, 1-3
        channels) with probability `blip_rate` per dump. Powers scale with `power_scale`.
        """
        rng = np.random.default_rng(seed)
        n_chans = len(freqs)
        width = abs(freqs[1] - freqs[0]) if n_chans > 1 else 1.0
        events = []

        def add(kind, first, n, start, stop, power, decorrelation):
            start = int(np.clip(start, 0, n_chans - 1))
            stop = int(np.clip(stop, start + 1, n_chans))
            events.append(
                RfiEvent(
                    kind,
                    int(first),
                    int(n),
                    start,
                    stop,
                    float(power * power_scale),
                    float(decorrelation),
                    int(rng.integers(2**31)),
                )
            )

        in_band = [(f, w) for f, w in KNOWN_TRANSMITTERS if freqs.min() <= f <= freqs.max()]
        for i in range(n_narrowband):
            if i < len(in_band):
                f, w = in_band[i]
                start = int(np.argmin(np.abs(freqs - (f - w / 2))))
                stop = start + max(1, round(w / width))
            else:
                start = int(rng.integers(n_chans))
                stop = start + int(rng.integers(1, 4))
            add("narrowband", 0, n_dumps, start, stop, rng.uniform(50, 500), rng.uniform(300, 3000))
        for d in np.flatnonzero(rng.uniform(size=n_dumps) < burst_rate):
            span = int(rng.uniform(0.1, 0.4) * n_chans)
            start = int(rng.integers(0, n_chans - span + 1))
            add(
                "burst",
                d,
                rng.integers(1, 4),
                start,
                start + span,
                rng.uniform(20, 100),
                rng.uniform(300, 3000),
            )
        for d in np.flatnonzero(rng.uniform(size=n_dumps) < blip_rate):
            start = int(rng.integers(n_chans))
            add(
                "blip",
                d,
                1,
                start,
                start + int(rng.integers(1, 4)),
                rng.uniform(100, 1000),
                rng.uniform(300, 3000),
            )
        return cls(array, n_chans, events)

    def _baseline_factor(self, event: RfiEvent) -> np.ndarray:
        factor = self._bl_cache.get(event)
        if factor is None:
            rng = np.random.default_rng(event.seed)
            n_ants = self.array.n_ants
            ant_phase = np.exp(2j * math.pi * rng.uniform(size=n_ants))
            psi, chi = rng.uniform(0, math.pi / 2), rng.uniform(0, 2 * math.pi)
            pol = np.array([math.cos(psi), math.sin(psi) * np.exp(1j * chi)])  # (h, v)
            inp = np.repeat(ant_phase, 2) * np.tile(pol, n_ants)
            p = self.products
            factor = (
                inp[p.input1] * np.conj(inp[p.input2]) * np.exp(-self._length / event.decorrelation)
            )
            factor[np.abs(factor) < self.cutoff] = 0
            factor = factor.astype(np.complex64)
            self._bl_cache[event] = factor
        return factor

    def dump_terms(self, dump_index: int) -> tuple[np.ndarray, np.ndarray]:
        """The events active in a dump, as the visibility kernel wants them.

        Returns
        -------
        amplitude
            float32 (n_active, n_chans): event power per channel (0 outside it).
        baseline_factor
            complex64 (n_active, n_bls): antenna/polarisation/taper factor (0 where cut).
        """
        active = [e for e in self.events if e.active(dump_index)]
        amp = np.zeros((len(active), self.n_chans), np.float32)
        bl = np.zeros((len(active), self.products.n_bls), np.complex64)
        for k, e in enumerate(active):
            amp[k, e.chan_start : e.chan_stop] = e.power
            bl[k] = self._baseline_factor(e)
        return amp, bl

    def mask(self, dump_index: int) -> np.ndarray:
        """Ground-truth mask of a dump, bool (n_chans, n_bls)."""
        amp, bl = self.dump_terms(dump_index)
        return (
            np.einsum("ec,eb->cb", amp != 0, bl != 0).astype(bool)
            if len(amp)
            else (np.zeros((self.n_chans, self.products.n_bls), bool))
        )

    def write_npz(self, path, n_dumps: int) -> None:
        """Write the truth mask (time, chan, corrprod), bit-packed along corrprod, plus the
        event table, to an ``.npz`` file. Unpack with ``np.unpackbits(packed, axis=-1,
        count=n_bls).astype(bool)``."""
        packed = np.stack([np.packbits(self.mask(d), axis=-1) for d in range(n_dumps)])
        fields = (
            "kind",
            "first_dump",
            "n_dumps",
            "chan_start",
            "chan_stop",
            "power",
            "decorrelation",
            "seed",
        )
        np.savez_compressed(
            path,
            mask_packed=packed,
            n_bls=self.products.n_bls,
            bls_ordering=self.products.labels,
            **{f"event_{f}": np.array([getattr(e, f) for e in self.events]) for f in fields},
        )


def load_rfi_mask(path) -> np.ndarray:
    """Read back the (time, chan, corrprod) bool mask written by `RfiModel.write_npz`."""
    with np.load(path) as npz:
        return np.unpackbits(npz["mask_packed"], axis=-1, count=int(npz["n_bls"])).astype(bool)


@dataclass(frozen=True)
class HeapLossModel:
    """Which (dump, substream) heaps the sender should drop.

    Parameters
    ----------
    random_rate
        Independent probability that any one heap is lost.
    burst_rate
        Probability per dump that a loss burst starts.
    burst_dumps
        (min, max) burst length in dumps, inclusive.
    burst_substreams
        (min, max) number of contiguous substreams a burst takes out, inclusive.
    seed
        Random seed.
    """

    random_rate: float = 0.0
    burst_rate: float = 0.0
    burst_dumps: tuple[int, int] = (1, 5)
    burst_substreams: tuple[int, int] = (1, 4)
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.random_rate <= 1 and 0 <= self.burst_rate <= 1):
            raise ValueError("loss rates must be between 0 and 1")

    def lost(self, n_dumps: int, n_substreams: int) -> np.ndarray:
        """bool (n_dumps, n_substreams): True where the heap is lost."""
        rng = np.random.default_rng(self.seed)
        lost = rng.uniform(size=(n_dumps, n_substreams)) < self.random_rate
        for d in np.flatnonzero(rng.uniform(size=n_dumps) < self.burst_rate):
            length = int(rng.integers(self.burst_dumps[0], self.burst_dumps[1] + 1))
            width = min(
                n_substreams,
                int(rng.integers(self.burst_substreams[0], self.burst_substreams[1] + 1)),
            )
            first = int(rng.integers(0, n_substreams - width + 1))
            lost[d : d + length, first : first + width] = True
        return lost
