"""Transposing a block of dumps from correlation-product order to MAIN-table rows."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True)
def _gather(src, corr_index, fill, out):
    n_dumps, n_chans, _ = src.shape
    n_bls, n_corr = corr_index.shape
    for row in prange(n_dumps * n_bls):
        t = row // n_bls
        b = row - t * n_bls
        for p in range(n_corr):
            k = corr_index[b, p]
            if k < 0:
                for f in range(n_chans):
                    out[row, f, p] = fill
            else:
                for f in range(n_chans):
                    out[row, f, p] = src[t, f, k]


def gather_rows(src: np.ndarray, corr_index: np.ndarray, fill, out: np.ndarray | None = None):
    """Reorder ``(T, F, B_products)`` into MAIN rows ``(T * nbl, F, P)``.

    Parameters
    ----------
    src
        Block of dumps in correlation-product order (any numeric dtype).
    corr_index
        ``(nbl, P)`` product index per baseline and pol, -1 for a product that is missing.
    fill
        Value written where the product is missing.
    out
        Optional output array of shape ``(T * nbl, F, P)`` and the dtype of `src`.

    Returns
    -------
    out : ndarray
    """
    src = np.ascontiguousarray(src)
    if src.ndim != 3:
        raise ValueError(f"expected a (T, F, B) block, got shape {src.shape}")
    if corr_index.size and corr_index.max() >= src.shape[2]:
        raise ValueError(
            f"block has {src.shape[2]} correlation products, layout needs {corr_index.max() + 1}"
        )
    shape = (src.shape[0] * corr_index.shape[0], src.shape[1], corr_index.shape[1])
    if out is None:
        out = np.empty(shape, src.dtype)
    elif out.shape != shape or out.dtype != src.dtype:
        raise ValueError(f"out must be {shape} {src.dtype}, not {out.shape} {out.dtype}")
    _gather(src, corr_index, src.dtype.type(fill), out)
    return out
