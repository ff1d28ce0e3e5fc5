"""A small synthetic observation for the MS writer tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from karoo.ms import MSInput, Scan, Target, itrf_from_enu

N_ANTS, N_CHANS, N_DUMPS = 4, 16, 10
POL_ORDER_CBF = (("v", "v"), ("h", "v"), ("v", "h"), ("h", "h"))
MEERKAT_LAT, MEERKAT_LON, MEERKAT_ALT = np.radians(-30.71292), np.radians(21.44380), 1038.0


@dataclass
class Observation:
    meta: MSInput
    vis: np.ndarray
    flags: np.ndarray
    weights: np.ndarray
    enu: np.ndarray


@dataclass(frozen=True)
class RotatingUVW:
    """A simple per-antenna uvw hook: ENU offsets rotated with time and target (metres)."""

    enu: np.ndarray
    targets: list[Target]

    def __call__(self, timestamps: np.ndarray, target: np.ndarray) -> np.ndarray:
        enu = self.enu
        angle = (timestamps - 1.7e9) * 7.3e-5 + np.array([self.targets[i].ra for i in target])
        c, s = np.cos(angle), np.sin(angle)
        u = c[:, None] * enu[None, :, 0] - s[:, None] * enu[None, :, 1]
        v = s[:, None] * enu[None, :, 0] + c[:, None] * enu[None, :, 1]
        w = np.broadcast_to(enu[None, :, 2], u.shape)
        return np.stack([u, v, w], axis=-1)


def cbf_products(names: list[str], pols=POL_ORDER_CBF) -> list[tuple[str, str]]:
    """Products in MeerKAT CBF order (by ANTENNA2, then ANTENNA1; vv, hv, vh, hh)."""
    return [
        (f"{names[a1]}{p1}", f"{names[a2]}{p2}")
        for a2 in range(len(names))
        for a1 in range(a2 + 1)
        for p1, p2 in pols
    ]


def make_observation(pols=POL_ORDER_CBF, drop: int | None = None, n_dumps=N_DUMPS) -> Observation:
    rng = np.random.default_rng(42)
    names = [f"m{i:03d}" for i in range(N_ANTS)]
    enu = rng.uniform(-500, 500, (N_ANTS, 3)) * np.array([1, 1, 0.01])
    products = cbf_products(names, pols)
    if drop is not None:
        del products[drop]
    targets = [
        Target("PKS1934-638", np.radians(294.85), np.radians(-63.71)),
        Target("J0408-6545", np.radians(62.08), np.radians(-65.75)),
    ]
    scans = [
        Scan(0, 4, 0, "CALIBRATE_BANDPASS#ON_SOURCE"),
        Scan(4, n_dumps, 1, "OBSERVE_TARGET#ON_SOURCE"),
    ]
    meta = MSInput(
        antenna_names=names,
        antenna_positions=itrf_from_enu(enu, MEERKAT_LAT, MEERKAT_LON, MEERKAT_ALT),
        channel_freqs=856e6 + 53.5e6 * np.arange(N_CHANS),
        channel_width=53.5e6,
        corr_products=products,
        targets=targets,
        scans=scans,
        timestamps=1.7e9 + 8.0 * np.arange(n_dumps) + 4.0,
        dump_period=8.0,
        antenna_uvw=RotatingUVW(enu, targets),
        observer="karoo tests",
        project="karoo",
        history=("synthetic observation",),
    )
    n_products = len(products)
    t, f, k = np.meshgrid(
        np.arange(n_dumps), np.arange(N_CHANS), np.arange(n_products), indexing="ij"
    )
    vis = (t * 1000 + k + 1j * f).astype(np.complex64)
    flags = (rng.random(vis.shape) < 0.2).astype(np.uint8) * rng.choice(
        np.array([2, 8, 16], np.uint8), vis.shape
    )
    flags[3, :, 8:12] = 8  # every product of baseline m001-m001 in dump 3: FLAG_ROW
    weights = rng.uniform(0.5, 4.0, vis.shape).astype(np.float32)
    weights[rng.random(vis.shape) < 0.05] = 0.0
    return Observation(meta, vis, flags, weights, enu)


@pytest.fixture
def obs() -> Observation:
    return make_observation()


def zarr_source(obs: Observation, path, *, chunk_dumps: int = 2, calibrated: bool = False):
    """An `ExportSource` of `obs` held as Dask arrays over a Zarr store on disk at `path`.

    With `calibrated`, adds corrected visibilities (vis times a per-product complex gain) and
    calibrated weights (weights / |gain|^2), as applycal would. Returns (source, group).
    """
    import dask.array as da
    import zarr

    from karoo.ms import ExportSource

    arrays = {"vis": obs.vis, "flags": obs.flags, "weights": obs.weights}
    if calibrated:
        gain = calibration_gains(obs.vis.shape[2])
        arrays["corrected"] = (obs.vis * gain).astype(np.complex64)
        arrays["calibrated_weights"] = (obs.weights / np.abs(gain) ** 2).astype(np.float32)
    group = zarr.open_group(str(path), mode="w")
    lazy = {}
    for name, values in arrays.items():
        z = group.create_array(
            name, shape=values.shape, dtype=values.dtype, chunks=(chunk_dumps, *values.shape[1:])
        )
        z[:] = values
        lazy[name] = da.from_zarr(z)
    return ExportSource(obs.meta, **lazy), group


def calibration_gains(n_products: int) -> np.ndarray:
    """A fixed complex factor per correlation product, standing in for 1 / (g_p conj(g_q))."""
    k = np.arange(n_products)
    return ((1.0 + 0.1 * (k % 5)) * np.exp(0.3j * k)).astype(np.complex64)


def simulated_source(
    n_ants: int = 16,
    n_chans: int = 64,
    track_s: float = 96.0,
    point_offset: tuple[float, float] | None = (0.12, 0.08),
    rfi: bool = False,
    seed: int = 3,
):
    """An `ExportSource` from `karoo.sim`: a slew then a track of a field with a point source.

    The field centre is ``SIM-FIELD``; with `point_offset` (degrees of RA * cos(dec), Dec) the
    sky is a single 10 Jy flat-spectrum point source offset from it, with an ideal instrument,
    so an image shows it at a known position. Returns ``(source, (ra, dec) of the source)``.
    Visibilities are in Jy (the int32 dumps divided by the correlator's count scale); the
    slew's dumps are outside every scan and are not exported.
    """
    from karoo.ms import ExportSource, MSInput
    from karoo.ms import Scan as MSScan
    from karoo.ms import Target as MSTarget
    from karoo.ms.uvw import geometric_uvw
    from karoo.sim import (
        TARGET,
        Array,
        CorrelatorConfig,
        FluxModel,
        InstrumentModel,
        NoiseModel,
        PointSource,
        Simulator,
        SkyModel,
    )
    from karoo.sim import Scan as SimScan

    array = Array.meerkat(n_ants)
    config = CorrelatorConfig(n_chans=n_chans, int_time=8.0, n_substreams=16)
    script = [
        SimScan("slew", TARGET.description, 16.0),
        SimScan("track", TARGET.description, track_s),
    ]
    kwargs = {}
    position = None
    if point_offset is not None:
        dra, ddec = np.radians(point_offset)
        position = (TARGET.ra + dra / np.cos(TARGET.dec), TARGET.dec + ddec)
        flux = FluxModel.power_law(10.0, 1.4e9, 0.0)
        kwargs["sky"] = SkyModel((PointSource("SIM-POINT", *position, flux),))
        kwargs["instrument"] = InstrumentModel.ideal(array, config)
    from karoo.sim import Observation

    sim = Simulator(
        array,
        config,
        Observation(tuple(script)),
        noise=NoiseModel(),
        rfi=rfi or None,
        seed=seed,
        **kwargs,
    )
    times = sim.dump_times
    n_dumps = len(times)
    vis = np.empty((n_dumps, n_chans, sim.model.products.n_bls), np.complex64)
    for i in range(n_dumps):
        raw = sim.dump(i).data
        vis[i] = (raw[..., 0] + 1j * raw[..., 1]) / sim.model.count_scale
    on = np.array([sim.observation.scans[sim.observation.scan_index(t)].on_source for t in times])
    first, last = int(np.argmax(on)), n_dumps - int(np.argmax(on[::-1]))
    targets = [MSTarget(TARGET.name, TARGET.ra, TARGET.dec)]
    meta = MSInput(
        antenna_names=array.names,
        antenna_positions=itrf_from_enu(array.enu, array.latitude, array.longitude, array.altitude),
        channel_freqs=config.channel_freqs,
        channel_width=config.channel_width,
        corr_products=[tuple(p) for p in sim.model.products.labels],
        targets=targets,
        scans=[MSScan(first, last, 0, "OBSERVE_TARGET#ON_SOURCE")],
        timestamps=times,
        dump_period=config.dump_period,
        antenna_uvw=geometric_uvw(array.enu, targets, array.latitude, array.longitude),
        observer="karoo.sim",
        project="karoo tests",
    )
    flags = np.zeros(vis.shape, np.uint8)
    weights = np.ones(vis.shape, np.float32)
    return ExportSource(meta, vis, flags, weights), position
