"""The process manager on a throw-away HTTP server: start, health wait, idempotent start, port clash, stop."""

import os
import signal
import sys
import time

import pytest

from opsctl.process import ProcessManager, ServiceError, ServiceSpec, free_port, port_in_use

# A server that also starts a child process, to check that stopping leaves no orphan behind.
SERVER = """
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[2], "w").write(str(child.pid))
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def _spec(tmp_path, port: int) -> ServiceSpec:
    return ServiceSpec(
        name="web",
        argv=[sys.executable, "-c", SERVER, str(port), str(tmp_path / "child.pid")],
        env=dict(os.environ),
        ports=(port,),
        health_url=f"http://127.0.0.1:{port}/",
        cwd=tmp_path,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def test_start_wait_restart_noop_and_stop_leaves_nothing(tmp_path):
    manager = ProcessManager(tmp_path / "run", tmp_path / "logs")
    port = free_port()
    spec = _spec(tmp_path, port)
    pid, started = manager.start(spec)
    try:
        assert started
        manager.wait_healthy(spec, timeout_s=30)
        assert port_in_use("127.0.0.1", port)
        assert manager.start(spec) == (pid, False)
        child = int((tmp_path / "child.pid").read_text())
        assert _alive(child)
    finally:
        assert manager.stop("web", signal.SIGINT, timeout_s=10)
    deadline = time.monotonic() + 5
    while (_alive(pid) or _alive(child)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid) and not _alive(child)
    assert not manager.pid_file("web").exists()
    assert manager.stop("web") is False


def test_port_taken_by_another_program_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        manager = ProcessManager(tmp_path / "run", tmp_path / "logs")
        with pytest.raises(ServiceError, match=f"port 127.0.0.1:{port} is already in use"):
            manager.start(_spec(tmp_path, port))


def test_a_service_that_exits_during_start_shows_its_log(tmp_path):
    manager = ProcessManager(tmp_path / "run", tmp_path / "logs")
    spec = ServiceSpec(name="broken", argv=[sys.executable, "-c", "print('boom: bad flag'); raise SystemExit(3)"],
                       env=dict(os.environ), health_url="http://127.0.0.1:9/")
    manager.start(spec)
    with pytest.raises(ServiceError, match="boom: bad flag"):
        manager.wait_healthy(spec, timeout_s=20)


def test_stale_pid_file_is_ignored(tmp_path):
    manager = ProcessManager(tmp_path / "run", tmp_path / "logs")
    manager.pids_dir.mkdir(parents=True)
    manager.pid_file("ghost").write_text("999999")
    assert manager.read_pid("ghost") is None
    assert not manager.pid_file("ghost").exists()


def test_stop_ends_workers_left_behind_by_an_exited_leader(tmp_path):
    manager = ProcessManager(tmp_path / "run", tmp_path / "logs")
    script = ("import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
              f"open({str(tmp_path / 'orphan.pid')!r}, 'w').write(str(child.pid))")
    spec = ServiceSpec(name="leaver", argv=[sys.executable, "-c", script], env=dict(os.environ))
    leader, _ = manager.start(spec)
    deadline = time.monotonic() + 10
    while (not (tmp_path / "orphan.pid").exists() or _alive(leader)) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphan = int((tmp_path / "orphan.pid").read_text())
    assert not _alive(leader) and _alive(orphan)
    assert manager.stop("leaver", timeout_s=5) is True
    deadline = time.monotonic() + 5
    while _alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(orphan)


def test_a_reused_pid_is_not_taken_for_the_service(tmp_path):
    manager = ProcessManager(tmp_path / "run", tmp_path / "logs")
    manager.pids_dir.mkdir(parents=True)
    # Our own pid, with a start time that is not ours: a foreign process now holds the number.
    manager.pid_file("ghost").write_text(f"{os.getpid()} 1")
    assert manager.read_pid("ghost") is None
    manager.pid_file("ghost").write_text(f"{os.getpid()} 1")
    assert manager.stop("ghost") is False  # and this test process was not signalled
