"""The flag bits of the L0 stream and the chunk store (katdal's meaning of each bit).

They are numpy uint8 scalars so that numba kernels and array code use them without casts.
"""

import numpy as np

STATIC = np.uint8(2)  #: static mask (known bad channels)
CAM = np.uint8(4)  #: flagged by the telescope (CAM), or zero data from the correlator
DATA_LOST = np.uint8(8)  #: data never arrived (missing heaps or chunks)
INGEST_RFI = np.uint8(16)  #: RFI found by ingest
PREDICTED_RFI = np.uint8(32)  #: RFI predicted from a model
CAL_RFI = np.uint8(64)  #: RFI found by cal
POSTPROC = np.uint8(128)  #: flagged in post-processing

NAMES = {
    "static": STATIC, "cam": CAM, "data_lost": DATA_LOST, "ingest_rfi": INGEST_RFI,
    "predicted_rfi": PREDICTED_RFI, "cal_rfi": CAL_RFI, "postproc": POSTPROC,
}
