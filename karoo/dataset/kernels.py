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


# Variants writing a selection of corr products straight into (possibly strided) outputs.


@njit(nogil=True, cache=True, error_model="numpy")
def weights_into(weights, channel, bsel, out):
    """``out[t, f, k] = weights[t, f, bsel[k]] * channel[t, f]``."""
    n_t, n_f = weights.shape[:2]
    for t in range(n_t):
        for f in range(n_f):
            c = np.float32(channel[t, f])
            for k in range(bsel.shape[0]):
                out[t, f, k] = np.float32(weights[t, f, bsel[k]]) * c


@njit(nogil=True, cache=True, error_model="numpy")
def power_scaled_weights_into(weights, channel, vis, auto_index, in1, in2, bsel, out):
    """As :func:`power_scaled_weights`, for corr products `bsel`, into `out`."""
    n_t, n_f = weights.shape[:2]
    n_in = auto_index.shape[0]
    n_k = bsel.shape[0]
    # the inputs of each selected product, looked up once rather than per (dump, channel)
    i1 = np.empty(n_k, np.int32)
    i2 = np.empty(n_k, np.int32)
    for k in range(n_k):
        i1[k] = in1[bsel[k]]
        i2[k] = in2[bsel[k]]
    inv = np.empty(n_in, np.float32)
    for t in range(n_t):
        for f in range(n_f):
            c = np.float32(channel[t, f])
            ok = True
            for i in range(n_in):
                p = vis[t, f, auto_index[i]].real
                inv[i] = np.float32(1.0) / p
                if not (np.isfinite(inv[i]) and abs(inv[i]) < 1e18):
                    ok = False
            row = weights[t, f]
            dest = out[t, f]
            if ok:
                for k in range(n_k):
                    dest[k] = np.float32(row[bsel[k]]) * c * (inv[i1[k]] * inv[i2[k]])
            else:
                for k in range(n_k):
                    s = inv[i1[k]] * inv[i2[k]]
                    if not np.isfinite(s):
                        s = TINY_SCALE
                    dest[k] = np.float32(row[bsel[k]]) * c * s


@njit(nogil=True, cache=True)
def flags_into(flags, bsel, extra, mask, out):
    """``out[t, f, k] = ((flags[t, f, bsel[k]] | extra) & mask) != 0``."""
    n_t, n_f = flags.shape[:2]
    for t in range(n_t):
        for f in range(n_f):
            for k in range(bsel.shape[0]):
                out[t, f, k] = ((flags[t, f, bsel[k]] | extra) & mask) != 0


@njit(nogil=True, cache=True)
def raw_flags_into(flags, bsel, extra, out):
    """``out[t, f, k] = flags[t, f, bsel[k]] | extra``."""
    n_t, n_f = flags.shape[:2]
    for t in range(n_t):
        for f in range(n_f):
            for k in range(bsel.shape[0]):
                out[t, f, k] = flags[t, f, bsel[k]] | extra
