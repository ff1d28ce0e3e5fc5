"""The S3 server of docker/compose.yaml: a single-node Ceph RADOS Gateway (docs/s3-server.md).

Listens on the container's own address (so that other containers reach it as ``s3``), port
7480 (Ceph RGW's default) unless KAROO_S3_PORT says otherwise, with the access and secret keys
from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. The cluster lives in a fresh directory under
KAROO_S3_DIR (default /var/kat/s3) and is removed when the container stops.
"""

import os
import signal
import socket
import tempfile
import threading

from karoo.chunkstore.s3server import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, S3Server

root = os.environ.get("KAROO_S3_DIR", "/var/kat/s3")
os.makedirs(root, exist_ok=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())
with tempfile.TemporaryDirectory(dir=root) as directory, S3Server(
    directory=directory,
    host=socket.gethostbyname(socket.gethostname()),
    port=int(os.environ.get("KAROO_S3_PORT", "7480")),
    access_key=os.environ.get("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY),
    secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_KEY),
) as server:
    print(f"S3 server ready at {server.endpoint_url}", flush=True)
    stop.wait()
