"""A small dataset with known content, written once per module with karoo's own writers."""

import numpy as np
import pytest

from karoo.dataset.synthetic import write_dataset

# vis chunks finer than the flags/weights chunks, so the arrays' grids differ
CHUNKS = {"correlator_data": (2, 16), "flags": (4, 32), "weights": (8, 32),
          "weights_channel": (16, 64)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("store"), n_ants=3, n_chans=64, chunks=CHUNKS)


def expected_weights(syn) -> np.ndarray:
    """Stored uint8 x weights_channel, divided by the autocorrelation powers (katdal's rule)."""
    labels = [tuple(p) for p in np.asarray(syn.simulator.model.products.labels)]
    auto = {a: k for k, (a, b) in enumerate(labels) if a == b}
    p1 = syn.vis[..., [auto[a] for a, _ in labels]].real
    p2 = syn.vis[..., [auto[b] for _, b in labels]].real
    return syn.weights * syn.weights_channel[..., None] / (p1 * p2)
