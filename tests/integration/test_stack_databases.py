"""The stack's databases on a real PostgreSQL server and its keys on a real Redis: created once (a second call
creates nothing), dropped by purge even while a client is connected, and a bad server named clearly."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from opsctl import databases
from tests.production_servers import postgres_url, redis_url  # noqa: F401 - session fixtures

pytestmark = pytest.mark.integration


def test_create_is_idempotent_and_drop_removes_connected_databases(postgres_url):
    names = list(databases.database_names(f"test_{uuid.uuid4().hex[:8]}").values())
    try:
        assert databases.create_databases(postgres_url, names) == names
        assert databases.create_databases(postgres_url, names) == []
        assert databases.existing_databases(postgres_url, names) == names
        engine = sa.create_engine(databases.database_url(postgres_url, names[0]))
        connection = engine.connect()  # a component still connected: dropped all the same
        connection.execute(sa.text("SELECT 1"))
        assert databases.drop_databases(postgres_url, names) == names
        connection.invalidate()  # the server closed it
        engine.dispose()
        assert databases.existing_databases(postgres_url, names) == []
        assert databases.drop_databases(postgres_url, names) == []
    finally:
        databases.drop_databases(postgres_url, names)


def test_an_unreachable_server_is_named_without_its_password():
    with pytest.raises(databases.DatabaseSetupError, match=r"could not connect to PostgreSQL at "
                                                           r"postgresql://postgres:\*\*\*@127\.0\.0\.1:1/postgres"):
        databases.create_databases("postgresql://postgres:s3cret@127.0.0.1:1/postgres", ["x"])


def test_broker_keys_of_one_stack_only_are_deleted(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    mine, other = databases.broker_key_prefix(f"a_{uuid.uuid4().hex[:8]}"), databases.broker_key_prefix("b_other")
    try:
        client.set(f"{mine}default", "1")
        client.rpush(f"{mine}unacked_index", "x")
        client.set(f"{other}default", "1")
        assert databases.delete_broker_keys(redis_url, mine) == 2
        assert client.exists(f"{mine}default", f"{mine}unacked_index") == 0 and client.exists(f"{other}default") == 1
    finally:
        client.delete(f"{other}default")
        client.close()
