"""Transposing a block of dumps from correlation-product order to MAIN-table rows."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True)
def _gather(src, corr_index, corr_conj, fill, out):
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
            elif corr_conj[b, p]:  # a no-op for real dtypes
                for f in range(n_chans):
                    out[row, f, p] = src[t, f, k].conjugate()
            else:
                for f in range(n_chans):
                    out[row, f, p] = src[t, f, k]


def gather_rows(src: np.ndarray, corr_index: np.ndarray, fill, out: np.ndarray | None = None,
                *, corr_conj: np.ndarray | None = None):
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
    corr_conj
        ``(nbl, P)`` bool: the product is stored as its conjugate (see
        :attr:`~karoo.ms.layout.MSLayout.corr_conj`); default none.

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
    _gather(src, corr_index, _conj_mask(corr_conj, corr_index), src.dtype.type(fill), out)
    return out


def _conj_mask(corr_conj: np.ndarray | None, corr_index: np.ndarray) -> np.ndarray:
    if corr_conj is None:
        return np.zeros(corr_index.shape, np.bool_)
    if corr_conj.shape != corr_index.shape:
        raise ValueError(f"corr_conj must have shape {corr_index.shape}, not {corr_conj.shape}")
    return np.ascontiguousarray(corr_conj, np.bool_)


#: Baselines per work item of `block_to_rows`: their products of one channel are contiguous in
#: the source (CBF order keeps a baseline's pols together), so a block reads whole cache lines.
_BL_BLOCK = 32


@njit(parallel=True, nogil=True, cache=True)
def _block_to_rows(
    vis, flags, weights, sigma_weights, corr_index, corr_conj, flag_mask, zero_sigma,
    with_spectrum, data, flag, weight_spectrum, sigma_spectrum, weight, sigma, flag_row,
):  # fmt: skip
    n_dumps, n_chans, _ = vis.shape
    n_bls, n_corr = corr_index.shape
    n_blocks = (n_bls + _BL_BLOCK - 1) // _BL_BLOCK
    for job in prange(n_dumps * n_blocks):
        t = job // n_blocks
        b0 = (job - t * n_blocks) * _BL_BLOCK
        b1 = min(n_bls, b0 + _BL_BLOCK)
        w_sum = np.zeros((b1 - b0, n_corr))
        s_sum = np.zeros((b1 - b0, n_corr))
        row_flagged = np.ones(b1 - b0, np.bool_)
        for f in range(n_chans):
            for b in range(b0, b1):
                row = t * n_bls + b
                for p in range(n_corr):
                    k = corr_index[b, p]
                    if k < 0:
                        v = np.complex64(0)
                        fl = True
                        w = np.float32(0)
                        s = np.float32(0)
                    else:
                        v = vis[t, f, k].conjugate() if corr_conj[b, p] else vis[t, f, k]
                        fl = (flags[t, f, k] & flag_mask) != 0
                        w = weights[t, f, k]
                        s = sigma_weights[t, f, k]
                    data[row, f, p] = v
                    flag[row, f, p] = fl
                    if not fl:
                        row_flagged[b - b0] = False
                    w_sum[b - b0, p] += w
                    s_sum[b - b0, p] += s
                    if with_spectrum:
                        weight_spectrum[row, f, p] = w
                        sigma_spectrum[row, f, p] = (
                            zero_sigma if s == 0 else np.float32(1) / np.sqrt(s)
                        )
        for b in range(b0, b1):
            row = t * n_bls + b
            flag_row[row] = row_flagged[b - b0]
            for p in range(n_corr):
                weight[row, p] = np.float32(w_sum[b - b0, p] / n_chans)
                mean = np.float32(s_sum[b - b0, p] / n_chans)
                sigma[row, p] = zero_sigma if mean == 0 else np.float32(1) / np.sqrt(mean)


def block_to_rows(
    vis: np.ndarray,
    flags: np.ndarray,
    weights: np.ndarray,
    corr_index: np.ndarray,
    *,
    corr_conj: np.ndarray | None = None,
    sigma_weights: np.ndarray | None = None,
    flag_mask: int = 0xFF,
    zero_sigma: float = np.inf,
    spectrum: bool = True,
) -> dict[str, np.ndarray]:
    """All per-visibility MAIN columns of a block of dumps, in one pass over it.

    Parameters
    ----------
    vis, flags, weights
        ``(T, F, B_products)`` complex64, uint8 flag bits (or bool) and float32 weights.
    corr_index
        ``(nbl, P)`` product index per baseline and pol, -1 for a missing product (written
        as zero, flagged, weight 0).
    corr_conj
        ``(nbl, P)`` bool: the visibility is the conjugate of the stored product.
    sigma_weights
        Optional weights from which SIGMA and SIGMA_SPECTRUM are derived (default `weights`).
    flag_mask
        Flag bits that set FLAG.
    zero_sigma
        SIGMA where the weight is 0.
    spectrum
        Also return WEIGHT_SPECTRUM and SIGMA_SPECTRUM.

    Returns
    -------
    dict
        DATA, FLAG ``(T * nbl, F, P)``, FLAG_ROW ``(T * nbl,)``, WEIGHT, SIGMA ``(T * nbl, P)``
        (channel means of the weights, and ``mean ** -0.5``) and, with `spectrum`,
        WEIGHT_SPECTRUM and SIGMA_SPECTRUM (``weight ** -0.5``).
    """
    vis = np.ascontiguousarray(vis, np.complex64)
    flags = np.asarray(flags)
    if flags.dtype == np.bool_:
        flags = flags.view(np.uint8)
    flags = np.ascontiguousarray(flags, np.uint8)
    weights = np.ascontiguousarray(weights, np.float32)
    sigma_weights = (
        weights if sigma_weights is None else np.ascontiguousarray(sigma_weights, np.float32)
    )
    if vis.ndim != 3 or flags.shape != vis.shape or weights.shape != vis.shape:
        raise ValueError(
            f"vis, flags and weights must share a (T, F, B) shape, not "
            f"{vis.shape}, {flags.shape}, {weights.shape}"
        )
    if sigma_weights.shape != vis.shape:
        raise ValueError(f"sigma_weights must have shape {vis.shape}, not {sigma_weights.shape}")
    if corr_index.size and corr_index.max() >= vis.shape[2]:
        raise ValueError(
            f"block has {vis.shape[2]} correlation products, layout needs {corr_index.max() + 1}"
        )
    n_rows = vis.shape[0] * corr_index.shape[0]
    n_chans, n_corr = vis.shape[1], corr_index.shape[1]
    cube = (n_rows, n_chans, n_corr) if spectrum else (0, n_chans, n_corr)
    out = {
        "DATA": np.empty((n_rows, n_chans, n_corr), np.complex64),
        "FLAG": np.empty((n_rows, n_chans, n_corr), np.bool_),
        "WEIGHT_SPECTRUM": np.empty(cube, np.float32),
        "SIGMA_SPECTRUM": np.empty(cube, np.float32),
        "WEIGHT": np.empty((n_rows, n_corr), np.float32),
        "SIGMA": np.empty((n_rows, n_corr), np.float32),
        "FLAG_ROW": np.empty(n_rows, np.bool_),
    }
    _block_to_rows(
        vis, flags, weights, sigma_weights, np.ascontiguousarray(corr_index, np.int64),
        _conj_mask(corr_conj, corr_index), np.uint8(flag_mask & 0xFF), np.float32(zero_sigma),
        spectrum,
        out["DATA"], out["FLAG"], out["WEIGHT_SPECTRUM"], out["SIGMA_SPECTRUM"],
        out["WEIGHT"], out["SIGMA"], out["FLAG_ROW"],
    )  # fmt: skip
    if not spectrum:
        del out["WEIGHT_SPECTRUM"], out["SIGMA_SPECTRUM"]
    return out
