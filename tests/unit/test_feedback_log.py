"""Label feedback in the prediction log, on SQLite and on PostgreSQL: only logged ids are stored, a
later label replaces the earlier one, reads join labels to predictions by arrival, retention
removes the feedback of deleted predictions."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest
import sqlalchemy as sa

from serving import prediction_log as plog

POSTGRES = ("127.0.0.1", 5432)


def _postgres_skip_reason() -> str | None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (requirements.lock pins psycopg2-binary)"
    try:
        socket.create_connection(POSTGRES, timeout=1).close()
    except OSError:
        return f"no PostgreSQL at {POSTGRES[0]}:{POSTGRES[1]}"
    return None


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        engine = plog.create_engine(f"sqlite:///{tmp_path / 'log.db'}")
        yield engine
        engine.dispose()
        return
    reason = _postgres_skip_reason()
    if reason:
        pytest.skip(reason)
    name = f"feedback_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(f"postgresql+psycopg2://postgres@{POSTGRES[0]}:{POSTGRES[1]}/postgres",
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE {name}"))
    engine = plog.create_engine(f"postgresql+psycopg2://postgres@{POSTGRES[0]}:{POSTGRES[1]}/{name}")
    yield engine
    engine.dispose()
    with admin.connect() as connection:
        connection.execute(sa.text(f"DROP DATABASE {name}"))
    admin.dispose()


def _log(engine: sa.Engine, served: dict[str, float]) -> None:
    """Log one prediction ("positive") per id, served at the given time."""
    rows = [plog.Prediction(served_at=at, model="m", model_version="3", text_chars=10, token_count=5,
                            unknown_tokens=0, label="positive", probabilities=(0.2, 0.8), latency_ms=1.0,
                            prediction_id=pid).row() for pid, at in served.items()]
    with engine.begin() as connection:
        connection.execute(plog.PREDICTIONS.insert(), rows)


def test_labels_of_logged_ids_are_stored_and_unknown_ids_are_returned(engine):
    _log(engine, {"a" * 32: 100.0, "b" * 32: 101.0})
    stored, unknown = plog.record_feedback(engine, [("a" * 32, "negative"), ("nope", "positive"),
                                                    ("b" * 32, "positive")], received_at=1000.0)
    assert (stored, unknown) == (2, ["nope"])
    frame = plog.read_labelled(engine, 1000.0, 1001.0)
    assert sorted(zip(frame["prediction_id"], frame["label"], frame["true_label"])) == [
        ("a" * 32, "positive", "negative"), ("b" * 32, "positive", "positive")]
    assert frame["probabilities"].iloc[0] == [0.2, 0.8]
    assert plog.record_feedback(engine, []) == (0, [])


def test_a_later_label_replaces_the_earlier_one_and_counts_in_the_window_it_arrived(engine):
    _log(engine, {"a" * 32: 100.0})
    assert plog.record_feedback(engine, [("a" * 32, "negative")], received_at=1000.0) == (1, [])
    assert plog.record_feedback(engine, [("a" * 32, "positive"), ("a" * 32, "neutral")],
                                received_at=2000.0) == (1, [])
    assert plog.read_labelled(engine, 0.0, 1500.0).empty
    later = plog.read_labelled(engine, 1500.0, 2500.0)
    assert later["true_label"].tolist() == ["neutral"]  # of an id sent twice in one call, the last label
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(plog.FEEDBACK)).scalar_one() == 1


def test_retention_deletes_the_feedback_of_deleted_predictions(engine):
    _log(engine, {"a" * 32: 100.0, "b" * 32: 5000.0})
    assert plog.record_feedback(engine, [("a" * 32, "negative"), ("b" * 32, "negative")],
                                received_at=6000.0) == (2, [])
    assert plog.delete_older_than(engine, 1000.0) == 1
    assert plog.read_labelled(engine, 0.0, 10_000.0)["prediction_id"].tolist() == ["b" * 32]
    with engine.connect() as connection:
        ids = connection.execute(sa.select(plog.FEEDBACK.c.prediction_id)).scalars().all()
    assert ids == ["b" * 32]
    assert plog.record_feedback(engine, [("a" * 32, "positive")]) == (0, ["a" * 32])


def test_many_ids_in_one_call(engine):
    ids = [uuid.uuid4().hex for _ in range(1200)]  # more than one IN list's chunk
    _log(engine, {pid: 100.0 for pid in ids[:1100]})
    stored, unknown = plog.record_feedback(engine, [(pid, "negative") for pid in ids], received_at=1.0)
    assert stored == 1100 and unknown == ids[1100:]
    assert len(plog.read_labelled(engine, 0.0, 2.0)) == 1100


def test_a_failed_feedback_write_is_a_clear_error_and_stores_nothing(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'log.db'}"

    def broken(connection, rows):
        raise sa.exc.OperationalError("INSERT", {}, Exception("disk I/O error"))

    async def scenario() -> None:
        log = plog.PredictionLog(url)
        await log.start()
        try:
            _log(log._engine, {"a" * 32: 1.0})
            monkeypatch.setattr(plog, "_upsert_feedback", broken)
            with pytest.raises(plog.FeedbackNotStored, match="could not store the feedback.*disk I/O error"):
                await log.record_feedback([("a" * 32, "negative")])
        finally:
            await log.close()

    asyncio.run(scenario())
    assert plog.read_labelled(plog.create_engine(url), 0.0, 1e12).empty
