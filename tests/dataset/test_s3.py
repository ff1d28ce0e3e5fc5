"""Reading from S3 (a real Ceph RGW): an s3:// RDB URL, the store found from telstate, outages."""

import itertools

import boto3
import numpy as np
import pytest

import karoo
from karoo.chunkstore import ChunkStore
from karoo.dataset import ChunkReadError
from karoo.dataset.synthetic import write_dataset

_ids = itertools.count()


@pytest.fixture
def s3(s3_server):
    if not s3_server._running("rgw"):
        s3_server.start_gateway()
    return s3_server


def test_open_rdb_on_s3(s3, tmp_path):
    cbid = f"17100000{next(_ids):02d}"
    store = ChunkStore("s3://", endpoint_url=s3.endpoint_url, access_key=s3.access_key,
                       secret_key=s3.secret_key)
    syn = write_dataset(tmp_path, n_ants=2, n_chans=32, store=store, capture_block_id=cbid,
                        chunks={"correlator_data": (4, 16)})
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id=s3.access_key,
                          aws_secret_access_key=s3.secret_key)
    client.create_bucket(Bucket=cbid)
    client.upload_file(syn.rdb, cbid, f"{cbid}_sdp_l0.rdb")
    options = {"s3_endpoint_url": s3.endpoint_url, "access_key": s3.access_key,
               "secret_key": s3.secret_key, "retries": 1, "backoff": 0.1, "timeout": 5}
    d = karoo.open(f"s3://{cbid}/{cbid}_sdp_l0.rdb", **options)
    assert d.missing_chunks["correlator_data"] == 0
    np.testing.assert_array_equal(d.vis[:], syn.vis)
    np.testing.assert_array_equal(d.raw_flags[:], syn.flags)
    # the archive's way: the RDB over plain HTTP(S) from the S3 gateway, chunks from the same
    client.put_object_acl(Bucket=cbid, Key=f"{cbid}_sdp_l0.rdb", ACL="public-read")
    del options["s3_endpoint_url"]
    d2 = karoo.open(f"{s3.endpoint_url}/{cbid}/{cbid}_sdp_l0.rdb", **options)
    np.testing.assert_array_equal(d2.weights[:], d.weights[:])
    # a server that stops answering is an error naming the chunk, not lost data
    s3.stop_gateway()
    try:
        with pytest.raises(ChunkReadError, match="exists but could not be read"):
            d.flags[0]
    finally:
        s3.start_gateway()
    np.testing.assert_array_equal(d.raw_flags[0], syn.flags[0])
