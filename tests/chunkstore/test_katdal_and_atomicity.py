"""chunk_info as katdal reads it, and writes that never leave half a chunk visible."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import katdal.chunkstore
import katsdptelstate
import numpy as np
import pytest
from zarr.core.sync import sync

import karoo.chunkstore.store as store_module
from karoo.chunkstore import DATA_LOST

from .test_store import CHUNKS, N_BLS, N_CHANS, N_DUMPS, make_data, write_all

ROOT = Path(__file__).resolve().parents[2]


class ZarrBackedKatdalStore(katdal.chunkstore.ChunkStore):
    """Just enough of a katdal ChunkStore over a karoo Zarr group to run katdal's dask reader."""

    def __init__(self, group):
        super().__init__({KeyError: katdal.chunkstore.ChunkNotFound})
        self.group = group
        self.requested = []

    def get_chunk(self, array_name, slices, dtype):
        chunk_name, _ = self.chunk_metadata(array_name, slices, dtype=dtype)
        self.requested.append(chunk_name)
        array = self.group[array_name.split(self.NAME_SEP)[-1]]
        index = tuple(s.start // c for s, c in zip(slices, array.chunks, strict=True))
        key = f"{array.path}/{array.metadata.encode_chunk_key(index)}"
        if not sync(array.store_path.store.exists(key)):
            raise katdal.chunkstore.ChunkNotFound(chunk_name)
        return array[tuple(slices)]


async def test_chunk_info_is_what_katdal_expects(make_store, cbid):
    store = make_store()
    data = make_data(4)
    async with await store.create_stream(cbid, "sdp_l0", N_CHANS, N_BLS, chunks=CHUNKS) as stream:
        await write_all(stream, data)
        await stream.finish(N_DUMPS)
        telstate = katsdptelstate.TelescopeState()
        key = stream.write_chunk_info(telstate)
    assert key == f"{cbid}_sdp_l0_chunk_info"
    info = telstate[key]  # through katsdptelstate's own encoding and decoding
    prefix = f"{cbid}-sdp-l0"
    assert info == {
        "correlator_data": {"prefix": prefix, "dtype": "<c8", "shape": (7, 64, 24),
                            "chunks": ((2, 2, 2, 1), (16, 16, 16, 16), (24,))},
        "flags": {"prefix": prefix, "dtype": "|u1", "shape": (7, 64, 24),
                  "chunks": ((4, 3), (32, 32), (24,))},
        "weights": {"prefix": prefix, "dtype": "|u1", "shape": (7, 64, 24),
                    "chunks": ((4, 3), (32, 32), (24,))},
        "weights_channel": {"prefix": prefix, "dtype": "<f4", "shape": (7, 64),
                            "chunks": ((4, 3), (64,))},
    }
    assert all(isinstance(c, tuple) for a in info.values() for c in a["chunks"])
    # katdal builds its dask arrays from chunk_info and asks for chunks by katdal's own names.
    kstore = ZarrBackedKatdalStore(make_store(read_only=True).open_zarr_group(cbid, "sdp_l0"))
    for name, entry in info.items():
        array_name = kstore.join(entry["prefix"], name)
        darray = kstore.get_dask_array(array_name, entry["chunks"], entry["dtype"])
        np.testing.assert_array_equal(darray.compute(), data[name])
    assert f"{prefix}/correlator_data/00006_00048_00000" in kstore.requested
    assert f"{prefix}/weights_channel/00004_00000" in kstore.requested


async def test_missing_flags_read_as_data_lost_by_katdal(make_store, cbid):
    store = make_store()
    async with await store.create_stream(cbid, "sdp_l0", N_CHANS, N_BLS, chunks=CHUNKS) as stream:
        await stream.write_chunk("flags", (0, 0, 0), np.zeros((4, 32, N_BLS), np.uint8))
        await stream.finish(N_DUMPS)
        info = stream.chunk_info()
    kstore = ZarrBackedKatdalStore(make_store(read_only=True).open_zarr_group(cbid, "sdp_l0"))
    entry = info["flags"]
    flags = kstore.get_dask_array(kstore.join(entry["prefix"], "flags"), entry["chunks"],
                                  entry["dtype"], errors=DATA_LOST).compute()
    assert (flags[:4, :32] == 0).all()
    assert (flags[4:] == DATA_LOST).all() and (flags[:, 32:] == DATA_LOST).all()


# -- atomicity -----------------------------------------------------------------------------------


class _FailingFile:
    """A file that takes half of what is written to it, then fails as a full disk would."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        view = memoryview(data).cast("B")
        self._f.write(view[: len(view) // 2])
        self._f.flush()
        raise OSError(28, "No space left on device (injected)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


async def test_interrupted_local_write_leaves_no_partial_chunk(tmp_path, monkeypatch, cbid):
    store = store_module.ChunkStore(tmp_path, retries=0)
    async with await store.create_stream(cbid, "sdp_l0", N_CHANS, N_BLS, chunks=CHUNKS) as stream:
        old = np.full((2, 16, N_BLS), 1 + 2j, np.complex64)
        await stream.write_chunk("correlator_data", (0, 0, 0), old)
        monkeypatch.setattr(store_module, "open",
                            lambda path, mode: _FailingFile(open(path, mode)),  # noqa: SIM115
                            raising=False)
        with pytest.raises(store_module.StoreUnavailable, match="No space left"):
            await stream.write_chunk("correlator_data", (0, 0, 0), 2 * old)
        with pytest.raises(store_module.StoreUnavailable, match="No space left"):
            await stream.write_chunk("correlator_data", (1, 0, 0), 2 * old)
        monkeypatch.undo()
        np.testing.assert_array_equal(await stream.read_chunk("correlator_data", (0, 0, 0)), old)
        assert not await stream.has_chunk("correlator_data", (1, 0, 0))
    leftovers = [p for p in (tmp_path / f"{cbid}-sdp-l0").rglob("*") if ".partial" in p.name]
    assert leftovers == []


_WRITER = textwrap.dedent("""
    import asyncio, sys
    import numpy as np
    from karoo.chunkstore import ChunkStore

    async def main(url, cbid, endpoint, key, secret):
        kwargs = dict(endpoint_url=endpoint, access_key=key, secret_key=secret) if endpoint else {}
        stream = await ChunkStore(url, **kwargs).open_stream(cbid, "sdp_l0")
        shape = stream.arrays["correlator_data"].chunks
        generation = 0
        while True:
            generation += 1
            chunk = np.full(shape, generation, np.complex64)
            await asyncio.gather(*(stream.write_chunk("correlator_data", (i, 0, 0), chunk)
                                   for i in range(4)))
            print(generation, flush=True)

    asyncio.run(main(*sys.argv[1:]))
""")


@pytest.mark.parametrize("kill_after", [0.05, 0.3])
async def test_killed_writer_leaves_no_partial_chunk(make_store, cbid, kill_after):
    """A writer process killed mid-write: each chunk is some whole generation, or absent."""
    store = make_store()
    big = {"correlator_data": (8, N_CHANS)}  # 8 x 64 x 24000 x 8 bytes = 98 MB per chunk
    n_bls = 24000
    stream = await store.create_stream(cbid, "sdp_l0", N_CHANS, n_bls, chunks=big)
    await stream.close()
    if store.is_s3:
        opts = store._s3_options
        args = [store.url, cbid, opts["endpoint_url"], opts["key"], opts["secret"]]
    else:
        args = [store.url, cbid, "", "", ""]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, *args], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one generation is complete
        time.sleep(kill_after)  # the next is in flight
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    async with await store.open_stream(cbid, "sdp_l0") as stream:
        for i in range(4):
            chunk = await stream.read_chunk("correlator_data", (i, 0, 0))
            values = np.unique(chunk)
            assert len(values) == 1, f"chunk {i} mixes generations {values[:5]}"
            assert values[0].real >= 1
