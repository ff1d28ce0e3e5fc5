"""Launch backends: how a product's telstate and daemons are started and stopped.

`ProcessLauncher` (the default) runs telstate as a real ``redis-server`` and each daemon as its
own local process, ``python -m karoo.cli <command> --telstate ... --name ... -p <port>``, with
its output in ``<workdir>/logs/<task>.log``. The Kubernetes backend generates manifests instead
(see `karoo.controller.kubernetes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import karoo

from ..telstate.server import RedisServer, free_port
from .graph import Task

logger = logging.getLogger(__name__)


def karoo_command(python: str = sys.executable) -> list[str]:
    """The command that runs ``karoo`` with this interpreter."""
    return [python, "-m", "karoo.cli"]


def karoo_env() -> dict[str, str]:
    """Environment for child processes: this karoo importable even when not installed."""
    env = dict(os.environ)
    root = str(Path(karoo.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def log_tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class TaskProcess:
    """A daemon running as a local process."""

    observable = True  # its exit is seen as it happens

    def __init__(self, task: Task, proc: asyncio.subprocess.Process, host: str, port: int,
                 command: list[str], log: Path) -> None:
        self.task = task
        self.proc = proc
        self.host = host
        self.port = port
        self.command = command
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self) -> int:
        """Wait for the process to end; returns its exit status (negative: killed by signal)."""
        return await self.proc.wait()

    def signal(self, signum: int) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    async def stop(self, grace: float = 30.0) -> int:
        """SIGTERM (a daemon then finishes its capture block), SIGKILL after `grace` seconds."""
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace)
        except TimeoutError:
            logger.warning("%s did not stop within %.0f s: killing it", self.task.name, grace)
            self.signal(signal.SIGKILL)
            return await self.proc.wait()

    def details(self) -> dict:
        """What goes into telstate's ``sdp_task_details`` for this task."""
        return {"host": self.host, "port": self.port, "pid": self.pid,
                "command": self.command, "log": str(self.log)}


