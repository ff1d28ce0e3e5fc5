"""Run a real ``redis-server`` as a child process: for the controller, tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RedisServer:
    """A ``redis-server`` on a loopback port, started and stopped by this object.

    Parameters
    ----------
    directory
        Working directory of the server (where it reads and saves ``dbfilename``). A temporary
        one is made and removed if not given.
    dbfilename
        RDB file the server loads at start-up (if it exists in `directory`) and saves to.
    host, port
        Where it listens; a free port is chosen by default.
    config
        Further ``redis.conf`` directives, e.g. ``{"hash-max-listpack-entries": "0"}``.
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        dbfilename: str = "dump.rdb",
        host: str = "127.0.0.1",
        port: int | None = None,
        config: dict[str, str] | None = None,
        executable: str = "redis-server",
    ) -> None:
        path = shutil.which(executable)
        if path is None:
            raise FileNotFoundError(
                f"{executable} not found: install Redis (e.g. apt-get install redis-server)"
            )
        self._tmpdir = None
        if directory is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="karoo-redis-")
            directory = self._tmpdir.name
        self.directory = Path(directory)
        self.host = host
        self.port = port or free_port(host)
        args = [
            path, "--bind", host, "--port", str(self.port), "--dir", str(self.directory),
            "--dbfilename", dbfilename, "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning",
        ]
        for name, value in (config or {}).items():
            args += [f"--{name}", str(value)]
        self._log = open(self.directory / f"redis-{self.port}.log", "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        client = self.client(socket_timeout=1)
        try:
            while True:
                if self._proc.poll() is not None:
                    log = (self.directory / f"redis-{self.port}.log").read_text(errors="replace")
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {log}")
                try:
                    # A server still loading a large RDB is not ready either.
                    if client.ping() and client.info("persistence").get("loading", 0) == 0:
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start")
                time.sleep(0.02)
        finally:
            client.close()

    def pause(self) -> None:
        """Stop the server answering (SIGSTOP) without closing its sockets."""
        self._proc.send_signal(19)

    def resume(self) -> None:
        self._proc.send_signal(18)

    def stop(self) -> None:
        """Stop the server (without saving) and clean up."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        with contextlib.suppress(Exception):
            self._log.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
