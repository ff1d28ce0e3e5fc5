"""A real S3 server on loopback for tests, benchmarks and demos: Ceph's RADOS Gateway.

:class:`S3Server` starts a single-node Ceph cluster in a private directory (one monitor, one
bluestore OSD backed by a sparse file, one ``radosgw`` with the beast frontend on a free loopback
port), creates an S3 user with fixed test credentials and stops and removes everything on exit.
Nothing is written outside that directory (no ``/etc/ceph``, ``/var/lib/ceph`` or
``/var/log/ceph``), so several servers can run side by side.

This is the software MeerKAT's archive runs, with its real RADOS/bluestore data path, signature
checks, bucket index and garbage collection. It needs the Debian packages ``ceph-mon ceph-osd
radosgw ceph-common`` (``scripts/test`` installs them as root) and takes about 6 s to start.

The gateway can be stopped and started again (:meth:`S3Server.stop_gateway`,
:meth:`S3Server.start_gateway`) on the same port with the same data, because the data lives in
RADOS, not in the gateway, or frozen with SIGSTOP (:meth:`S3Server.pause`); this is how tests play
an S3 outage. See ``docs/s3-server.md`` for the recipe and the reasons for this choice.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

CEPH_PROGRAMS = ("ceph-authtool", "monmaptool", "ceph-mon", "ceph-osd", "radosgw",
                 "radosgw-admin", "ceph")
DEFAULT_ACCESS_KEY = "KAROOTESTACCESSKEY01"
DEFAULT_SECRET_KEY = "karootestsecretkey000000000000000000000001"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ceph_available() -> bool:
    """Whether the Ceph programs :class:`S3Server` needs are installed."""
    return all(shutil.which(prog) for prog in CEPH_PROGRAMS)


_CONF = """\
[global]
fsid = {fsid}
mon host = v2:{host}:{mon_port}
mon initial members = a
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {d}/keyring
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
log to stderr = false
err to stderr = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false

[mon]
mon data = {d}/mon.$id
# The pool commands RGW sends at first start each wait one paxos interval: 19 s -> 6 s.
paxos propose interval = 0.1
mon cluster log file = default={d}/log/$cluster.$channel.log cluster={d}/log/$cluster.log

[osd]
osd data = {d}/osd.$id
keyring = {d}/osd.$id/keyring
osd objectstore = bluestore
# The block file must live outside osd data (else mkfs fails with ELOOP).
bluestore block path = {d}/osd.$id.block
bluestore block create = true
bluestore block size = {osd_bytes}
osd memory target = {osd_memory}

[client.rgw.x]
keyring = {d}/rgw/keyring
rgw frontends = beast endpoint={host}:{port}
rgw gc obj min wait = 60
rgw gc processor period = 60
"""


def _die_with_parent() -> None:
    """Have the kernel kill a daemon if whoever started it dies without stopping it.

    Linux's PR_SET_PDEATHSIG fires when the *thread* that started the child ends, so start the
    daemons from a long-lived thread (the main thread), not from a short-lived worker.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class S3ServerError(RuntimeError):
    """The S3 server could not be started (the message includes the relevant log tail)."""


