"""applycal: cal products written to telstate with injected gains are undone to 1e-3."""

import numpy as np
import pytest

import karoo
from karoo import flags as flag_bits
from karoo.dataset import CalibrationError
from karoo.dataset.applycal import cal_channel_freqs
from karoo.dataset.synthetic import make_content, write_dataset

N_ANTS, N_CHANS = 3, 64
POLS = ["v", "h"]  # katsdpcal's order: pol axis 0 is v
ANTS = ["m000", "m001", "m002"]
EDGE = 2  # NaN bandpass channels at each band edge (not extrapolated)
HOLES = [20, 21, 40]  # NaN bandpass channels inside the band (interpolated)


class Truth:
    """Gains linear in dump index (magnitude and phase), so interpolation between solutions is
    exact; a bandpass linear in channel (magnitude and phase); delays; a cross-hand delay."""

    def __init__(self, freqs):
        rng = np.random.default_rng(7)
        self.freqs = freqs
        shape = (2, N_ANTS)
        self.k = rng.uniform(-2e-9, 2e-9, shape)
        self.kcross = np.array([[0.7e-9], [0.0]])
        self.amp0, self.amp1 = rng.uniform(0.8, 1.2, shape), rng.uniform(-2e-3, 2e-3, shape)
        self.ph0, self.ph1 = rng.uniform(-1, 1, shape), rng.uniform(-0.01, 0.01, shape)
        self.bamp0, self.bamp1 = rng.uniform(0.9, 1.1, shape), rng.uniform(-3e-3, 3e-3, shape)
        self.bph1 = rng.uniform(-0.02, 0.02, shape)

    def gain(self, dumps):  # (T, pol, ant)
        t = np.asarray(dumps, float)[:, None, None]
        return (self.amp0 + self.amp1 * t) * np.exp(1j * (self.ph0 + self.ph1 * t))

    def bandpass(self):  # (F, pol, ant)
        c = np.arange(N_CHANS)[:, None, None]
        return (self.bamp0 + self.bamp1 * c) * np.exp(1j * self.bph1 * c)

    def delay_term(self, kcross=True):  # (F, pol, ant)
        k = self.k + (self.kcross if kcross else 0)
        return np.exp(2j * np.pi * k[None] * self.freqs[:, None, None])

    def total(self, dumps, kcross=True):  # (T, F, pol, ant)
        return self.gain(dumps)[:, None] * self.bandpass()[None] * self.delay_term(kcross)[None]


def _index(label):
    return POLS.index(label[-1]), ANTS.index(label[:-1])


@pytest.fixture(scope="module")
def caldata(tmp_path_factory):
    sim_freqs = {}

    def content(n, n_chans, labels, seed, t0):
        data = make_content(n, n_chans, labels, seed, t0)
        g = sim_freqs["truth"].total(np.arange(t0, t0 + n))
        i1 = [_index(a) for a, _ in labels]
        i2 = [_index(b) for _, b in labels]
        gi = g[:, :, [p for p, _ in i1], [a for _, a in i1]]
        gj = g[:, :, [p for p, _ in i2], [a for _, a in i2]]
        data["correlator_data"] = (gi * np.conj(gj)).astype(np.complex64)
        return data

    from karoo.dataset.synthetic import short_script
    from karoo.sim import Simulator

    sim = Simulator.create(n_ants=N_ANTS, n_chans=N_CHANS, script=short_script(), rfi=None)
    freqs = cal_channel_freqs(sim.config.band.center_freq, sim.config.band.bandwidth, N_CHANS)
    truth = Truth(freqs)
    sim_freqs["truth"] = truth
    syn = write_dataset(tmp_path_factory.mktemp("cal"), n_ants=N_ANTS, n_chans=N_CHANS,
                        content=content, chunks={"correlator_data": (4, 32)})
    ts = syn.telstate
    cb = syn.capture_block_id
    for key, value in (("antlist", ANTS), ("pol_ordering", POLS), ("product_B_parts", 2),
                       ("center_freq", sim.config.band.center_freq),
                       ("bandwidth", sim.config.band.bandwidth), ("n_chans", N_CHANS),
                       ("refant", "m000")):
        ts.add(f"cal_{key}", value, immutable=True)
    times = sim.dump_times
    t_first = float(times[0])
    ts.add(f"{cb}_cal_product_K", truth.k.astype(np.float32), ts=t_first)
    ts.add(f"{cb}_cal_product_KCROSS", truth.kcross.astype(np.float32), ts=t_first)
    bp = truth.bandpass().astype(np.complex64)
    bp[:EDGE] = bp[-EDGE:] = bp[HOLES] = np.nan
    half = N_CHANS // 2
    ts.add(f"{cb}_cal_product_B0", bp[:half], ts=t_first)
    ts.add(f"{cb}_cal_product_B1", bp[half:], ts=t_first)
    solution_dumps = [*range(0, syn.n_dumps, 17), syn.n_dumps - 1]
    for d in solution_dumps:
        g = truth.gain([d])[0].astype(np.complex64)
        if d == 34:
            g[1, 2] = np.nan  # a failed solution is skipped, not applied
        ts.add(f"{cb}_cal_product_G", g, ts=float(times[d]))
    ts.dump(syn.rdb)
    return syn, truth


