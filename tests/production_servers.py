"""PostgreSQL and Redis for the tests of the production configuration.

The development and CI machines run both on 127.0.0.1 (PostgreSQL on 5432 with trust authentication
for the user ``postgres``, Redis on 6379). Elsewhere the servers are started from the Debian packages'
binaries (``postgresql``, ``redis-server``) in a temporary folder, as the current user, on free ports.
Where neither works the tests that need them skip, saying why.

    from tests.production_servers import postgres_url, redis_url  # noqa: F401 - session fixtures
"""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST = "127.0.0.1"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"


def postgres_reachable(url: str) -> str | None:
    """None when ``url``'s server answers a query; else why not."""
    try:
        import sqlalchemy as sa
        import psycopg2  # noqa: F401
    except ImportError as error:
        return f"the PostgreSQL driver is missing ({error}): `make venv`"
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1),
                              connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as error:
        return str(error.orig).strip().splitlines()[0]
    finally:
        engine.dispose()
    return None


def redis_reachable(url: str) -> str | None:
    """None when ``url``'s server answers PING; else why not."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as error:
        return str(error)
    finally:
        client.close()
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _postgres_binaries() -> Path | None:
    """The folder of the newest Debian ``postgresql`` package's initdb and pg_ctl, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(path.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _wait(check, timeout_s: float) -> str | None:
    deadline = time.monotonic() + timeout_s
    reason = check()
    while reason is not None and time.monotonic() < deadline:
        time.sleep(0.5)
        reason = check()
    return reason


def start_postgres(folder: Path) -> tuple[str, str | None]:
    """A throwaway PostgreSQL cluster in ``folder`` on a free port (stopped with pg_ctl): (URL, skip reason)."""
    binaries = _postgres_binaries()
    if binaries is None:
        return "", "no PostgreSQL at 127.0.0.1:5432 and no Debian postgresql package to start one"
    if os.geteuid() == 0:
        return "", "no PostgreSQL at 127.0.0.1:5432, and PostgreSQL refuses to start as root"
    data, port, user = folder / "data", _free_port(), getpass.getuser()
    initdb = subprocess.run([str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
                            capture_output=True, text=True, check=False)
    if initdb.returncode != 0:
        return "", f"initdb failed as {user}: {initdb.stderr.strip()[-300:]}"
    started = subprocess.run([str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "postgres.log"), "-w",
                              "-o", f"-h {HOST} -p {port} -k {folder}", "start"],
                             capture_output=True, text=True, check=False)
    if started.returncode != 0:
        return "", f"pg_ctl start failed: {started.stderr.strip()[-300:]}"
    url = f"postgresql://postgres@{HOST}:{port}/postgres"
    return url, _wait(lambda: postgres_reachable(url), 30)


def start_redis(folder: Path) -> tuple[str, subprocess.Popen | None, str | None]:
    """A throwaway Redis in ``folder`` on a free port: (URL, its process, skip reason)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return "", None, "no Redis at 127.0.0.1:6379 and no redis-server (Debian package redis-server) to start one"
    port = _free_port()
    process = subprocess.Popen([binary, "--bind", HOST, "--port", str(port), "--dir", str(folder), "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://{HOST}:{port}/0"
    return url, process, _wait(lambda: redis_reachable(url), 15)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server (user postgres, trust authentication): the local one, or one started for the session."""
    if postgres_reachable(LOCAL_POSTGRES) is None:
        yield LOCAL_POSTGRES
        return
    folder = Path(tempfile.mkdtemp(prefix="pipeline-postgres-"))
    url, reason = start_postgres(folder)
    try:
        if reason is not None:
            pytest.skip(f"PostgreSQL: {reason}")
        yield url
    finally:
        binaries = _postgres_binaries()
        if url and binaries is not None:
            subprocess.run([str(binaries / "pg_ctl"), "-D", str(folder / "data"), "-m", "fast", "stop"],
                           capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server: the local one, or one started for the session."""
    if redis_reachable(LOCAL_REDIS) is None:
        yield LOCAL_REDIS
        return
    folder = Path(tempfile.mkdtemp(prefix="pipeline-redis-"))
    url, process, reason = start_redis(folder)
    try:
        if reason is not None:
            pytest.skip(f"Redis: {reason}")
        yield url
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)