class S3Server:
    """A Ceph RADOS Gateway on a loopback port, with its own one-OSD cluster.

    Parameters
    ----------
    directory
        Where the cluster lives (config, keyrings, mon store, OSD block file, logs). A temporary
        one is made and removed by :meth:`stop` if not given; a given one must be empty or absent,
        and is left in place.
    host, port
        Where the gateway listens; a free port is chosen by default.
    access_key, secret_key
        Credentials of the S3 user that is created.
    osd_size_gb
        Size of the sparse file that backs the OSD (it goes read-only at about 95 % full).
    osd_memory_gb
        The OSD's memory target.
    start_timeout
        Seconds to wait for each daemon.

    Attributes
    ----------
    endpoint_url : str
        ``http://host:port`` of the gateway.
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        osd_size_gb: float = 10.0,
        osd_memory_gb: float = 1.0,
        start_timeout: float = 60.0,
    ) -> None:
        missing = [prog for prog in CEPH_PROGRAMS if shutil.which(prog) is None]
        if missing:
            raise FileNotFoundError(
                f"{', '.join(missing)} not found: install Ceph (apt-get install ceph-mon ceph-osd "
                "radosgw ceph-common)"
            )
        self._tmpdir = None
        if directory is None:
            self._tmpdir = tempfile.mkdtemp(prefix="karoo-s3-")
            directory = self._tmpdir
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        if any(self.directory.iterdir()):
            raise S3ServerError(f"{self.directory} is not empty")
        self.host = host
        self.port = port or free_port(host)
        self.access_key = access_key
        self.secret_key = secret_key
        self.start_timeout = start_timeout
        self._procs: dict[str, subprocess.Popen] = {}
        self._conf = self.directory / "ceph.conf"
        try:
            self._start_cluster(osd_size_gb, osd_memory_gb)
            self.start_gateway()
            self._ceph("radosgw-admin", "user", "create", "--uid=karoo", "--display-name=karoo",
                       f"--access-key={access_key}", f"--secret-key={secret_key}")
        except BaseException:
            self.stop()
            raise

    # -- public API -------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    @property
    def storage_options(self) -> dict:
        """Keyword arguments for :class:`s3fs.S3FileSystem` that reach this server."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    def start_gateway(self) -> None:
        """Start ``radosgw`` (again) on the same port; the data in RADOS is still there."""
        if self._running("rgw"):
            return
        self._spawn("rgw", "radosgw", "-n", "client.rgw.x")
        self._wait(self._gateway_answers, "radosgw", "client.rgw.x")

    def stop_gateway(self) -> None:
        """Stop ``radosgw`` (connections are refused) but keep the cluster and its data."""
        self._terminate("rgw")

    def pause(self) -> None:
        """Freeze the gateway (SIGSTOP): connections hang instead of being refused."""
        self._procs["rgw"].send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        self._procs["rgw"].send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop every daemon and remove the directory if it was a temporary one."""
        for name in ("rgw", "osd", "mon"):
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
            # A throw-away cluster need not shut down cleanly (saves ~5 s).
            self._terminate(name, kill=self._tmpdir is not None)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------

    def _start_cluster(self, osd_size_gb: float, osd_memory_gb: float) -> None:
        d = self.directory
        for sub in ("mon.a", "osd.0", "run", "log", "rgw"):
            (d / sub).mkdir()
        fsid = str(uuid.uuid4())
        mon_port = free_port(self.host)
        self._conf.write_text(_CONF.format(
            fsid=fsid, host=self.host, mon_port=mon_port, d=d, port=self.port,
            osd_bytes=int(osd_size_gb * 2**30), osd_memory=int(osd_memory_gb * 2**30),
        ))
        keyring = str(d / "keyring")
        self._run("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.",
                  "--cap", "mon", "allow *")
        self._run("ceph-authtool", keyring, "--gen-key", "-n", "client.admin",
                  "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                  "--cap", "mds", "allow *", "--cap", "mgr", "allow *")
        self._run("monmaptool", "--create", "--clobber", "--addv", "a",
                  f"[v2:{self.host}:{mon_port}]", "--fsid", fsid, str(d / "monmap"))
        self._ceph("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(d / "monmap"),
                   "--keyring", keyring)
        self._spawn("mon", "ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("ceph", "osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise S3ServerError(f"expected OSD id 0, got {osd_id!r}")
        self._ceph("ceph-osd", "-i", "0", "--mkfs", "--mkkey", "--osd-uuid", osd_uuid,
                   "--no-mon-config")
        self._ceph("ceph", "auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd",
                   "mgr", "allow profile osd", "-i", str(d / "osd.0" / "keyring"))
        self._spawn("osd", "ceph-osd", "-i", "0")
        self._wait(self._osd_up, "ceph-osd", "osd.0")
        self._ceph("ceph", "auth", "get-or-create", "client.rgw.x", "mon", "allow rw",
                   "osd", "allow rwx", "mgr", "allow rw", "-o", str(d / "rgw" / "keyring"))

    def _run(self, *args: str) -> str:
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=60,
                                    check=False)
        except subprocess.TimeoutExpired as exc:
            raise S3ServerError(f"{' '.join(args)} timed out") from exc
        if result.returncode != 0:
            raise S3ServerError(
                f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result.stdout

    def _ceph(self, prog: str, *args: str) -> str:
        return self._run(prog, "-c", str(self._conf), *args)

    def _spawn(self, name: str, prog: str, *args: str) -> None:
        # -f: stay in the foreground, so that the daemon is our child and we own its lifetime.
        self._procs[name] = subprocess.Popen(
            [prog, "-c", str(self._conf), "-f", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def _running(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _terminate(self, name: str, kill: bool = False) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
            proc.wait()
            return
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _osd_up(self) -> bool:
        out = self._ceph("ceph", "osd", "dump", "--connect-timeout", "5")
        return any(line.startswith("osd.0 up") for line in out.splitlines())

    def _gateway_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait(self, ready, what: str, daemon: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        name = {"ceph-osd": "osd", "radosgw": "rgw"}[what]
        while True:
            proc = self._procs[name]
            if proc.poll() is not None:
                raise S3ServerError(f"{what} exited with {proc.returncode}: {self._log(daemon)}")
            with contextlib.suppress(S3ServerError):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise S3ServerError(f"{what} did not become ready: {self._log(daemon)}")
            time.sleep(0.1)

    def _log(self, daemon: str, lines: int = 20) -> str:
        path = self.directory / "log" / f"{daemon}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"