def test_applycal_recovers_injected_gains(caldata):
    syn, truth = caldata
    d = karoo.open(syn.rdb, applycal="all")
    vis = d.vis[:]
    good = slice(EDGE, N_CHANS - EDGE)
    np.testing.assert_allclose(vis[:, good], 1.0, atol=1e-3)
    # the band edges could not be corrected: data untouched, flagged postproc
    np.testing.assert_array_equal(vis[:, :EDGE], syn.vis[:, :EDGE])
    raw = d.raw_flags[:]
    assert np.all(raw[:, :EDGE] & flag_bits.POSTPROC)
    assert not np.any(raw[:, good] & flag_bits.POSTPROC)
    weights = d.weights[:]
    assert np.all(weights[:, :EDGE] == 0)
    # weights scale with |g_i g_j|^2
    plain = karoo.open(syn.rdb)
    g = truth.total(np.arange(syn.n_dumps))
    labels = d.corr_products
    gi = np.abs(g[:, :, [_index(a)[0] for a, _ in labels], [_index(a)[1] for a, _ in labels]])
    gj = np.abs(g[:, :, [_index(b)[0] for _, b in labels], [_index(b)[1] for _, b in labels]])
    expected = plain.weights[:] * (gi * gj) ** 2
    np.testing.assert_allclose(weights[:, good], expected[:, good], rtol=2e-3)


def test_applycal_products_and_selection(caldata):
    syn, truth = caldata
    # without KCROSS the v inputs keep the cross-hand delay
    d = karoo.open(syn.rdb, applycal="K,B,G")
    d.select(channels=slice(EDGE, N_CHANS - EDGE), pol="vh", dumps=slice(30, 50))
    phase = 2 * np.pi * truth.kcross[0, 0] * d.freqs
    np.testing.assert_allclose(d.vis[:], np.exp(1j * phase)[None, :, None] * np.ones(d.shape),
                               atol=1e-3)
    # default and export source (raw DATA, corrected separately)
    d = karoo.open(syn.rdb)
    d.select(channels=slice(EDGE, N_CHANS - EDGE), scans="track", pol="hh")
    source = d.export_source(applycal="all")
    np.testing.assert_array_equal(source.vis.compute(), d.vis[:])
    np.testing.assert_allclose(source.corrected.compute(), 1.0, atol=1e-3)
    assert source.calibrated_weights.shape == source.vis.shape
    with pytest.raises(CalibrationError, match="unknown cal product"):
        karoo.open(syn.rdb, applycal="X")


