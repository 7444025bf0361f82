"""Start, watch and stop long-running local services with pid files, logs and health waits.

Only processes this module started are ever signalled: each service runs in its own session
(process group) whose id is recorded in its pid file, and stopping signals that group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class ServiceError(RuntimeError):
    """A service could not be started, did not become healthy, or could not be stopped."""


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one service.

    Attributes:
        name: short name used for the pid and log files.
        argv: the command line.
        env: the full environment of the process.
        ports: loopback ports the service binds; checked free before start.
        health_url: polled until it answers 200 (None: only check the process is alive).
        cwd: working directory (logs of tools that write to the cwd land there).
    """

    name: str
    argv: Sequence[str]
    env: dict[str, str]
    ports: tuple[int, ...] = ()
    health_url: str | None = None
    cwd: Path | None = None
    ready_check: Callable[[], bool] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ServiceState:
    name: str
    pid: int | None
    running: bool
    log_file: Path


class ProcessManager:
    """Start and stop services, keeping pid files in ``pids_dir`` and logs in ``logs_dir``."""

    def __init__(self, pids_dir: Path, logs_dir: Path, host: str = "127.0.0.1") -> None:
        self.pids_dir = pids_dir
        self.logs_dir = logs_dir
        self.host = host

    def pid_file(self, name: str) -> Path:
        return self.pids_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def _read_record(self, name: str) -> tuple[int, str] | None:
        """(pid, start time) from the pid file, or None when there is no usable file."""
        try:
            fields = self.pid_file(name).read_text().split()
            return int(fields[0]), fields[1] if len(fields) > 1 else ""
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def read_pid(self, name: str) -> int | None:
        """The recorded pid if that very process is still alive, else None (a stale file is removed).

        The process start time is recorded with the pid, so a pid reused by another program after a
        reboot or a crash is not mistaken for the service.
        """
        record = self._read_record(name)
        if record is None:
            return None
        pid, started = record
        if _alive(pid) and _start_time(pid) == started:
            return pid
        if not _group_alive(pid):
            self.pid_file(name).unlink(missing_ok=True)
        return None

    def state(self, name: str) -> ServiceState:
        pid = self.read_pid(name)
        return ServiceState(name=name, pid=pid, running=pid is not None, log_file=self.log_file(name))

    def start(self, spec: ServiceSpec) -> tuple[int, bool]:
        """Start ``spec`` unless already running. Returns (pid, started_now)."""
        existing = self.read_pid(spec.name)
        if existing is not None:
            return existing, False
        for port in spec.ports:
            if port_in_use(self.host, port):
                raise ServiceError(
                    f"{spec.name}: port {self.host}:{port} is already in use by another program. "
                    f"Stop that program or choose another port (see PIPELINE_*_PORT in README)."
                )
        self.pids_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_file(spec.name).open("ab")
        log.write(f"\n==== starting {spec.name}: {' '.join(spec.argv)}\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(
                list(spec.argv),
                env=spec.env,
                cwd=spec.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError as error:
            raise ServiceError(f"{spec.name}: cannot run {spec.argv[0]}: {error}. Run `make venv venv-triton`.") from error
        finally:
            log.close()
        self.pid_file(spec.name).write_text(f"{process.pid} {_start_time(process.pid)}")
        return process.pid, True

    def wait_healthy(self, spec: ServiceSpec, timeout_s: float = 120.0) -> None:
        """Block until the service answers its health check; fail early if it exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.read_pid(spec.name) is None:
                raise ServiceError(f"{spec.name} exited during start-up.\n{self.log_tail(spec.name)}")
            if _healthy(spec):
                return
            time.sleep(0.5)
        raise ServiceError(
            f"{spec.name} did not become healthy within {timeout_s:.0f}s "
            f"(log: {self.log_file(spec.name)}).\n{self.log_tail(spec.name)}"
        )

    def stop(self, name: str, stop_signal: int = signal.SIGINT, timeout_s: float = 30.0) -> bool:
        """Stop a service and every process left in its group. Returns False when nothing was running.

        Members of the group are stopped even when the leader has already exited (workers it left).
        """
        record = self._read_record(name)
        if record is None:
            return False
        group, started = record  # started with start_new_session, so the group id is the leader's pid
        leader_is_ours = _alive(group) and _start_time(group) == started
        if not leader_is_ours and (_alive(group) or not _group_alive(group)):
            # The pid now belongs to another program, or nothing of ours is left.
            self.pid_file(name).unlink(missing_ok=True)
            return False
        _signal_group(group, stop_signal)
        if not _wait_group_gone(group, timeout_s):
            _signal_group(group, signal.SIGTERM)
            if not _wait_group_gone(group, 10.0):
                _signal_group(group, signal.SIGKILL)
                _wait_group_gone(group, 5.0)
        self.pid_file(name).unlink(missing_ok=True)
        return True

    def log_tail(self, name: str, lines: int = 25) -> str:
        path = self.log_file(name)
        if not path.exists():
            return "(no log)"
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(f"    {line}" for line in text[-lines:])


def port_in_use(host: str, port: int) -> bool:
    """True when something accepts connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (used by tests to avoid clashes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _healthy(spec: ServiceSpec) -> bool:
    if spec.health_url is not None:
        try:
            with urllib.request.urlopen(spec.health_url, timeout=2) as response:  # noqa: S310 - loopback URL
                if response.status != 200:
                    return False
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False
    return spec.ready_check() if spec.ready_check is not None else True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _start_time(pid: int) -> str:
    """The process start time in clock ticks since boot (field 22 of /proc/<pid>/stat), or ''."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].split()[19]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return ""


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Only zombies left means gone.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().split(") ", 1)[1].split()
        except (FileNotFoundError, IndexError, ProcessLookupError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _wait_group_gone(group: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _group_alive(group):
            return True
        time.sleep(0.2)
    return not _group_alive(group)
