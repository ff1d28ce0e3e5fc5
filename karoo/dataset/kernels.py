"""Per-block kernels of the reader (numba, no I/O): weights from their stored form."""

from __future__ import annotations

import numpy as np
from numba import njit

TINY_SCALE = np.float32(2.0**-32)  # katdal's scale where the autocorrelation power is unusable


@njit(nogil=True, cache=True, error_model="numpy")
def _weights(weights, channel, vis, auto_index, in1, in2, out):
    n_t, n_f, n_b = weights.shape
    n_in = auto_index.shape[0]
    inv = np.empty(n_in, np.float32)
    for t in range(n_t):
        for f in range(n_f):
            c = channel[t, f]
            for i in range(n_in):
                inv[i] = np.float32(1.0) / vis[t, f, auto_index[i]].real
            for b in range(n_b):
                s = inv[in1[b]] * inv[in2[b]]
                if not np.isfinite(s):
                    s = TINY_SCALE
                out[t, f, b] = np.float32(weights[t, f, b]) * c * s


@njit(nogil=True, cache=True, error_model="numpy")
def _weights_unscaled(weights, channel, out):
    n_t, n_f, n_b = weights.shape
    for t in range(n_t):
        for f in range(n_f):
            c = channel[t, f]
            for b in range(n_b):
                out[t, f, b] = np.float32(weights[t, f, b]) * c


def stored_weights(weights: np.ndarray, channel: np.ndarray) -> np.ndarray:
    """float32 weights ``weights (uint8, T x F x B) * channel (T x F)``."""
    out = np.empty(weights.shape, np.float32)
    _weights_unscaled(weights, channel.astype(np.float32, copy=False), out)
    return out


def power_scaled_weights(weights: np.ndarray, channel: np.ndarray, vis: np.ndarray,
                         auto_index: np.ndarray, in1: np.ndarray, in2: np.ndarray) -> np.ndarray:
    """Stored weights divided by the autocorrelation powers of each product's two inputs.

    Parameters
    ----------
    weights, channel, vis
        ``(T, F, B)`` uint8, ``(T, F)`` float32 and ``(T, F, B)`` complex64 of one block (all
        baselines).
    auto_index
        ``(n_inputs,)`` product index of each input's autocorrelation.
    in1, in2
        ``(B,)`` input index of each product's two sides.

    Returns
    -------
    ndarray
        float32 ``w * channel / (Re auto_1 * Re auto_2)``, with a scale of 2**-32 where that is
        not finite (katdal's rule).
    """
    out = np.empty(weights.shape, np.float32)
    _weights(weights, channel.astype(np.float32, copy=False), vis, auto_index, in1, in2, out)
    return out