def test_applycal_missing_products(tmp_path):
    syn = write_dataset(tmp_path, n_ants=2, n_chans=16)
    with pytest.raises(CalibrationError, match="antlist"):
        karoo.open(syn.rdb, applycal="default").vis[0]


def test_export_corrected_data(caldata, tmp_path):
    from casacore import tables

    from karoo.dataset.cli import export

    syn, _ = caldata
    d = karoo.open(syn.rdb)
    d.select(channels=slice(EDGE, N_CHANS - EDGE), scans="track", targets="SIM-GCAL")
    export(d.export_source(applycal="all"), str(tmp_path / "cal.ms"), progress=False)
    with tables.table(str(tmp_path / "cal.ms"), ack=False) as ms:
        corrected = ms.getcol("CORRECTED_DATA")
        data = ms.getcol("DATA")
    np.testing.assert_allclose(corrected, 1.0, atol=1e-3)
    assert np.abs(data - 1).max() > 0.1  # DATA stays raw


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_measured_flux_scales_g_as_katdal(caldata, tmp_path):
    """cal's measured_flux divides the G solutions made on that gain calibrator by √flux, in
    karoo as in katdal (whose applycal.calibrate_flux does it); gaincal_flux overrides it and
    None turns it off, in both."""
    import katdal
    from dask.sizeof import sizeof

    from karoo.dataset.katdal_adapter import KatdalZarrStore

    # katdal's applycal hands numba functions to dask, whose lazy sizeof registration for numba
    # imports numba.cuda's DeviceNDArray, which the CUDA simulator (NUMBA_ENABLE_CUDASIM=1, as
    # the tests run) lacks; dask then sizes them generically.
    sizeof._lazy.pop("numba", None)

    syn, _ = caldata
    ts, cb = syn.telstate, syn.capture_block_id
    flux = 4.0
    # a copy of the dataset's telstate with the flux added (the module's RDB stays as it is)
    ts.add(f"{cb}_cal_measured_flux", {"SIM-GCAL": flux}, immutable=True)
    rdb = str(tmp_path / "flux.rdb")
    try:
        ts.dump(rdb)
    finally:
        ts.delete(f"{cb}_cal_measured_flux")
    good = slice(EDGE, N_CHANS - EDGE)
    products = "K,B,G"
    got = {}
    for label, gaincal_flux in (("measured", {}), ("override", {"SIM-GCAL": 9.0}),
                                ("off", None)):
        kd = katdal.open(rdb, chunk_store=KatdalZarrStore(syn.store),
                         applycal=",".join(f"l1.{p}" for p in products.split(",")),
                         gaincal_flux=gaincal_flux)
        d = karoo.open(rdb, chunk_store=syn.store, applycal=products, gaincal_flux=gaincal_flux)
        assert kd.shape == d.shape
        got[label] = d.vis[:][:, good]
        np.testing.assert_allclose(got[label], kd.vis[:][:, good], rtol=1e-5, atol=1e-6)
    # at a dump of the gain calibrator with a G solution of its own, the corrected data are
    # its flux density (G was solved as if it were 1 Jy); without scaling they are 1
    d = karoo.open(rdb, chunk_store=syn.store)
    on_gcal = np.array([d.catalogue[t].name == "SIM-GCAL" for t in d._target_index])
    solution_dumps = np.array([*range(0, syn.n_dumps, 17), syn.n_dumps - 1])
    both = [k for k in solution_dumps if on_gcal[k] and k != 34 and on_gcal[max(k - 1, 0)]]
    assert both, "the script has no G solution on the gain calibrator"
    k = both[0]
    # parallel hands only: without KCROSS (katdal has none) the cross hands keep its phase
    par = [a[-1] == b[-1] for a, b in d.corr_products]
    np.testing.assert_allclose(got["off"][k][:, par], 1.0, atol=1e-3)
    np.testing.assert_allclose(got["measured"][k][:, par], flux, rtol=1e-3)
    np.testing.assert_allclose(got["override"][k][:, par], 9.0, rtol=1e-3)