class ProcessLauncher:
    """Runs a product on this machine: ``redis-server`` for telstate, a process per daemon.

    Parameters
    ----------
    workdir
        Directory for the telstate server's files and the tasks' logs.
    host
        Address the daemons' KATCP servers listen on.
    command
        What runs a daemon, before its subcommand; ``python -m karoo.cli`` by default.
    """

    def __init__(self, workdir: str | os.PathLike, host: str = "127.0.0.1",
                 command: list[str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.command = command or karoo_command()
        self._redis: RedisServer | None = None

    async def start_telstate(self) -> str:
        """Start the product's ``redis-server``; returns its ``host:port`` endpoint."""
        directory = self.workdir / "telstate"
        directory.mkdir(parents=True, exist_ok=True)
        self._redis = await asyncio.to_thread(RedisServer, directory, host=self.host)
        return self._redis.endpoint

    async def stop_telstate(self) -> None:
        if self._redis is not None:
            redis, self._redis = self._redis, None
            await asyncio.to_thread(redis.stop)

    def telstate_alive(self) -> bool:
        return self._redis is not None and self._redis._proc.poll() is None

    async def launch(self, task: Task, telstate: str) -> TaskProcess:
        """Start `task`'s daemon; it reads ``config.<task name>`` from `telstate`."""
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        port = free_port(self.host)
        command = [*self.command, task.command, "--telstate", telstate,
                   "--name", task.name, "-a", self.host, "-p", str(port)]
        log = logs / f"{task.name}.log"
        with open(log, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, env=karoo_env(), cwd=self.workdir,
                start_new_session=True,  # a ^C at the controller's terminal reaches only it
            )
        logger.info("started %s (pid %d): %s", task.name, proc.pid, " ".join(command))
        return TaskProcess(task, proc, self.host, port, command, log)


class AttachedTask:
    """A daemon started by someone else (Kubernetes): known only by its KATCP address."""

    observable = False  # no exit status: its death shows as a lost KATCP connection

    def __init__(self, task: Task, host: str, port: int) -> None:
        self.task = task
        self.host = host
        self.port = port
        self.returncode: int | None = None
        self.log = Path("/dev/null")
        self._stopped = asyncio.Event()

    async def wait(self) -> int:
        await self._stopped.wait()
        return 0

    def signal(self, signum: int) -> None:
        pass

    async def stop(self, grace: float = 30.0) -> int:
        """Forget the task (deleting its Pod is the operator's job: ``kubectl delete``)."""
        self.returncode = 0
        self._stopped.set()
        return 0

    def details(self) -> dict:
        return {"host": self.host, "port": self.port}


class AttachLauncher:
    """Attaches to a product whose telstate and daemons already run (``tasks.json``).

    The file (written by `karoo.controller.kubernetes.generate_manifests`) is
    ``{"telstate": "host:port", "tasks": {"<task name>": "host:port", ...}}``.
    """

    def __init__(self, tasks_file: str | os.PathLike) -> None:
        import json

        with open(tasks_file) as f:
            spec = json.load(f)
        self.telstate = spec["telstate"]
        self.tasks: dict[str, str] = spec["tasks"]

    async def start_telstate(self) -> str:
        return self.telstate

    async def stop_telstate(self) -> None:
        pass

    async def launch(self, task: Task, telstate: str) -> AttachedTask:
        if task.name not in self.tasks:
            raise RuntimeError(f"{task.name} is not among the running tasks "
                               f"({', '.join(sorted(self.tasks))}): configuration differs "
                               "from the one the manifests were made from")
        host, _, port = self.tasks[task.name].rpartition(":")
        return AttachedTask(task, host, int(port))


class InProcessTask:
    """A daemon running as a `karoo.service.Service` inside the controller's own event loop."""

    observable = True  # its end (a halt or a crash of its server) is seen as it happens

    def __init__(self, task: Task, service, host: str, port: int, telstate, log: Path) -> None:
        self.task = task
        self.service = service
        self.host = host
        self.port = port
        self.log = log
        self.returncode: int | None = None
        self._telstate = telstate
        self._done = asyncio.ensure_future(self._run())

    async def _run(self) -> int:
        try:
            await self.service.join()
            self.returncode = 0
        except Exception:
            logger.exception("%s failed", self.task.name)
            self.returncode = 1
        finally:
            await self._telstate.close()
        return self.returncode

    @property
    def pid(self) -> int:
        return os.getpid()

    async def wait(self) -> int:
        return await asyncio.shield(self._done)

    def signal(self, signum: int) -> None:
        """SIGTERM stops the server cleanly (finishing its capture block); SIGKILL abruptly."""
        if self.returncode is None:
            if signum == signal.SIGKILL:
                self.service.capture_block_id = None  # no flush: what a killed process does
            self.service.halt()

    async def stop(self, grace: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.wait(), grace)
        except TimeoutError:
            logger.warning("%s did not stop within %.0f s", self.task.name, grace)
            self.signal(signal.SIGKILL)
            return await self.wait()

    def details(self) -> dict:
        return {"host": self.host, "port": self.port, "pid": self.pid, "in_process": True}


class InProcessLauncher:
    """Runs a whole product inside one process: the embedded mode of ``karoo demo``.

    Telstate is a process-wide memory store (``memory://<name>``) unless a Redis endpoint is
    given, and every daemon is the same `Service` class that runs as a process in production,
    built from the same telstate ``config.<task>`` by the same command-line parser.
    Use it with an ``inproc`` stream allocator (`karoo.controller.graph.EndpointAllocator`).
    """

    def __init__(self, workdir: str | os.PathLike, telstate: str = "",
                 host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.host = host
        self._telstate = telstate
        self._memory_name = f"karoo-{os.getpid()}-{id(self):x}"

    async def start_telstate(self) -> str:
        return self._telstate or f"memory://{self._memory_name}"

    async def stop_telstate(self) -> None:
        from ..telstate.memory import forget_memory_backend

        forget_memory_backend(self._memory_name)

    def telstate_alive(self) -> bool:
        return True

    async def launch(self, task: Task, telstate: str) -> InProcessTask:
        from .. import cli
        from ..service import open_telstate

        argv = [task.command, "--telstate", telstate, "--name", task.name,
                "-a", self.host, "-p", "0"]
        args = await asyncio.to_thread(cli.parse_args, argv)
        make = getattr(args, "make_service", None)
        if make is None:
            raise RuntimeError(f"karoo {task.command} is not a service")
        service_telstate = await open_telstate(telstate)
        try:
            service = make(service_telstate, args)
            if asyncio.iscoroutine(service):
                service = await service
            await service.start()
        except SystemExit as exc:  # what the command would have exited with
            await service_telstate.close()
            raise RuntimeError(f"{task.name}: {exc}") from None
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return InProcessTask(task, service, self.host, service.port, service_telstate,
                             logs / f"{task.name}.log")
