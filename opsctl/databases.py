"""The local stack's production configuration: its databases on a PostgreSQL server, its keys on a Redis broker.

With ``PIPELINE_DATABASE_URL`` set, each stack gets databases of its own on that server, named
``pipeline_<stack>_<role>`` for the roles in ``DATABASE_ROLES`` (``<stack>`` from ``stack_name``, unique
per stack home, so two stacks on one server never share a table). With ``PIPELINE_CELERY_BROKER_URL``
set, Celery's keys on the broker carry the prefix ``broker_key_prefix`` (two stacks on one Redis
database never take each other's tasks). ``opsctl purge`` drops both.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import sqlalchemy as sa

# airflow: Airflow's metadata and Celery's results; mlflow: the tracking store and registry;
# mlflow_auth: MLflow's accounts and permissions; predictions: the gateway's prediction log.
DATABASE_ROLES = ("airflow", "mlflow", "mlflow_auth", "predictions")
# The driver every component uses (psycopg2-binary is in requirements.lock): Airflow, MLflow, the gateway.
POSTGRES_DRIVER = "postgresql+psycopg2"
POSTGRES_IDENTIFIER_MAX = 63


class DatabaseSetupError(RuntimeError):
    """The PostgreSQL server or the Redis broker refused or could not be reached; the message says what to do."""


def stack_name(home: Path) -> str:
    """A short name, safe as part of a PostgreSQL identifier, that only the stack at ``home`` has: the folder's
    name (letters, digits, underscores; at most 16) and 8 hex digits of a hash of its absolute path."""
    resolved = str(home.resolve())
    slug = re.sub(r"[^a-z0-9]+", "_", home.name.lower()).strip("_")[:16] or "stack"
    return f"{slug}_{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"


def database_names(stack: str) -> dict[str, str]:
    """The stack's database per role: ``pipeline_<stack>_<role>``."""
    names = {role: f"pipeline_{stack}_{role}" for role in DATABASE_ROLES}
    too_long = [name for name in names.values() if len(name) > POSTGRES_IDENTIFIER_MAX]
    if too_long:
        raise ValueError(f"database names longer than {POSTGRES_IDENTIFIER_MAX} characters: {too_long}")
    return names


def check_server_url(url: str) -> str:
    """``url`` if it names a PostgreSQL server (``postgresql://`` or ``postgresql+<driver>://``); ValueError saying
    what is expected otherwise."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise ValueError(f"{hide_password(url)!r} is not a database URL: use "
                         "postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE") from None
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"{hide_password(url)} is not a PostgreSQL URL: use postgresql://USER[:PASSWORD]@HOST:PORT/"
                         "DATABASE (the stack without it runs on SQLite)")
    return url


def database_url(server_url: str, database: str, driver: str = POSTGRES_DRIVER) -> str:
    """The SQLAlchemy URL of ``database`` on the server ``server_url`` names, with ``driver``; the password kept."""
    url = sa.engine.make_url(server_url).set(drivername=driver, database=database)
    return url.render_as_string(hide_password=False)


def check_broker_url(url: str) -> str:
    """``url`` if it names a Redis broker (``redis://`` or ``rediss://``); ValueError otherwise."""
    if not re.match(r"^rediss?://", url):
        raise ValueError(f"{hide_password(url)} is not a Redis URL: use redis://[:PASSWORD@]HOST:PORT/DB")
    return url


def broker_key_prefix(stack: str) -> str:
    """The prefix of every key Celery writes on the broker for this stack (kombu's ``global_keyprefix``)."""
    return f"pipeline_{stack}:"


def create_databases(server_url: str, names: list[str]) -> list[str]:
    """Create those of ``names`` that do not exist yet (idempotent); returns the ones created now."""
    created = []
    with _maintenance_connection(server_url) as connection:
        for name in names:
            if not _exists(connection, name):
                connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
                created.append(name)
    return created


def drop_databases(server_url: str, names: list[str]) -> list[str]:
    """Drop those of ``names`` that exist, closing their connections first; returns the ones dropped."""
    dropped = []
    with _maintenance_connection(server_url) as connection:
        for name in names:
            if _exists(connection, name):
                connection.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
                dropped.append(name)
    return dropped


def existing_databases(server_url: str, names: list[str]) -> list[str]:
    """Those of ``names`` the server has."""
    with _maintenance_connection(server_url) as connection:
        return [name for name in names if _exists(connection, name)]


def delete_broker_keys(broker_url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` on the broker; returns how many."""
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{_escape_glob(prefix)}*", count=500))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
    except redis.RedisError as error:
        raise DatabaseSetupError(f"could not clean the Celery broker {hide_password(broker_url)}: {error}") from None
    finally:
        client.close()
    return len(keys)


def _maintenance_connection(server_url: str):
    """A connection to the database ``server_url`` names (``postgres`` when it names none), outside a transaction
    (CREATE and DROP DATABASE refuse to run inside one)."""
    url = sa.engine.make_url(database_url(server_url, sa.engine.make_url(server_url).database or "postgres"))
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10})
    try:
        return _DisposingConnection(engine, engine.connect())
    except sa.exc.OperationalError as error:
        engine.dispose()
        raise DatabaseSetupError(f"could not connect to PostgreSQL at {hide_password(server_url)} "
                                 f"({str(error.orig).strip().splitlines()[0]}); check PIPELINE_DATABASE_URL and that "
                                 "the server runs") from None


class _DisposingConnection:
    """A connection that closes its engine too when its ``with`` block ends."""

    def __init__(self, engine: sa.Engine, connection: sa.Connection) -> None:
        self._engine, self._connection = engine, connection

    def __enter__(self) -> sa.Connection:
        return self._connection

    def __exit__(self, *exc_info) -> None:
        self._connection.close()
        self._engine.dispose()


def _exists(connection: sa.Connection, name: str) -> bool:
    return connection.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                              {"name": name}).first() is not None


def _escape_glob(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def hide_password(url: str) -> str:
    """``url`` with its password, if any, shown as ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
